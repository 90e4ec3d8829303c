//! Stage: fan-out writer, producer side. Each connection's bounded outgoing queue.
//!
//! The hub pushes shared frames into a connection's [`Outbox`] without blocking and without touching the socket;
//! the connection task drains it. The bound is in bytes (`send_queue_bytes`): a subscriber that cannot keep up
//! passes it, is marked slow and is closed with 4100, so it never delays the others and never grows memory
//! without limit (the slow-consumer rule of centrifuge's writer.go).
//!
//! The outbox is also how the rest of the server signals a connection ([`Signal`]): the server is stopping, the
//! queue overflowed, a ping is due, the client has been silent too long. Those come from the hub and from the
//! sweeper (conn/sweep.rs), which looks at `last_heard` and `stalled_since` instead of each connection keeping a
//! timer of its own. Every signal and every frame wakes the connection task through one [`AtomicWaker`].
//!
//! Direct writes: a publication that comes far from the previous one on its channel (the hub decides) is written
//! to the socket by the publishing thread itself ([`Outbox::write_or_push`]) when the connection has nothing
//! queued and nothing being written, instead of waking the connection task to write it. The outbox's lock
//! orders the two writers: the publisher holds it across its one `write`; the task marks a write in progress
//! under it before taking frames, and clears the mark once they are all on the wire. A direct write the socket
//! takes only part of is left to the task to complete ([`OutboxReceiver::take_torn`]), before anything else.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Context;
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tungstenite::Utf8Bytes;

use crate::conn::wire;
use crate::stats::PublishTimer;

/// One queued frame; a sampled publication also carries its latency timer.
pub struct Outgoing {
    pub frame: Utf8Bytes,
    pub timer: Option<Arc<PublishTimer>>,
}

impl From<&(Utf8Bytes, Option<Arc<PublishTimer>>)> for Outgoing {
    fn from((frame, timer): &(Utf8Bytes, Option<Arc<PublishTimer>>)) -> Self {
        Outgoing { frame: frame.clone(), timer: timer.clone() }
    }
}

/// Connection id, unique within this process. The socket_id clients see is `"<node>.<ConnId>"`.
pub type ConnId = u64;

/// A queue that holds no memory while empty, unlike tokio's mpsc (which allocates a 32-slot block per channel,
/// ~1.4 KB per idle connection). Producers lock it briefly to push; the connection task drains it in batches.
///
/// The wake-up is one `AtomicWaker`, not a tokio `Notify`: only the connection task ever waits, so a waiter list
/// (a mutex and a list node per waiting future) is more than needed. Waking is one atomic swap.
pub struct Outbox {
    pub id: ConnId,
    queue: Mutex<Queue>,
    /// Wakes the connection task when frames arrive or a signal is raised. It registers, then looks at the queue
    /// and the signals again, so a push between its look and its registration is not missed.
    waker: AtomicWaker,
    queued_bytes: AtomicUsize,
    limit: usize,
    /// [`Signal`] bits raised for the connection task.
    signals: AtomicU8,
    /// Set when the connection task is gone: pushes are refused.
    closed: AtomicBool,
    /// The sweep tick at which the client was last heard from.
    last_heard: AtomicU32,
    /// The sweep tick at which a socket write found the socket full, or [`NOT_STALLED`].
    stalled_since: AtomicU32,
    /// The socket's descriptor, for direct writes; -1 when they are off (not a TCP socket, or the connection is
    /// ending). Only read and changed under the queue's lock (atomic so that it fits beside the fields above in
    /// what was padding: the whole outbox stays within jemalloc's 128-byte size class).
    direct_fd: AtomicI32,
}

/// The queued frames, and what decides whether a delivery may be written to the socket directly (see
/// [`Outbox::write_or_push`]).
#[derive(Default)]
struct Queue {
    frames: VecDeque<Outgoing>,
    /// The connection task has taken frames or control frames to write and has not finished writing them: nothing
    /// may be written directly meanwhile, or it would land among (or inside) them.
    writing: bool,
    /// A direct write that the socket took only part of: its first `torn_frames` frames, at the front of `frames`,
    /// have their first `torn_skip` bytes on the wire. The connection task completes them before anything else.
    torn_frames: u8,
    torn_skip: u32,
}

