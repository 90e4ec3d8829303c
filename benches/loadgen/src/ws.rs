//! The client side of RFC 6455, cut down to what a load generator needs: the HTTP upgrade, masked text frames out,
//! and a streaming frame-header parser in. Payloads are never decoded; a frame's first bytes are copied only when
//! the caller wants them (a latency sample, a control frame, or the replies before `subscribed`).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How many payload bytes of a frame are kept when it is captured.
pub const CAPTURE: usize = 256;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// A parsed `ws://` URL. Only loopback targets are accepted: this tool must never load another machine.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub host_header: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| format!("{url}: the URL needs a port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{url}: bad port"))?;
        let ip: Ipv4Addr = if host == "localhost" {
            Ipv4Addr::LOCALHOST
        } else {
            host.parse().map_err(|_| format!("{url}: the host must be an IPv4 literal or localhost"))?
        };
        if !ip.is_loopback() {
            return Err(format!("{url}: refusing a non-loopback target (this generator only loads 127.0.0.0/8)"));
        }
        Ok(Target { addr: SocketAddrV4::new(ip, port), host_header: authority.to_string(), path })
    }

    /// The same target with `extra` (e.g. `token=...`) added to the query string.
    pub fn with_query(&self, extra: &str) -> Target {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        Target { path: format!("{}{sep}{extra}", self.path), ..self.clone() }
    }
}

/// Open a TCP connection from `src` (a loopback address, so many source addresses widen the ephemeral port space)
/// and complete the WebSocket upgrade. Returns the stream and any bytes that followed the 101 response.
pub async fn connect(target: &Target, src: Option<Ipv4Addr>) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let socket = TcpSocket::new_v4().map_err(ConnectError::Io)?;
    if let Some(src) = src {
        // Defer the port choice to connect(), where the kernel can reuse a port for another 4-tuple.
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::V4(SocketAddrV4::new(src, 0))).map_err(ConnectError::Io)?;
    }
    let mut stream = socket.connect(SocketAddr::V4(target.addr)).await.map_err(ConnectError::Io)?;
    stream.set_nodelay(true).map_err(ConnectError::Io)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host_header
    );
    stream.write_all(request.as_bytes()).await.map_err(ConnectError::Io)?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.map_err(ConnectError::Io)?;
        if n == 0 {
            return Err(ConnectError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the upgrade")));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&head, b"\r\n\r\n") {
            let status = head
                .split(|&b| b == b' ')
                .nth(1)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            if status != 101 {
                return Err(ConnectError::Status(status));
            }
            return Ok((stream, head[end + 4..].to_vec()));
        }
        if head.len() > 16 * 1024 {
            return Err(ConnectError::Status(0));
        }
    }
}

#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    /// The server answered the upgrade with another HTTP status (0: unreadable).
    Status(u16),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::Status(s) => write!(f, "HTTP {s} instead of 101"),
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A cheap xorshift for mask keys: RFC 6455 wants them unpredictable to intermediaries, which a loopback bench
/// does not have; the server only needs them to be applied.
pub struct Masker(u32);

impl Masker {
    pub fn new(seed: u32) -> Masker {
        Masker(seed | 1)
    }

    fn next(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x.to_le_bytes()
    }

    /// Append one masked client frame with `opcode` and `payload` to `out`.
    pub fn frame(&mut self, out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
        out.push(0x80 | opcode);
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let key = self.next();
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(payload);
        for (i, b) in out[start..].iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
    }
}

/// One complete frame, as the parser reports it.
pub struct Frame<'a> {
    pub opcode: u8,
    pub fin: bool,
    /// 0-based index of the data message this frame ends (valid when `fin` and a data opcode).
    pub index: u64,
    /// The first `CAPTURE` payload bytes, when the frame was captured.
    pub captured: Option<&'a [u8]>,
}

/// What the frame callback asks of the parser afterwards.
#[derive(PartialEq, Eq)]
pub enum After {
    Continue,
    /// Stop capturing every frame and restart the message index at 0 (the `subscribed` reply was seen).
    StartCounting,
}

