//! Stage: fan-out writer, socket side. Moves a connection's queued frames from its [`Outbox`] to the socket: up to
//! [`MAX_FRAMES_PER_WRITE`] frames per write, as many batches as the socket takes, all in one poll of the
//! connection task, so a burst of publications costs one wake-up and a few syscalls per connection.
//!
//! Written from `poll` rather than as an `async fn`: the batch is gathered in a buffer per worker thread and the
//! slices and headers live on the stack, so a connection whose writes go through (nearly always) holds nothing
//! between wake-ups, and no future is allocated per batch. Only a batch the socket does not take whole is kept,
//! in the connection, until the socket has room; while it waits the outbox records since when
//! ([`Outbox::set_stalled_since`]), for the idle-timeout rule.
//!
//! [`Outbox`]: super::outbox::Outbox
//! [`Outbox::set_stalled_since`]: super::outbox::Outbox::set_stalled_since

use std::cell::RefCell;
use std::io;
use std::task::{ready, Context, Poll};

use thin_vec::ThinVec;
use tokio::io::{AsyncRead, AsyncWrite};

use super::outbox::{OutboxReceiver, Outgoing, NOT_STALLED};
use super::wire::{self, WsConn, MAX_FRAMES_PER_WRITE};
use crate::hub::Hub;

thread_local! {
    /// The batch being written, reused by every connection the worker thread polls.
    static BATCH: RefCell<Vec<Outgoing>> = RefCell::new(Vec::with_capacity(MAX_FRAMES_PER_WRITE));
}

/// One connection's writer state: control frames to send, and a batch the socket has not taken whole.
#[derive(Default)]
pub struct Writer {
    /// Encoded control frames (pongs, a heartbeat ping) for the next write, ahead of queued frames. One word, and
    /// freed once written: nearly every connection has none nearly all the time.
    controls: ThinVec<u8>,
    /// Boxed: rare, and it would size every connection.
    unsent: Option<Box<Unsent>>,
}

/// A batch partly written: the socket was full.
struct Unsent {
    controls: ThinVec<u8>,
    frames: Vec<Outgoing>,
    /// Bytes of the batch on the wire (control frames, then each frame's header and payload).
    total: usize,
    written: usize,
}

impl Writer {
    /// Send a heartbeat ping with the next write (first, and once however often asked).
    pub fn ping(&mut self) {
        if !self.controls.starts_with(&wire::PING_FRAME) {
            self.controls.splice(0..0, wire::PING_FRAME);
        }
    }

    /// Answer a client's ping with the next write. When several pings wait for an answer only the latest is
    /// answered (RFC 6455 5.5.3 allows it), so a client that pings and never reads cannot grow this past one pong.
    pub fn pong(&mut self, payload: &[u8]) {
        let keep = if self.controls.starts_with(&wire::PING_FRAME) { wire::PING_FRAME.len() } else { 0 };
        self.controls.truncate(keep);
        wire::push_pong(&mut self.controls, payload);
    }

    /// Whether a batch is waiting for room in the socket.
    pub fn is_stalled(&self) -> bool {
        self.unsent.is_some()
    }

    /// Before a close: forget what is not yet on the wire, except a batch cut off mid-frame (a close frame
    /// written now would be read as part of its payload, so that batch must be completed first).
    pub fn discard_unless_mid_frame(&mut self) {
        self.controls = ThinVec::new();
        if self.unsent.as_ref().is_some_and(|unsent| unsent.written == 0) {
            self.unsent = None;
        }
    }

    /// Write the waiting batch, then (with `take_queued`) everything queued in the outbox, until it is empty
    /// (Ready) or the socket is full (Pending, with the task registered for room).
    pub fn poll_flush<S>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut WsConn<S>,
        rx: &mut OutboxReceiver,
        hub: &Hub,
        take_queued: bool,
    ) -> Poll<io::Result<()>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            if self.unsent.is_none() {
                // A direct write the socket took only part of (Outbox::write_or_push): complete it first.
                if let Some((frames, written)) = rx.take_torn() {
                    let total = frames.iter().map(|outgoing| wire::text_frame_len(outgoing.frame.len())).sum();
                    self.unsent = Some(Box::new(Unsent { controls: ThinVec::new(), frames, total, written }));
                }
            }
            if let Some(unsent) = &mut self.unsent {
                while unsent.written < unsent.total {
                    let payloads = payloads(&unsent.frames);
                    let payloads = &payloads[..unsent.frames.len()];
                    unsent.written += ready!(ws.poll_write_frames(cx, &unsent.controls, payloads, unsent.written))?;
                }
                let unsent = self.unsent.take().expect("checked above");
                written(&unsent.frames, rx, hub);
                rx.outbox().set_stalled_since(NOT_STALLED);
                rx.end_write();
                continue;
            }
            // A fresh batch. When the socket takes it whole (the usual case) nothing is kept; otherwise the loop
            // comes back to it above, which returns Pending until the socket has room.
            let wrote = BATCH.with_borrow_mut(|batch| -> io::Result<bool> {
                // Marks a write in progress (no direct writes) until end_write, whatever is taken.
                rx.try_recv_many(batch, if take_queued { MAX_FRAMES_PER_WRITE } else { 0 });
                if batch.is_empty() && self.controls.is_empty() {
                    rx.end_write();
                    return Ok(false);
                }
                let slices = payloads(batch);
                let slices = &slices[..batch.len()];
                let total = self.controls.len() + slices.iter().map(|p| wire::text_frame_len(p.len())).sum::<usize>();
                let written_now = match ws.poll_write_frames(cx, &self.controls, slices, 0) {
                    Poll::Ready(result) => result.inspect_err(|_| batch.clear())?,
                    Poll::Pending => 0,
                };
                if written_now == total {
                    written(batch, rx, hub);
                    batch.clear();
                    self.controls = ThinVec::new();
                    rx.end_write();
                } else {
                    let controls = std::mem::take(&mut self.controls);
                    let frames = batch.split_off(0); // a new Vec: the thread's buffer keeps its capacity
                    self.unsent = Some(Box::new(Unsent { controls, frames, total, written: written_now }));
                    rx.outbox().set_stalled_since(hub.live.now());
                }
                Ok(true)
            })?;
            if !wrote {
                break;
            }
        }
        ws.poll_flush(cx)
    }
}

