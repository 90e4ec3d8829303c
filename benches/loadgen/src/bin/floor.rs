//! `floor`: the least work a WebSocket server can do per delivery, to show what this machine allows.
//!
//! Not a server to use: it speaks just enough of the bench protocol (docs/benchmarks.md) for `loadgen latency`
//! (and `fanout`): the upgrade, `subscribe` → `{"event":"subscribed",...}`, and `publish` → one shared frame
//! written to every subscriber of the (single) channel. There is no event loop, no queue, no wake-up of a
//! connection task: each publication is handed to `--writers` threads that each own a share of the subscribers
//! and `write()` the frame to each in turn, blocking. One syscall per delivery is the floor for a frame that
//! every subscriber must get at once, so the latency it measures at a low rate (each write alone) bounds what any
//! server can reach on the same cores: the sweep over 1,000 sockets costs what 1,000 loopback writes cost.
//!
//!     floor --port 9100 --writers 2
//!
//! Reads are a blocking thread per connection (small stacks): they only see the subscribe frame and the
//! publisher's frames, so they cost nothing while the latency is measured.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use base64::Engine;

/// What each writer thread is sent: a new subscriber to own, or a frame to write to all it owns.
enum Work {
    Subscriber(TcpStream),
    Frame(Arc<Vec<u8>>),
}

struct Writers {
    queues: Vec<Sender<Work>>,
    next: Mutex<usize>,
}

impl Writers {
    fn start(count: usize) -> Writers {
        let queues = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::channel();
                thread::Builder::new().name("floor-writer".into()).spawn(move || write_loop(rx)).expect("thread");
                tx
            })
            .collect();
        Writers { queues, next: Mutex::new(0) }
    }

    /// Subscribers are dealt to the writers round robin, so each writes to its share.
    fn add(&self, stream: TcpStream) {
        let mut next = self.next.lock().expect("lock");
        let _ = self.queues[*next % self.queues.len()].send(Work::Subscriber(stream));
        *next += 1;
    }

    fn publish(&self, frame: Vec<u8>) {
        let frame = Arc::new(frame);
        for queue in &self.queues {
            let _ = queue.send(Work::Frame(Arc::clone(&frame)));
        }
    }
}

fn write_loop(rx: Receiver<Work>) {
    let mut subscribers: Vec<TcpStream> = Vec::new();
    while let Ok(work) = rx.recv() {
        match work {
            Work::Subscriber(stream) => subscribers.push(stream),
            // A subscriber whose write fails has gone: drop it.
            Work::Frame(frame) => subscribers.retain_mut(|stream| stream.write_all(&frame).is_ok()),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.to_string())
    };
    if args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: floor [--host 127.0.0.1] [--port 9100] [--writers 1]");
        return;
    }
    let host = arg("--host", "127.0.0.1");
    let port = arg("--port", "9100");
    let writers: usize = arg("--writers", "1").parse().expect("--writers N");
    let listener = TcpListener::bind(format!("{host}:{port}")).expect("bind");
    let writers = Arc::new(Writers::start(writers.max(1)));
    eprintln!("floor listening on ws://{host}:{port}/ ({} writer threads)", writers.queues.len());
    for stream in listener.incoming().flatten() {
        let writers = Arc::clone(&writers);
        let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            let _ = connection(stream, &writers);
        });
    }
}

fn connection(mut stream: TcpStream, writers: &Writers) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let key = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
    write!(
        stream,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    buf.drain(..end);
    loop {
        while let Some((opcode, payload, used)) = parse_frame(&buf) {
            buf.drain(..used);
            match opcode {
                0x8 => return Ok(()),
                0x1 if find(&payload, b"\"publish\"").is_some() => writers.publish(delivery(&payload)),
                0x1 if find(&payload, b"\"subscribe\"").is_some() => {
                    stream.write_all(&text_frame(br#"{"event":"subscribed","channel":"bench"}"#))?;
                    writers.add(stream.try_clone()?);
                }
                _ => {}
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `{"event":"publish","data":{"channel":C,"payload":P}}` → the frame of `{"event":"message","channel":C,"data":P}`
/// (the channel is always the bench's one).
fn delivery(publish: &[u8]) -> Vec<u8> {
    let start = find(publish, b"\"payload\":").map_or(0, |at| at + 10);
    let end = publish.len().saturating_sub(2).max(start);
    let mut json = br#"{"event":"message","channel":"bench","data":"#.to_vec();
    json.extend_from_slice(&publish[start..end]);
    json.push(b'}');
    text_frame(&json)
}

fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81];
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

/// One complete masked client frame at the start of `buf`: (opcode, unmasked payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        len => (len as usize, 2),
    };
    let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    at += 4;
    let payload = buf.get(at..at + len)?;
    let unmasked = payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Some((opcode, unmasked, at + len))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
