//! WebSocket framing on an upgraded socket (RFC 6455, server side): client frames in, server frames out.
//!
//! Why not tokio-tungstenite for this: an idle connection is most of what a server holds, and tungstenite keeps a
//! read buffer, a write buffer and its codec state per connection for as long as it lives. Here a connection
//! keeps no buffer while idle: reads go into one scratch buffer per worker thread, and only the bytes of a frame
//! still in flight (or of a fragmented message) are copied into the connection's own `pending` buffer, which is
//! released again once it is parsed. Writes take the outbox's shared payloads as they are: each frame's 2–10
//! header bytes are built at write time and the whole batch goes out in one write, gathered into a buffer of the
//! worker thread's when it is small (one `writev` of shared payloads when it is large), never into a
//! per-connection buffer. tungstenite still does the handshake's accept key and provides `Utf8Bytes`.
//!
//! What is checked, as tungstenite did (and tests/test_robustness.py checks each one over a real socket):
//! client frames must be masked, RSV bits zero, opcodes known, control frames short (≤ 125 bytes) and unfragmented,
//! continuation frames only inside a fragmented message (→ 1002); a message larger than `max_message_size` → 1009,
//! checked on the length header before its payload is read; text that is not UTF-8 → 1007.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes read from a socket at once. One buffer per thread, shared by every connection the thread polls.
const SCRATCH_SIZE: usize = 16 * 1024;
/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;
/// The most text frames one [`WsConn::poll_write_frames`] takes (one write; as `writev` slices, Linux allows 1,024).
pub const MAX_FRAMES_PER_WRITE: usize = 64;
/// Writes up to this size are gathered into one buffer first (see [`WsConn::poll_write_frames`]).
const GATHER_BYTES: usize = 32 * 1024;