/// What the rest of the server tells a connection task, besides frames to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// The queue passed `send_queue_bytes`: close with 4100.
    Overflowed = 1,
    /// The server is stopping: send what is queued, then close with 1001.
    GoingAway = 2,
    /// Silent (or a write stuck) for `idle_timeout`: close.
    IdleTimeout = 4,
    /// Silent for `heartbeat_interval`: send a ping. Cleared by the connection task when it sends one.
    PingDue = 8,
    /// A ping went out and nothing was heard since: no second ping until the client speaks.
    Pinged = 16,
}

/// `stalled_since` when no write is waiting for room in the socket.
pub const NOT_STALLED: u32 = u32::MAX;

/// The consumer side, owned by the connection task. Dropping it closes the outbox to new frames.
pub struct OutboxReceiver {
    outbox: Arc<Outbox>,
}

/// Capacity above which a drained queue gives its memory back, so an idle connection after a burst is small.
const KEEP_CAPACITY: usize = 8;
/// A queue emptied by a batch this small is probably idle again (a reply, an occasional publication): it gives
/// its memory back too (160 bytes for the first four slots), while a busy one keeps its room between batches.
const IDLE_BATCH: usize = 2;

impl Outbox {
    /// An empty outbox; `now` is the current sweep tick (the connection counts as just heard from).
    pub fn new(id: ConnId, limit: usize, now: u32) -> (Arc<Self>, OutboxReceiver) {
        let outbox = Arc::new(Outbox {
            id,
            queue: Mutex::new(Queue::default()),
            waker: AtomicWaker::new(),
            queued_bytes: AtomicUsize::new(0),
            limit,
            signals: AtomicU8::new(0),
            closed: AtomicBool::new(false),
            last_heard: AtomicU32::new(now),
            stalled_since: AtomicU32::new(NOT_STALLED),
            direct_fd: AtomicI32::new(-1),
        });
        (Arc::clone(&outbox), OutboxReceiver { outbox })
    }

