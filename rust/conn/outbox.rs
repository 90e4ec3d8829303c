//! Stage: fan-out writer, producer side. Each connection's bounded outgoing queue.
//!
//! The hub pushes shared frames into a connection's [`Outbox`] without blocking and without touching the socket;
//! the connection task drains it. The bound is in bytes (`send_queue_bytes`): a subscriber that cannot keep up
//! passes it, is marked slow and is closed with 4100, so it never delays the others and never grows memory
//! without limit (the slow-consumer rule of centrifuge's writer.go).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tungstenite::Utf8Bytes;

use crate::stats::PublishTimer;

/// One queued frame; a sampled publication also carries its latency timer.
pub struct Outgoing {
    pub frame: Utf8Bytes,
    pub timer: Option<Arc<PublishTimer>>,
}

/// Connection id, unique within this process. The socket_id clients see is `"<node>.<ConnId>"`.
pub type ConnId = u64;

/// A queue that holds no memory while empty, unlike tokio's mpsc (which allocates a 32-slot block per channel,
/// ~1.4 KB per idle connection). Producers lock it briefly to push; the connection task drains it in batches.
///
/// The wake-ups are `AtomicWaker`s, not tokio `Notify`s: only the connection task ever waits, so a waiter list
/// (a mutex and a list node per waiting future) is more than needed. An AtomicWaker is 24 bytes, waking is one
/// atomic swap, and the futures that wait on it are a few bytes instead of ~80 in every idle task.
pub struct Outbox {
    pub id: ConnId,
    queue: Mutex<VecDeque<Outgoing>>,
    /// Wakes the connection task when frames arrive. It registers, then looks at the queue again, so a push
    /// between its look and its registration is not missed.
    ready: AtomicWaker,
    queued_bytes: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    /// Set when the connection task is gone: pushes are refused.
    closed: AtomicBool,
    /// Wakes the connection task when the queue overflowed, even while it is stuck writing to the socket.
    overflow_signal: AtomicWaker,
}

/// The consumer side, owned by the connection task. Dropping it closes the outbox to new frames.
pub struct OutboxReceiver {
    outbox: Arc<Outbox>,
}

/// Capacity above which a drained queue gives its memory back, so an idle connection after a burst is small.
const KEEP_CAPACITY: usize = 8;

impl Outbox {
    pub fn new(id: ConnId, limit: usize) -> (Arc<Self>, OutboxReceiver) {
        let outbox = Arc::new(Outbox {
            id,
            queue: Mutex::new(VecDeque::new()),
            ready: AtomicWaker::new(),
            queued_bytes: AtomicUsize::new(0),
            limit,
            overflowed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            overflow_signal: AtomicWaker::new(),
        });
        (Arc::clone(&outbox), OutboxReceiver { outbox })
    }

    /// Queue a frame. Returns false when it was not queued: the connection is gone or has been marked slow.
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.push_timed(frame, None)
    }

    /// Queue a frame that may carry a publish latency timer.
    pub fn push_timed(&self, frame: Utf8Bytes, timer: Option<&Arc<PublishTimer>>) -> bool {
        if self.overflowed.load(Ordering::Relaxed) || self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.limit {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if !self.overflowed.swap(true, Ordering::Release) {
                self.overflow_signal.wake();
            }
            return false;
        }
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back(Outgoing { frame, timer: timer.cloned() });
        self.ready.wake();
        true
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Resolves once the queue has overflowed. For the connection task only (one waker is kept).
    pub async fn overflowed(&self) {
        poll_fn(|cx| {
            if self.is_overflowed() {
                return Poll::Ready(());
            }
            self.overflow_signal.register(cx.waker());
            if self.is_overflowed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Called by the connection task once a frame has been handed to the socket.
    pub fn written(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    fn pop(&self) -> Option<Outgoing> {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let item = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_CAPACITY {
            queue.shrink_to(0);
        }
        item
    }

    /// Move up to `max` frames into `batch` under one lock.
    fn pop_many(&self, batch: &mut Vec<Outgoing>, max: usize) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let take = queue.len().min(max);
        batch.extend(queue.drain(..take));
        if queue.is_empty() && queue.capacity() > KEEP_CAPACITY {
            queue.shrink_to(0);
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
            self.outbox.ready.register(cx.waker());
            match self.outbox.pop() {
                Some(item) => Poll::Ready(Some(item)),
                None => Poll::Pending,
            }
        })
        .await
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.outbox.pop()
    }

    /// Move up to `max` queued frames into `batch` (one lock for the lot), without waiting.
    pub fn try_recv_many(&mut self, batch: &mut Vec<Outgoing>, max: usize) {
        self.outbox.pop_many(batch, max);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.outbox.closed.store(true, Ordering::Relaxed);
        self.outbox.queue.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_in_order_and_the_bound_marks_the_queue_slow() {
        let (outbox, mut rx) = Outbox::new(1, 10);
        assert_eq!(outbox.queue.lock().unwrap().capacity(), 0, "an empty outbox allocates nothing");
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
        assert!(outbox.push(Utf8Bytes::from_static("67890")));
        assert!(!outbox.is_overflowed());
        assert!(!outbox.push(Utf8Bytes::from_static("x")), "11 bytes passes the 10-byte bound");
        assert!(outbox.is_overflowed());
        outbox.overflowed().await; // already overflowed: resolves at once
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "12345");
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "67890");
        assert!(rx.try_recv().is_none());
        outbox.written(10);
        assert!(!outbox.push(Utf8Bytes::from_static("y")), "a slow connection stays closed to new frames");
    }

    #[tokio::test]
    async fn a_closed_receiver_refuses_frames_and_a_drained_queue_shrinks() {
        let (outbox, mut rx) = Outbox::new(1, 1 << 20);
        for _ in 0..100 {
            assert!(outbox.push(Utf8Bytes::from_static("x")));
        }
        while rx.try_recv().is_some() {}
        assert!(outbox.queue.lock().unwrap().capacity() <= KEEP_CAPACITY);
        drop(rx);
        assert!(!outbox.push(Utf8Bytes::from_static("x")));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_frame_and_for_an_overflow() {
        let (outbox, mut rx) = Outbox::new(1, 10);
        let producer = Arc::clone(&outbox);
        let push = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(producer.push(Utf8Bytes::from_static("late")));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(!producer.push(Utf8Bytes::from_static("too long to fit")));
        });
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "late");
        outbox.overflowed().await;
        push.await.unwrap();
        let mut batch = Vec::new();
        rx.try_recv_many(&mut batch, 10);
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn written_frees_room() {
        let (outbox, mut rx) = Outbox::new(1, 5);
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
        let frame = rx.recv().await.unwrap().frame;
        outbox.written(frame.len());
        assert!(outbox.push(Utf8Bytes::from_static("12345")));
    }
}