thread_local! {
    /// The gather buffer of [`WsConn::poll_write_frames`]: one per runtime thread, not per connection.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    Ping(Bytes),
    Pong,
    /// The client's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The client broke the framing rules: close with 1002.
    Protocol(&'static str),
    /// A message over `max_message_size`: close with 1009.
    TooBig,
    /// A text message that is not UTF-8: close with 1007.
    InvalidUtf8,
    /// The socket failed or hit EOF: nothing can be sent any more.
    Gone,
}

/// One upgraded connection's socket.
pub struct WsConn<S> {
    stream: S,
    /// Bytes read and not yet parsed, from `start`: part of a frame, or frames after the one last returned.
    pending: Vec<u8>,
    start: usize,
    /// The opcode and payload so far of a fragmented message (boxed: rare, and it would size every connection).
    fragments: Option<Box<(u8, Vec<u8>)>>,
    /// u32, so it packs with `torn` into one word of every connection: the setting is at most 4 GiB - 1 (config.py).
    max_message_size: u32,
    /// An async write (a close frame; data frames go through `poll_write_frames`) was cut off by its timeout after
    /// part of the frame went out: the stream is mid-frame, so nothing more may be written.
    torn: bool,
}

/// One parsed frame header; the payload follows it in the buffer, already unmasked.
struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsConn<S> {
    /// `leftover`: bytes the client sent after its upgrade request, read with it.
    pub fn new(stream: S, leftover: Vec<u8>, max_message_size: usize) -> Self {
        let max_message_size = u32::try_from(max_message_size).unwrap_or(u32::MAX);
        WsConn { stream, pending: leftover, start: 0, fragments: None, max_message_size, torn: false }
    }

    /// The next message or control frame. Cancel-safe: bytes read are kept in `self` until they are returned.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// The next message or control frame, or Pending (the task is woken when the socket has more bytes).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, ReadError>> {
        loop {
            if let Some(incoming) = self.parse_pending()? {
                return Poll::Ready(Ok(incoming));
            }
            ready!(self.poll_read_more(cx))?;
        }
    }

    /// Read what the socket has into the thread's scratch buffer and append it to `pending`.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ReadError>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            match ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {
                    self.pending.extend_from_slice(buf.filled());
                    Poll::Ready(Ok(()))
                }
                _ => Poll::Ready(Err(ReadError::Gone)),
            }
        })
    }

    /// Parse frames from `pending` until one completes a message (or is a control frame), or the bytes run out.
    fn parse_pending(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(header) = parse_header(&self.pending[self.start..], self.max_message_size as usize)? else {
                self.compact();
                return Ok(None);
            };
            let frame_start = self.start + header.header_len;
            let frame_end = frame_start + header.payload_len;
            if self.pending.len() < frame_end {
                self.compact();
                return Ok(None);
            }
            let mask: [u8; 4] = self.pending[frame_start - 4..frame_start].try_into().expect("4 bytes");
            let payload = &mut self.pending[frame_start..frame_end];
            unmask(payload, mask);
            self.start = frame_end;
            let payload = &self.pending[frame_start..frame_end];
            let incoming = match header.opcode {
                opcode::PING => Some(Incoming::Ping(Bytes::copy_from_slice(payload))),
                opcode::PONG => Some(Incoming::Pong),
                opcode::CLOSE => Some(Incoming::Close(close_code(payload)?)),
                opcode::CONTINUATION => {
                    let Some(fragments) = &mut self.fragments else {
                        return Err(ReadError::Protocol("a continuation frame outside a fragmented message"));
                    };
                    let data = &mut fragments.1;
                    if data.len() + payload.len() > self.max_message_size as usize {
                        return Err(ReadError::TooBig);
                    }
                    data.extend_from_slice(payload);
                    match self.fragments.take() {
                        Some(fragments) if header.fin => {
                            let (opcode, data) = *fragments;
                            Some(message(opcode, data)?)
                        }
                        unfinished => {
                            self.fragments = unfinished;
                            None
                        }
                    }
                }
                opcode => {
                    if self.fragments.is_some() {
                        return Err(ReadError::Protocol("a new message inside a fragmented one"));
                    }
                    if header.fin {
                        Some(message(opcode, payload.to_vec())?)
                    } else {
                        self.fragments = Some(Box::new((opcode, payload.to_vec())));
                        None
                    }
                }
            };
            if let Some(incoming) = incoming {
                if self.start == self.pending.len() {
                    self.compact();
                }
                return Ok(Some(incoming));
            }
        }
    }

    /// Drop the parsed bytes, and the buffer once it holds nothing, so an idle connection keeps none. (A busy one
    /// pays a malloc per read for it, which is small next to the read's syscall.)
    fn compact(&mut self) {
        if self.start == self.pending.len() {
            self.pending = Vec::new();
        } else if self.start > 0 {
            self.pending.drain(..self.start);
        }
        self.start = 0;
    }

    /// One write of `controls` (whole control frames, already encoded) followed by a text frame per payload,
    /// less the first `skip` bytes of that sequence (written by earlier calls). Returns the bytes this call wrote;
    /// the caller calls again with a larger `skip` until all are written.
    ///
    /// Up to [`GATHER_BYTES`] in all, the frames are copied into one buffer (per thread) and written with one
    /// `write`: the kernel copies a `writev` slice by slice, and for ~16 frames of ~200 bytes (32 slices with the
    /// headers) that cost more than the copy here (measured: ~40 ns less CPU per delivered frame at a window of
    /// 16). Larger writes go as `writev` slices, the payloads shared, without a copy.
    pub fn poll_write_frames(
        &mut self,
        cx: &mut Context<'_>,
        controls: &[u8],
        payloads: &[&[u8]],
        skip: usize,
    ) -> Poll<io::Result<usize>> {
        assert!(payloads.len() <= MAX_FRAMES_PER_WRITE, "at most {MAX_FRAMES_PER_WRITE} frames per write");
        let total = controls.len() + payloads.iter().map(|payload| text_frame_len(payload.len())).sum::<usize>();
        let written = if total <= GATHER_BYTES {
            ready!(GATHER.with_borrow_mut(|buffer| {
                buffer.clear();
                buffer.extend_from_slice(controls);
                push_text_frames(buffer, payloads.iter().copied());
                Pin::new(&mut self.stream).poll_write(cx, &buffer[skip..])
            }))?
        } else {
            let mut headers = [[0u8; 10]; MAX_FRAMES_PER_WRITE];
            let mut slices = [IoSlice::new(&[]); 1 + 2 * MAX_FRAMES_PER_WRITE];
            let mut count = 0;
            if !controls.is_empty() {
                slices[0] = IoSlice::new(controls);
                count = 1;
            }
            count += text_frame_slices(payloads, &mut headers, &mut slices[count..]);
            let mut slices = &mut slices[..count];
            IoSlice::advance_slices(&mut slices, skip);
            ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, slices))?
        };
        if written == 0 && skip < total {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        Poll::Ready(Ok(written))
    }

    /// Flush the stream (a no-op for a TCP socket; kept for other streams).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Write one control frame (ping, pong or close).
    async fn write_control(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(2 + payload.len());
        push_control(&mut frame, opcode, payload);
        self.write_all_vectored(&mut [IoSlice::new(&frame)]).await
    }

    /// Send a close frame: the code (none to echo a client close that had none) and a short reason.
    pub async fn close(&mut self, code: Option<u16>, reason: &str) -> io::Result<()> {
        let mut payload = Vec::with_capacity(2 + reason.len());
        if let Some(code) = code {
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
        }
        self.write_control(opcode::CLOSE, &payload).await
    }

    async fn write_all_vectored(&mut self, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
        if self.torn {
            return Err(io::Error::other("an earlier write was cut off mid-frame"));
        }
        while !slices.is_empty() {
            let written = self.stream.write_vectored(slices).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, written);
            // Dropped at the next await, this write would leave the stream mid-frame.
            self.torn = !slices.is_empty();
        }
        self.stream.flush().await
    }
}