    /// Queue a frame. Returns false when it was not queued: the connection is gone or has been marked slow.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        let len = frame.len();
        self.enqueue(len, None, |frames| frames.push_back(Outgoing { frame, timer: None }))
    }

    /// Queue a publication's frame, which may carry a publish latency timer.
    pub fn push_timed(&self, frame: Utf8Bytes, timer: Option<&Arc<PublishTimer>>) -> bool {
        let len = frame.len();
        self.enqueue(len, None, |queue| queue.push_back(Outgoing { frame, timer: timer.cloned() }))
    }

    /// Queue several frames at once: one lock and at most one wake for the lot. All or nothing.
    pub fn push_many(&self, frames: &[(Utf8Bytes, Option<Arc<PublishTimer>>)]) -> bool {
        let len = frames.iter().map(|(frame, _)| frame.len()).sum();
        self.enqueue(len, None, |queue| queue.extend(frames.iter().map(Outgoing::from)))
    }

    /// Deliver a publication's frame: written to the socket here, on the caller's thread, when nothing is queued
    /// or being written (and the socket takes it), instead of waking the connection task to write it; queued
    /// otherwise. For publications that come far apart (the hub decides, [`crate::hub`]): there each frame is
    /// written alone either way, and the task's wake-up and poll cost about a sixth of the delivery's CPU.
    /// `wire` is the frame as it goes on the wire ([`wire::push_text_frames`]), encoded once for every subscriber.
    pub fn write_or_push(&self, frame: Utf8Bytes, timer: Option<&Arc<PublishTimer>>, wire: &[u8]) -> bool {
        debug_assert_eq!(wire.len(), wire::text_frame_len(frame.len()));
        let len = frame.len();
        self.enqueue(len, Some(Direct::One(wire, timer)), |queue| {
            queue.push_back(Outgoing { frame, timer: timer.cloned() })
        })
    }

    /// [`Self::write_or_push`] for several frames, all in one write or all queued; `wire` holds them all.
    pub fn write_or_push_many(&self, frames: &[(Utf8Bytes, Option<Arc<PublishTimer>>)], wire: &[u8]) -> bool {
        let len = frames.iter().map(|(frame, _)| frame.len()).sum();
        debug_assert_eq!(wire.len(), frames.iter().map(|(frame, _)| wire::text_frame_len(frame.len())).sum::<usize>());
        let direct = (frames.len() <= MAX_DIRECT_FRAMES).then_some(Direct::Many(frames, wire));
        self.enqueue(len, direct, |queue| queue.extend(frames.iter().map(Outgoing::from)))
    }

    /// The way frames enter: refuse them (false) when the connection is closed or slow, count `len` bytes against
    /// the bound (or mark the queue slow), write them to the socket when `direct` is given and the socket is free;
    /// otherwise `add` them to the queue under its lock.
    fn enqueue(&self, len: usize, direct: Option<Direct<'_>>, add: impl FnOnce(&mut VecDeque<Outgoing>)) -> bool {
        if self.is_overflowed() || self.closed.load(Ordering::Relaxed) {
            return false;
        }
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.limit {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.raise(Signal::Overflowed);
            return false;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let was_empty = queue.frames.is_empty();
        if let (Some(direct), true, false) = (direct, was_empty, queue.writing) {
            if self.write_directly(&mut queue, direct) {
                drop(queue);
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                return true;
            }
        }
        add(&mut queue.frames);
        drop(queue);
        // Only the push that makes the queue non-empty wakes the task: the task drains the queue until it is empty
        // (or the socket is full, and then the socket wakes it), so a later push is seen without a wake. This saves
        // the waker's atomics for all but the first frame of a burst.
        if was_empty {
            self.waker.wake();
        }
        true
    }

    /// One write of `direct`'s frames to the socket, under the queue's lock: the task cannot start a write
    /// meanwhile, nor turn direct writes off. True when the socket took them whole; when it took a part, that is
    /// recorded as torn for the task to complete, and the frames are to be queued as usual.
    fn write_directly(&self, queue: &mut Queue, direct: Direct<'_>) -> bool {
        let Some(socket) = direct::Socket::from_fd(self.direct_fd.load(Ordering::Relaxed)) else {
            return false;
        };
        let wire = match direct {
            Direct::One(wire, _) | Direct::Many(_, wire) => wire,
        };
        let written = socket.write(wire);
        if written == wire.len() {
            // Never the last count of a timer: the publish's placeholder is still in (PublishTimer::arm).
            let count = |timer: &Arc<PublishTimer>| {
                let _ = timer.written();
            };
            match direct {
                Direct::One(_, timer) => timer.into_iter().for_each(count),
                Direct::Many(frames, _) => frames.iter().filter_map(|(_, timer)| timer.as_ref()).for_each(count),
            }
            return true;
        }
        if written > 0 {
            // Part of a frame is on the wire: the task must complete it before writing anything else.
            queue.writing = true;
            queue.torn_frames = match direct {
                Direct::One(..) => 1,
                Direct::Many(frames, _) => frames.len() as u8,
            };
            queue.torn_skip = written as u32;
        }
        false
    }

    pub fn is_overflowed(&self) -> bool {
        self.signals.load(Ordering::Relaxed) & Signal::Overflowed as u8 != 0
    }

    /// Raise a signal and wake the connection task (once: raising it again while set does not wake).
    pub fn raise(&self, signal: Signal) {
        if self.signals.fetch_or(signal as u8, Ordering::Release) & signal as u8 == 0 {
            self.waker.wake();
        }
    }

    /// The signals raised so far, as [`Signal`] bits.
    pub fn signals(&self) -> u8 {
        self.signals.load(Ordering::Acquire)
    }

    /// The connection task sent the ping that was due: no other until the client is heard from. One atomic
    /// update, so the sweeper never sees neither bit set in between (and raises PingDue again).
    pub fn ping_sent(&self) {
        let sent = |signals: u8| Some(signals & !(Signal::PingDue as u8) | Signal::Pinged as u8);
        let _ = self.signals.fetch_update(Ordering::AcqRel, Ordering::Acquire, sent);
    }

    /// The client sent something at sweep tick `now`: it is alive, and may be pinged again after a silence.
    pub fn heard(&self, now: u32) {
        self.last_heard.store(now, Ordering::Relaxed);
        if self.signals.load(Ordering::Relaxed) & Signal::Pinged as u8 != 0 {
            self.signals.fetch_and(!(Signal::Pinged as u8), Ordering::Relaxed);
        }
    }

    pub fn last_heard(&self) -> u32 {
        self.last_heard.load(Ordering::Relaxed)
    }

    /// A write is waiting for room in the socket since tick `now` ([`NOT_STALLED`]: it finished).
    pub fn set_stalled_since(&self, now: u32) {
        self.stalled_since.store(now, Ordering::Relaxed);
    }

    pub fn stalled_since(&self) -> u32 {
        self.stalled_since.load(Ordering::Relaxed)
    }

    /// Called by the connection task once frames of `len` payload bytes have been handed to the socket.
    pub fn written(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    fn pop(&self) -> Option<Outgoing> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let item = queue.frames.pop_front();
        if queue.frames.is_empty() && queue.frames.capacity() > KEEP_CAPACITY {
            queue.frames.shrink_to(0);
        }
        item
    }

    /// Move up to `max` frames into `batch` under one lock, and mark a write in progress (until
    /// [`OutboxReceiver::end_write`]).
    fn pop_many(&self, batch: &mut Vec<Outgoing>, max: usize) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.writing = true;
        let take = queue.frames.len().min(max);
        batch.extend(queue.frames.drain(..take));
        if queue.frames.is_empty() && (take <= IDLE_BATCH || queue.frames.capacity() > KEEP_CAPACITY) {
            queue.frames.shrink_to(0);
        }
    }
}