/// The payloads of up to [`MAX_FRAMES_PER_WRITE`] frames, as slices for [`WsConn::poll_write_frames`].
fn payloads(frames: &[Outgoing]) -> [&[u8]; MAX_FRAMES_PER_WRITE] {
    let mut slices: [&[u8]; MAX_FRAMES_PER_WRITE] = [&[]; MAX_FRAMES_PER_WRITE];
    for (slot, outgoing) in slices.iter_mut().zip(frames) {
        *slot = outgoing.frame.as_bytes();
    }
    slices
}

/// Frames are on the socket: free their room in the outbox and record sampled publish latencies.
fn written(frames: &[Outgoing], rx: &OutboxReceiver, hub: &Hub) {
    let mut bytes = 0;
    for outgoing in frames {
        bytes += outgoing.frame.len();
        // Written means handed to the socket: only now does a sampled publish count this subscriber as done.
        if let Some(latency) = outgoing.timer.as_ref().and_then(|timer| timer.written()) {
            hub.stats.observe_publish_latency(latency);
        }
    }
    rx.outbox().written(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::outbox::{direct, Outbox};
    use std::future::poll_fn;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tungstenite::Utf8Bytes;

    /// Direct writes (Outbox::write_or_push) into a socket nobody reads fill it; then frames queue, and one may be
    /// torn (only part of it written directly). Once the client reads, the connection's writer must complete that
    /// frame and send the rest in order: the client sees whole frames, each once, in the order they were given.
    #[tokio::test]
    async fn direct_writes_a_full_socket_and_a_torn_frame_reach_the_client_whole_and_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (outbox, mut rx) = Outbox::new(1, usize::MAX, 0);
        rx.allow_direct(direct::Socket::new(&server).unwrap());
        let mut ws = WsConn::new(server, Vec::new(), 1 << 20);
        let hub = Hub::new(1);

        let frame = |i: usize| Utf8Bytes::from(format!("{i:08}{}", "x".repeat(60_000)));
        // As the hub does it: the frame encoded once, for the direct write.
        let write_or_push = |frame: Utf8Bytes| {
            let mut bytes = Vec::new();
            wire::push_text_frames(&mut bytes, [frame.as_bytes()]);
            outbox.write_or_push(frame, None, &bytes)
        };
        assert!(write_or_push(Utf8Bytes::from_static("first")));
        assert!(!rx.has_queued(), "an idle socket takes a frame directly");
        let mut sent = 0;
        while !rx.has_queued() {
            assert!(sent < 10_000, "the socket never filled");
            assert!(write_or_push(frame(sent)));
            sent += 1;
        }
        for _ in 0..3 {
            assert!(write_or_push(frame(sent)), "queued behind the full socket");
            sent += 1;
        }

        let mut writer = Writer::default();
        let reading = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            // "first" (7 bytes), then `sent` frames of a 4-byte header and 60,008 bytes of payload.
            let expected = 7 + sent * (4 + 60_008);
            while bytes.len() < expected {
                let n = client.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the server closed");
                bytes.extend_from_slice(&chunk[..n]);
            }
            (bytes, sent)
        });
        poll_fn(|cx| writer.poll_flush(cx, &mut ws, &mut rx, &hub, true)).await.unwrap();
        let (bytes, sent) = reading.await.unwrap();
        assert_eq!(&bytes[..7], b"\x81\x05first");
        let mut at = 7;
        for i in 0..sent {
            assert_eq!(&bytes[at..at + 2], &[0x81, 126], "frame {i}: a text frame with a 16-bit length");
            assert_eq!(u16::from_be_bytes(bytes[at + 2..at + 4].try_into().unwrap()), 60_008);
            assert_eq!(&bytes[at + 4..at + 12], format!("{i:08}").as_bytes(), "frame {i} in its place");
            at += 4 + 60_008;
        }
        assert_eq!(at, bytes.len());
        assert!(!rx.has_queued());
        assert_eq!(Arc::strong_count(&outbox), 2, "the test's handle and the receiver's");
    }

    #[test]
    fn waiting_control_frames_stay_one_ping_and_the_latest_pong() {
        let mut writer = Writer::default();
        for i in 0..1000u32 {
            writer.pong(&i.to_be_bytes());
        }
        writer.ping();
        writer.ping();
        writer.pong(b"last");
        assert_eq!(writer.controls, b"\x89\x00\x8a\x04last");
    }
}
