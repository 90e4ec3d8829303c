//! Pushes from Python threads, handed to the runtime: `push()` encodes the frame and queues it, and one task on
//! the server's runtime does the fan-out.
//!
//! Why: the fan-out to S subscribers costs ~0.1 µs × S (an outbox push and a wake-up each). Done on the caller's
//! thread, `push()` to 1,000 subscribers took ~220 µs with the GIL held around the call, so one Python thread
//! managed ~4,500 calls/s. Queued, a call costs the encoding and a channel send; the runtime drains the queue in
//! batches, and waking it costs one futex call per batch, not per push.
//!
//! Order: one queue for every push of a process (channel and user pushes alike), drained in order by one task, so
//! pushes from one thread arrive in the order they were made. The queue is bounded ([`CAPACITY`] pushes): a caller
//! that outruns the fan-out for that long waits (with the GIL released) for room, instead of growing memory
//! without limit. Stopping the server delivers what is queued before the connections are closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tungstenite::Utf8Bytes;

use crate::hub::Hub;

/// Pushes that may wait for the fan-out: ~16 MiB of frames at a typical 250 bytes.
pub const CAPACITY: usize = 65_536;
/// Deliveries the fan-out task makes before it lets the connection tasks on its worker write them out.
const DELIVERIES_PER_TURN: usize = 4_096;
/// Pushes taken from the queue at once.
const BATCH: usize = 256;
/// Most consecutive pushes to one channel delivered together (a window's worth, as a client burst would be).
const MAX_RUN: usize = 16;
/// How long `close` waits for the queued pushes to be delivered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Push {
    /// To a channel's subscribers on every node, except the connection with this socket id.
    Channel { name: Box<str>, frame: Utf8Bytes, exclude: Option<Box<str>> },
    /// To every connection of a user on every node.
    User { user_id: Box<str>, frame: Utf8Bytes },
}

/// The queue was closed: the server is stopping or stopped.
#[derive(Debug)]
pub struct Closed;

/// Why [`PushQueue::try_push`] did not queue a push.
pub enum NotQueued {
    /// The queue is full: the push comes back with a sender to wait on ([`wait_for_room`], without the GIL).
    Full(Push, mpsc::Sender<Push>),
    Closed,
}

pub struct PushQueue {
    sender: mpsc::Sender<Push>,
    task: JoinHandle<()>,
    runtime: tokio::runtime::Handle,
}

impl PushQueue {
    /// Start the fan-out task on `runtime`.
    pub fn start(runtime: tokio::runtime::Handle, hub: Arc<Hub>) -> Self {
        Self::with_capacity(runtime, hub, CAPACITY)
    }

    fn with_capacity(runtime: tokio::runtime::Handle, hub: Arc<Hub>, capacity: usize) -> Self {
        let (sender, receiver) = mpsc::channel(capacity);
        let task = runtime.spawn(fan_out(receiver, hub));
        PushQueue { sender, task, runtime }
    }

    /// Queue without waiting.
    pub fn try_push(&self, push: Push) -> Result<(), NotQueued> {
        self.sender.try_send(push).map_err(|error| match error {
            TrySendError::Full(push) => NotQueued::Full(push, self.sender.clone()),
            TrySendError::Closed(_) => NotQueued::Closed,
        })
    }

    /// Stop taking pushes and wait (bounded) until the queued ones are delivered.
    pub fn close(self) {
        let PushQueue { sender, task, runtime } = self;
        drop(sender);
        // The timer is created inside block_on: it needs the runtime's context.
        let _ = runtime.block_on(async { tokio::time::timeout(DRAIN_TIMEOUT, task).await });
    }
}

/// Block the calling thread (not a runtime worker) until the full queue has room.
pub fn wait_for_room(sender: &mpsc::Sender<Push>, push: Push) -> Result<(), Closed> {
    sender.blocking_send(push).map_err(|_| Closed)
}

async fn fan_out(mut receiver: mpsc::Receiver<Push>, hub: Arc<Hub>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut run = Vec::with_capacity(MAX_RUN);
    let mut since_yield = 0;
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let mut pushes = batch.drain(..).peekable();
        while let Some(push) = pushes.next() {
            since_yield += match push {
                Push::Channel { name, frame, exclude } => {
                    // Consecutive pushes to one channel (a burst from one caller) go to each subscriber together:
                    // one outbox lock and at most one wake per subscriber for the run, as client publications do.
                    run.push(frame);
                    while run.len() < MAX_RUN {
                        match pushes.next_if(|next| same_channel(next, &name, exclude.as_deref())) {
                            Some(Push::Channel { frame, .. }) => run.push(frame),
                            _ => break,
                        }
                    }
                    // With more pushes waiting, the connection tasks batch several runs per write (no direct
                    // writes: Hub::publish); the last run of a backlog may be written at once.
                    let more_coming = pushes.peek().is_some() || !receiver.is_empty();
                    let queued = match run.as_slice() {
                        [frame] => hub.broadcast(&name, frame, exclude.as_deref(), more_coming),
                        frames => hub.broadcast_many(&name, frames, exclude.as_deref(), more_coming),
                    };
                    let deliveries = queued * run.len();
                    run.clear();
                    deliveries
                }
                Push::User { user_id, frame } => hub.broadcast_to_user(&user_id, &frame),
            };
            // A long run of fan-outs would keep the connection tasks of this worker from writing (and the
            // outboxes growing); yielding lets them flush what was queued so far.
            if since_yield >= DELIVERIES_PER_TURN {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
    }
}

fn same_channel(push: &Push, name: &str, exclude: Option<&str>) -> bool {
    matches!(push, Push::Channel { name: n, exclude: e, .. } if **n == *name && e.as_deref() == exclude)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_push() -> Push {
        Push::User { user_id: "ana".into(), frame: Utf8Bytes::from_static("{}") }
    }

    #[test]
    fn a_full_queue_makes_the_caller_wait_until_the_fan_out_catches_up() {
        // A current-thread runtime runs the fan-out task only inside block_on: until then the queue fills up.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let queue = PushQueue::with_capacity(runtime.handle().clone(), Arc::new(Hub::new(1)), 2);
        assert!(queue.try_push(user_push()).is_ok());
        assert!(queue.try_push(user_push()).is_ok());
        let Err(NotQueued::Full(third, sender)) = queue.try_push(user_push()) else {
            panic!("the queue should be full")
        };
        let caller = std::thread::spawn(move || wait_for_room(&sender, third));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!caller.is_finished(), "the caller should wait while the queue is full");
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
        assert!(caller.join().unwrap().is_ok(), "the fan-out ran, so the caller's push found room");
    }
}