/// The header at the start of `buf`, or None while it is incomplete. Checks what can be checked from it alone.
fn parse_header(buf: &[u8], max_message_size: usize) -> Result<Option<Header>, ReadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (first, second) = (buf[0], buf[1]);
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    if first & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits set without an extension"));
    }
    let is_control = opcode & 0x08 != 0;
    match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY | opcode::CLOSE | opcode::PING | opcode::PONG => {}
        _ => return Err(ReadError::Protocol("unknown opcode")),
    }
    let (length, length_bytes) = match second & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else { return Ok(None) };
            (u64::from(u16::from_be_bytes(bytes.try_into().expect("2 bytes"))), 2)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            (u64::from_be_bytes(bytes.try_into().expect("8 bytes")), 8)
        }
        short => (u64::from(short), 0),
    };
    if is_control && (!fin || length > 125) {
        return Err(ReadError::Protocol("control frames must be unfragmented and at most 125 bytes"));
    }
    if length > max_message_size as u64 {
        return Err(ReadError::TooBig);
    }
    // After the size check, as tungstenite did: a huge unmasked frame gets 1009.
    if second & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let header_len = 2 + length_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    debug_assert!(header_len <= MAX_HEADER);
    Ok(Some(Header { fin, opcode, header_len, payload_len: length as usize }))
}

/// A complete data message.
fn message(opcode: u8, data: Vec<u8>) -> Result<Incoming, ReadError> {
    if opcode == opcode::TEXT {
        String::from_utf8(data).map(Incoming::Text).map_err(|_| ReadError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(data))
    }
}

/// The status code of a client's close frame: none, or two bytes and a UTF-8 reason.
fn close_code(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("a close frame with a one-byte payload")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            // RFC 6455 7.4: 1000-1003, 1007-1011 and 3000-4999 may be sent; 1004-1006, 1015 and others may not.
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(ReadError::Protocol("a close frame with an invalid status code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// A server frame's header (never masked) into `out`: FIN, the opcode and the payload length. Returns its length.
fn encode_header(out: &mut [u8; 10], opcode: u8, len: usize) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The bytes a text frame with a payload of `len` bytes takes on the wire.
pub fn text_frame_len(len: usize) -> usize {
    encode_header(&mut [0; 10], opcode::TEXT, len) + len
}

/// Append a text frame per payload (its header, then the payload) to `out`: publications encoded once, for
/// writes that take one contiguous buffer.
pub fn push_text_frames<'a>(out: &mut Vec<u8>, payloads: impl IntoIterator<Item = &'a [u8]>) {
    for payload in payloads {
        let mut header = [0; 10];
        let len = encode_header(&mut header, opcode::TEXT, payload.len());
        out.extend_from_slice(&header[..len]);
        out.extend_from_slice(payload);
    }
}

/// A text frame per payload, as `writev` slices: each header (built into `headers`, one per payload) followed by
/// its payload, shared, without a copy. Fills the first 2 × `payloads.len()` of `slices` and returns that count.
fn text_frame_slices<'a>(payloads: &[&'a [u8]], headers: &'a mut [[u8; 10]], slices: &mut [IoSlice<'a>]) -> usize {
    for ((payload, header), pair) in payloads.iter().zip(headers).zip(slices.chunks_exact_mut(2)) {
        let len = encode_header(header, opcode::TEXT, payload.len());
        let header: &'a [u8; 10] = header;
        pair[0] = IoSlice::new(&header[..len]);
        pair[1] = IoSlice::new(payload);
    }
    2 * payloads.len()
}

