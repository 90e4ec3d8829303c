//! Stage: fan-out writer, socket side. Moves a connection's queued frames from its [`Outbox`] to the socket: up to
//! [`MAX_FRAMES_PER_WRITE`] frames per `writev`, as many batches as the socket takes, all in one poll of the
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
            if let Some(unsent) = &mut self.unsent {
                while unsent.written < unsent.total {
                    let payloads = payloads(&unsent.frames);
                    let payloads = &payloads[..unsent.frames.len()];
                    unsent.written += ready!(ws.poll_write_frames(cx, &unsent.controls, payloads, unsent.written))?;
                }
                let unsent = self.unsent.take().expect("checked above");
                written(&unsent.frames, rx, hub);
                rx.outbox().set_stalled_since(NOT_STALLED);
                continue;
            }
            // A fresh batch. When the socket takes it whole (the usual case) nothing is kept; otherwise the loop
            // comes back to it above, which returns Pending until the socket has room.
            let wrote = BATCH.with_borrow_mut(|batch| -> io::Result<bool> {
                if take_queued {
                    rx.try_recv_many(batch, MAX_FRAMES_PER_WRITE);
                }
                if batch.is_empty() && self.controls.is_empty() {
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

/// The payloads of up to [`MAX_FRAMES_PER_WRITE`] frames, as slices for `writev`.
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