impl OutboxReceiver {
    /// The next frame, waiting for one. Never returns None while the receiver exists; the Option keeps the
    /// channel-like signature the connection loop uses.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        poll_fn(|cx| {
            if let Some(item) = self.outbox.pop() {
                return Poll::Ready(Some(item));
            }
            self.outbox.waker.register(cx.waker());
            match self.outbox.pop() {
                Some(item) => Poll::Ready(Some(item)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Register the task to be woken by the next frame or signal. Look at the queue and the signals after this.
    pub fn register(&self, cx: &Context<'_>) {
        self.outbox.waker.register(cx.waker());
    }

    /// Whether frames are queued and not yet handed to the socket (nothing is in flight when this is asked).
    pub fn has_queued(&self) -> bool {
        self.outbox.queued_bytes.load(Ordering::Acquire) > 0
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.outbox.pop()
    }

    /// Start a write: move up to `max` queued frames into `batch` (one lock for the lot), without waiting. No
    /// direct write happens until [`Self::end_write`].
    pub fn try_recv_many(&mut self, batch: &mut Vec<Outgoing>, max: usize) {
        self.outbox.pop_many(batch, max);
    }

    /// Everything taken by [`Self::try_recv_many`] (and any torn write) is on the wire: direct writes may resume.
    pub fn end_write(&self) {
        self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner).writing = false;
    }

    /// The frames of a direct write the socket took only part of, and how many of their bytes it took; they
    /// must be completed before anything else is written.
    pub fn take_torn(&self) -> Option<(Vec<Outgoing>, usize)> {
        let mut queue = self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.torn_frames == 0 {
            return None;
        }
        let count = usize::from(std::mem::take(&mut queue.torn_frames));
        let skip = std::mem::take(&mut queue.torn_skip) as usize;
        Some((queue.frames.drain(..count).collect(), skip))
    }

    /// Let deliveries be written to this socket directly (see [`Outbox::write_or_push`]).
    pub fn allow_direct(&self, socket: direct::Socket) {
        let _queue = self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.outbox.direct_fd.store(socket.fd, Ordering::Relaxed);
    }

    /// No more direct writes: the connection is ending. Waits for one in progress (it holds the lock).
    pub fn stop_direct(&self) {
        let _queue = self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.outbox.direct_fd.store(-1, Ordering::Relaxed);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.outbox.closed.store(true, Ordering::Relaxed);
        let mut queue = self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // Before the socket closes (Connection drops this first): its descriptor may be reused at once.
        self.outbox.direct_fd.store(-1, Ordering::Relaxed);
        queue.frames.clear();
    }
}

/// Frames offered for a direct write, with their latency timers, and their bytes on the wire.
#[derive(Clone, Copy)]
enum Direct<'a> {
    One(&'a [u8], Option<&'a Arc<PublishTimer>>),
    Many(&'a [(Utf8Bytes, Option<Arc<PublishTimer>>)], &'a [u8]),
}

/// Most frames one direct write takes (a publisher's burst, as the connection task would batch it).
const MAX_DIRECT_FRAMES: usize = 64;

/// Writing frames to a socket from outside its connection task.
pub mod direct {
    use std::io::Write;
    use std::mem::ManuallyDrop;

    /// A connection's socket, borrowed by descriptor. Only used under the outbox's lock, and removed from the
    /// outbox (under that lock) before the socket closes, so a write never reaches a descriptor reused since.
    pub struct Socket {
        pub(super) fd: i32,
    }