/// Append a control frame (at most 125 bytes of payload, as RFC 6455 requires of control frames).
fn push_control(out: &mut impl Extend<u8>, opcode: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(125)];
    let mut header = [0; 10];
    let len = encode_header(&mut header, opcode, payload.len());
    out.extend(header[..len].iter().chain(payload).copied());
}

/// A server's heartbeat ping: FIN, the ping opcode, no payload.
pub const PING_FRAME: [u8; 2] = [0x80 | opcode::PING, 0];

/// Append the pong that answers a ping with this payload.
pub fn push_pong(out: &mut impl Extend<u8>, payload: &[u8]) {
    push_control(out, opcode::PONG, payload);
}

/// XOR the payload with the client's mask, a word at a time where it can.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes((&*chunk).try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![first];
        match payload.len() {
            len @ 0..=125 => frame.push(0x80 | len as u8),
            len @ 126..=65535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    /// Everything a server parses from `input` (written 3 bytes at a time, then EOF), up to the first error.
    async fn read_all(input: Vec<u8>, max: usize) -> Vec<Result<Incoming, String>> {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            // A few bytes at a time: frames arrive split at every possible point.
            for chunk in input.chunks(3) {
                if client.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut conn = WsConn::new(server, Vec::new(), max);
        let mut out = Vec::new();
        loop {
            match conn.next().await {
                Ok(incoming) => out.push(Ok(incoming)),
                Err(ReadError::Gone) => return out,
                Err(error) => {
                    out.push(Err(format!("{error:?}")));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn messages_split_anywhere_and_fragmented_come_out_whole() {
        let mut input = client_frame(0x81, b"hello");
        input.extend(client_frame(0x01, b"frag"));
        input.extend(client_frame(0x89, b"p")); // a ping between fragments is allowed
        input.extend(client_frame(0x80, "mented \u{e9}".as_bytes()));
        input.extend(client_frame(0x82, &[0, 1, 2]));
        input.extend(client_frame(0x81, &vec![b'x'; 300]));
        input.extend(client_frame(0x88, &[0x03, 0xE8, b'b', b'y', b'e']));
        let out = read_all(input, 1000).await;
        assert_eq!(
            out,
            vec![
                Ok(Incoming::Text("hello".into())),
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Text("fragmented \u{e9}".into())),
                Ok(Incoming::Binary(vec![0, 1, 2])),
                Ok(Incoming::Text("x".repeat(300))),
                Ok(Incoming::Close(Some(1000))),
            ]
        );
    }

    #[tokio::test]
    async fn framing_violations_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\x81\x05hello".to_vec(), "Protocol"),            // unmasked
            (client_frame(0xC1, b"x"), "Protocol"),             // RSV1
            (client_frame(0x83, b"x"), "Protocol"),             // unknown opcode
            (client_frame(0x09, b"x"), "Protocol"),             // fragmented ping
            (client_frame(0x89, &[0; 126]), "Protocol"),        // long ping
            (client_frame(0x80, b"x"), "Protocol"),             // continuation without a start
            (client_frame(0x81, &[0xff, 0xfe]), "InvalidUtf8"), // not UTF-8
            (client_frame(0x81, &[b'x'; 101]), "TooBig"),       // over max
            (client_frame(0x88, &[0x03]), "Protocol"),          // one-byte close
            (client_frame(0x88, &[0x03, 0xED]), "Protocol"),    // 1005 may not be sent
            ([client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(), "Protocol"), // new message mid-fragment
            ([client_frame(0x01, &[b'a'; 60]), client_frame(0x80, &[b'b'; 60])].concat(), "TooBig"),
        ];
        for (input, expected) in cases {
            let out = read_all(input.clone(), 100).await;
            let last = out.last().cloned_error();
            assert!(last.starts_with(expected), "{input:?}: got {out:?}");
        }
        // A huge length header is refused before any payload is read.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(read_all(huge, 100).await.last().cloned_error().starts_with("TooBig"));
    }

    trait LastError {
        fn cloned_error(self) -> String;
    }

    impl LastError for Option<&Result<Incoming, String>> {
        fn cloned_error(self) -> String {
            match self {
                Some(Err(error)) => error.clone(),
                other => format!("no error: {other:?}"),
            }
        }
    }

    /// Write text frames the way the connection's writer does: `poll_write_frames` until all bytes are out.
    async fn write_texts<S: AsyncRead + AsyncWrite + Unpin>(
        conn: &mut WsConn<S>,
        payloads: &[&[u8]],
    ) -> io::Result<()> {
        let total: usize = payloads.iter().map(|payload| text_frame_len(payload.len())).sum();
        let mut written = 0;
        while written < total {
            written += poll_fn(|cx| conn.poll_write_frames(cx, &[], payloads, written)).await?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn server_frames_are_written_unmasked_with_their_lengths() {
        let (mut client, server) = tokio::io::duplex(1 << 12);
        let mut conn = WsConn::new(server, Vec::new(), 1000);
        let long = vec![b'y'; 70_000];
        let ping = PING_FRAME;
        let expected_len = 2 + 4 + 4 + 200 + 10 + 70_000;
        let reader = tokio::spawn(async move {
            let mut read = vec![0; expected_len];
            client.read_exact(&mut read).await.unwrap();
            read
        });
        // The first call writes the ping and part of the frames (the pipe holds 4 KiB); the rest follow.
        let payloads: [&[u8]; 3] = [b"ab", &[b'z'; 200], &long];
        let mut written = poll_fn(|cx| conn.poll_write_frames(cx, &ping, &payloads, 0)).await.unwrap();
        assert!(written < expected_len);
        while written < expected_len {
            written += poll_fn(|cx| conn.poll_write_frames(cx, &ping, &payloads, written)).await.unwrap();
        }
        let read = reader.await.unwrap();
        assert_eq!(&read[..6], b"\x89\x00\x81\x02ab");
        assert_eq!(&read[6..10], &[0x81, 126, 0, 200]);
        assert_eq!(&read[210..220], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert!(read[220..].iter().all(|&b| b == b'y'));
        assert_eq!(text_frame_len(70_000), 70_010);
    }

    #[tokio::test]
    async fn small_frames_gathered_into_one_write_resume_where_the_pipe_stopped() {
        // 30 frames of 200 bytes and a ping: ~6 KiB, under GATHER_BYTES, so they go through the gather buffer; the
        // 4 KiB pipe takes part of them, and each later call must resume exactly where the last one stopped.
        let (mut client, server) = tokio::io::duplex(1 << 12);
        let mut conn = WsConn::new(server, Vec::new(), 1000);
        let bodies: Vec<Vec<u8>> = (0..30u8).map(|i| vec![b'a' + i % 26; 200]).collect();
        let payloads: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        let expected_len = 2 + 30 * (4 + 200);
        assert!(expected_len <= GATHER_BYTES);
        let reader = tokio::spawn(async move {
            let mut read = vec![0; expected_len];
            client.read_exact(&mut read).await.unwrap();
            read
        });
        let mut written = poll_fn(|cx| conn.poll_write_frames(cx, &PING_FRAME, &payloads, 0)).await.unwrap();
        assert!(written < expected_len, "the pipe cannot take it all at once");
        while written < expected_len {
            written += poll_fn(|cx| conn.poll_write_frames(cx, &PING_FRAME, &payloads, written)).await.unwrap();
        }
        let read = reader.await.unwrap();
        assert_eq!(&read[..2], &PING_FRAME);
        for (i, frame) in read[2..].chunks(204).enumerate() {
            assert_eq!(&frame[..4], &[0x81, 126, 0, 200], "frame {i}'s header");
            assert!(frame[4..].iter().all(|&b| b == b'a' + i as u8 % 26), "frame {i}'s payload in its place");
        }
    }

    #[tokio::test]
    async fn a_write_cut_off_mid_frame_refuses_further_writes() {
        // A peer that reads nothing and a 16-byte pipe: a close frame with a long reason goes out in part.
        let (_client, server) = tokio::io::duplex(16);
        let mut conn = WsConn::new(server, Vec::new(), 1000);
        let reason = "x".repeat(100);
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), conn.close(Some(1000), &reason)).await;
        assert!(cut.is_err(), "the write should still be waiting for the peer");
        assert!(conn.close(Some(1000), "").await.is_err(), "a close frame now would land inside the first one");
        // A write dropped before any byte went out leaves the stream whole.
        let (_client, server) = tokio::io::duplex(1024);
        let mut conn = WsConn::new(server, Vec::new(), 1000);
        write_texts(&mut conn, &[&[b'y'; 1020]]).await.unwrap(); // 4 header bytes + 1,020: the pipe is full
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), conn.close(Some(1000), "")).await;
        assert!(cut.is_err());
        assert!(!conn.torn, "nothing of the close frame could be written");
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [1, 2, 3, 4];
        for len in 0..20 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut fast = original.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = original.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(fast, slow);
        }
    }
}