/// Streaming frame parser: feed it whatever a read returned. State between reads is a partial header (at most
/// 14 bytes), the bytes left in the current payload, and the capture of the current frame if any.
pub struct Parser {
    header: [u8; 14],
    header_len: usize,
    in_payload: bool,
    remaining: u64,
    opcode: u8,
    message_opcode: u8,
    fin: bool,
    capturing: bool,
    capture: Vec<u8>,
    /// Capture every frame (before `subscribed`).
    pub capture_all: bool,
    /// Capture every Nth data message (0: never).
    pub sample_every: u64,
    /// Data messages completed since counting started.
    pub messages: u64,
}

impl Parser {
    pub fn new(sample_every: u64) -> Parser {
        Parser {
            header: [0; 14],
            header_len: 0,
            in_payload: false,
            remaining: 0,
            opcode: 0,
            message_opcode: 0,
            fin: false,
            capturing: false,
            capture: Vec::new(),
            capture_all: true,
            sample_every,
            messages: 0,
        }
    }

    pub fn feed<F: FnMut(&Frame<'_>) -> After>(&mut self, mut data: &[u8], on_frame: &mut F) -> Result<(), String> {
        while !data.is_empty() {
            if self.in_payload {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                if self.capturing && self.capture.len() < CAPTURE {
                    let room = CAPTURE - self.capture.len();
                    self.capture.extend_from_slice(&data[..take.min(room)]);
                }
                self.remaining -= take as u64;
                data = &data[take..];
                if self.remaining == 0 {
                    self.finish(on_frame);
                }
                continue;
            }
            // Header: parse in place when it is whole in `data`, else gather it in `self.header`.
            let (b0, b1, need) = if self.header_len == 0 {
                if data.len() >= 2 {
                    (data[0], data[1], header_size(data[1]))
                } else {
                    self.header[0] = data[0];
                    self.header_len = 1;
                    return Ok(());
                }
            } else {
                if self.header_len == 1 {
                    self.header[1] = data[0];
                    self.header_len = 2;
                    data = &data[1..];
                }
                (self.header[0], self.header[1], header_size(self.header[1]))
            };
            let header: [u8; 14];
            if self.header_len == 0 && data.len() >= need {
                let mut h = [0u8; 14];
                h[..need].copy_from_slice(&data[..need]);
                header = h;
                data = &data[need..];
            } else {
                if self.header_len == 0 {
                    self.header[0] = b0;
                    self.header[1] = b1;
                    self.header_len = 2;
                    data = &data[2..];
                }
                let take = (need - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < need {
                    return Ok(());
                }
                header = self.header;
                self.header_len = 0;
            }
            if b0 & 0x70 != 0 {
                return Err("a frame with RSV bits set (no extension was negotiated)".into());
            }
            self.fin = b0 & 0x80 != 0;
            self.opcode = b0 & 0x0f;
            if self.opcode == OP_TEXT || self.opcode == OP_BINARY {
                self.message_opcode = self.opcode;
            }
            let len7 = b1 & 0x7f;
            self.remaining = match len7 {
                126 => u16::from_be_bytes([header[2], header[3]]) as u64,
                127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
                n => n as u64,
            };
            let control = self.opcode >= 0x8;
            self.capturing = control
                || self.capture_all
                || (self.sample_every > 0 && (self.messages + 1).is_multiple_of(self.sample_every));
            self.capture.clear();
            if self.remaining == 0 {
                self.finish(on_frame);
            } else {
                self.in_payload = true;
            }
        }
        Ok(())
    }

    fn finish<F: FnMut(&Frame<'_>) -> After>(&mut self, on_frame: &mut F) {
        self.in_payload = false;
        let data_message = self.opcode < 0x8 && self.fin;
        let frame = Frame {
            opcode: if self.opcode == OP_CONT { self.message_opcode } else { self.opcode },
            fin: self.fin,
            index: self.messages,
            captured: if self.capturing { Some(&self.capture) } else { None },
        };
        let after = on_frame(&frame);
        if data_message {
            self.messages += 1;
        }
        if after == After::StartCounting {
            self.capture_all = false;
            self.messages = 0;
        }
    }
}

fn header_size(b1: u8) -> usize {
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    mask + match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

/// The close code of a close frame's payload (1005 when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// The number after `"t":` in a captured frame: the publisher's send time in µs since the generator started.
pub fn timestamp(captured: &[u8]) -> Option<u64> {
    let at = find(captured, b"\"t\":")? + 4;
    let mut value: u64 = 0;
    let mut digits = 0;
    for &b in captured[at..].iter().skip_while(|b| **b == b' ') {
        if b.is_ascii_digit() {
            value = value * 10 + (b - b'0') as u64;
            digits += 1;
        } else {
            break;
        }
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else if payload.len() <= 0xffff {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_split_frames_at_every_boundary() {
        let mut stream = Vec::new();
        stream.extend(server_frame(OP_TEXT, br#"{"event":"subscribed","channel":"bench"}"#));
        for i in 0..5u64 {
            let body =
                format!(r#"{{"event":"message","channel":"bench","data":{{"t":{i}00,"pad":"{}"}}}}"#, "x".repeat(300));
            stream.extend(server_frame(OP_TEXT, body.as_bytes()));
        }
        stream.extend(server_frame(OP_PING, b"hi"));
        stream.extend(server_frame(OP_TEXT, &vec![b'y'; 70_000]));
        for split in 1..40 {
            let mut parser = Parser::new(2);
            let (mut data, mut stamps, mut pings, mut big) = (Vec::new(), Vec::new(), 0, 0);
            for chunk in stream.chunks(split) {
                parser
                    .feed(chunk, &mut |f| {
                        if f.opcode == OP_PING {
                            pings += 1;
                            return After::Continue;
                        }
                        if parser_is_subscribed(f) {
                            return After::StartCounting;
                        }
                        data.push(f.index);
                        if let Some(t) = f.captured.and_then(timestamp) {
                            stamps.push(t);
                        }
                        if f.index == 5 {
                            big += 1;
                        }
                        After::Continue
                    })
                    .expect("parse");
            }
            assert_eq!(data, vec![0, 1, 2, 3, 4, 5], "split {split}");
            assert_eq!(stamps, vec![100, 300], "every 2nd message is sampled (split {split})");
            assert_eq!((pings, big), (1, 1));
        }
    }

    fn parser_is_subscribed(f: &Frame<'_>) -> bool {
        f.captured.is_some_and(|c| find(c, b"\"subscribed\"").is_some())
    }

    #[test]
    fn masks_frames() {
        let mut out = Vec::new();
        Masker::new(7).frame(&mut out, OP_TEXT, b"hello");
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x85);
        let key = &out[2..6];
        let unmasked: Vec<u8> = out[6..].iter().enumerate().map(|(i, b)| b ^ key[i & 3]).collect();
        assert_eq!(unmasked, b"hello");
    }

    #[test]
    fn refuses_non_loopback_targets() {
        assert!(Target::parse("ws://10.0.0.1:80/").is_err());
        assert!(Target::parse("ws://example.com:80/").is_err());
        let t = Target::parse("ws://127.0.0.1:9501?x=1").expect("loopback");
        assert_eq!(t.path, "/?x=1");
        assert_eq!(Target::parse("ws://localhost:1/ws").expect("localhost").path, "/ws");
        assert_eq!(t.with_query("token=a").path, "/?x=1&token=a");
    }

    #[test]
    fn finds_timestamps_with_or_without_a_space() {
        assert_eq!(timestamp(br#"{"data":{"t": 42,"x":1}}"#), Some(42));
        assert_eq!(timestamp(br#"{"data":{"t":7}}"#), Some(7));
        assert_eq!(timestamp(br#"{"data":{}}"#), None);
    }
}