    impl Socket {
        #[cfg(unix)]
        pub fn new(stream: &impl std::os::fd::AsRawFd) -> Option<Socket> {
            Some(Socket { fd: stream.as_raw_fd() })
        }

        /// No direct writes where descriptors are not file descriptors.
        #[cfg(not(unix))]
        pub fn new<T>(_stream: &T) -> Option<Socket> {
            None
        }

        /// The socket of a descriptor the outbox holds (-1: none).
        pub(super) fn from_fd(fd: i32) -> Option<Socket> {
            (fd >= 0).then_some(Socket { fd })
        }

        /// One non-blocking write of encoded frames: the bytes written. A full socket (or any error: the
        /// connection task meets it at its next write) writes 0.
        #[cfg(unix)]
        #[allow(unsafe_code)]
        pub fn write(&self, wire: &[u8]) -> usize {
            use std::os::fd::FromRawFd;
            // SAFETY: the descriptor is the connection's open socket (see the type's comment); ManuallyDrop keeps
            // this borrowed std handle from closing it. tokio made it non-blocking, so the write cannot block.
            let mut stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(self.fd) });
            stream.write(wire).unwrap_or(0)
        }

        #[cfg(not(unix))]
        pub fn write(&self, _wire: &[u8]) -> usize {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_stays_in_a_128_byte_allocation() {
        // Arc's two counts come on top; jemalloc's next size class is 160 bytes, for every connection.
        assert!(std::mem::size_of::<Outbox>() <= 112, "{} bytes", std::mem::size_of::<Outbox>());
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_the_bound_marks_the_queue_slow() {
        let (outbox, mut rx) = Outbox::new(1, 10, 0);
        assert_eq!(outbox.queue.lock().unwrap().frames.capacity(), 0, "an empty outbox allocates nothing");
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
        assert!(outbox.push(Utf8Bytes::from_static("67890")));
        assert!(!outbox.is_overflowed());
        assert!(!outbox.push(Utf8Bytes::from_static("x")), "11 bytes passes the 10-byte bound");
        assert!(outbox.is_overflowed());
        assert_eq!(outbox.signals(), Signal::Overflowed as u8);
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "12345");
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "67890");
        assert!(rx.try_recv().is_none());
        outbox.written(10);
        assert!(!outbox.push(Utf8Bytes::from_static("y")), "a slow connection stays closed to new frames");
    }

    #[tokio::test]
    async fn a_closed_receiver_refuses_frames_and_a_drained_queue_shrinks() {
        let (outbox, mut rx) = Outbox::new(1, 1 << 20, 0);
        for _ in 0..100 {
            assert!(outbox.push(Utf8Bytes::from_static("x")));
        }
        while rx.try_recv().is_some() {}
        assert!(outbox.queue.lock().unwrap().frames.capacity() <= KEEP_CAPACITY);
        // A reply taken on its own (an idle connection's usual traffic) leaves nothing allocated.
        assert!(outbox.push(Utf8Bytes::from_static("reply")));
        let mut batch = Vec::new();
        rx.try_recv_many(&mut batch, 64);
        assert_eq!((batch.len(), outbox.queue.lock().unwrap().frames.capacity()), (1, 0));
        // A busy queue keeps a few slots between batches.
        for _ in 0..4 {
            assert!(outbox.push(Utf8Bytes::from_static("x")));
        }
        rx.try_recv_many(&mut batch, 64);
        assert!(outbox.queue.lock().unwrap().frames.capacity() > 0);
        drop(rx);
        assert!(!outbox.push(Utf8Bytes::from_static("x")));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_frame_and_for_an_overflow() {
        let (outbox, mut rx) = Outbox::new(1, 10, 0);
        let producer = Arc::clone(&outbox);
        let push = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(producer.push(Utf8Bytes::from_static("late")));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(!producer.push(Utf8Bytes::from_static("too long to fit")));
        });
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "late");
        // The connection task's wait: register, then look at the signals.
        poll_fn(|cx| {
            rx.register(cx);
            if outbox.is_overflowed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        push.await.unwrap();
        let mut batch = Vec::new();
        rx.try_recv_many(&mut batch, 10);
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn written_frees_room() {
        let (outbox, mut rx) = Outbox::new(1, 5, 0);
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
        let frame = rx.recv().await.unwrap().frame;
        outbox.written(frame.len());
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
    }
}
