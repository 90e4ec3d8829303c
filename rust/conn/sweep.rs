//! Stage: connection upkeep. One task per server looks after every connection's heartbeat, idle timeout and stop,
//! instead of a timer and a shutdown future inside each connection task (together ~200 bytes of every idle task
//! and a timer-wheel entry each; the sweep costs a few nanoseconds per connection per tick).
//!
//! Every tick the sweeper reads each live connection's outbox: silent for `heartbeat_interval` → [`Signal::PingDue`]
//! (once per silence); silent, or a socket write stuck, for `idle_timeout` → [`Signal::IdleTimeout`]. At stop it
//! raises [`Signal::GoingAway`] on all of them. The connection task, woken by the signal, does the I/O. Time is
//! counted in ticks (a tick is an eighth of the shorter interval, between 5 ms and 1 s), so a ping or a close comes
//! at most two ticks after its interval: 0.25 s late at most with the defaults (60 s / 600 s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::outbox::{ConnId, Outbox, Signal, NOT_STALLED};

/// Every upgraded connection of this server, and the sweep clock.
#[derive(Default)]
pub struct Connections {
    live: Mutex<HashMap<ConnId, Arc<Outbox>>>,
    /// Ticks since the sweeper started. Connections read it when they hear from the client: a load, not a clock
    /// read, per message.
    now: AtomicU32,
}

impl Connections {
    pub fn add(&self, outbox: &Arc<Outbox>) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(outbox.id, Arc::clone(outbox));
    }

    pub fn remove(&self, id: ConnId) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    /// The current sweep tick.
    pub fn now(&self) -> u32 {
        self.now.load(Ordering::Relaxed)
    }

    fn for_each(&self, mut visit: impl FnMut(&Outbox)) {
        for outbox in self.live.lock().unwrap_or_else(PoisonError::into_inner).values() {
            visit(outbox);
        }
    }
}

/// The intervals in ticks. A silence of `n` ticks lasted more than `n - 1` ticks, so a limit of `d` is reached
/// at `ceil(d / tick) + 1` ticks: never early, at most two ticks late.
struct Limits {
    heartbeat: Option<u32>,
    idle: Option<u32>,
}

impl Limits {
    fn new(tick: Duration, heartbeat: Duration, idle: Duration) -> Self {
        let ticks = |limit: Duration| {
            (!limit.is_zero())
                .then(|| (limit.as_secs_f64() / tick.as_secs_f64()).ceil().min(f64::from(u32::MAX / 2)) as u32 + 1)
        };
        Limits { heartbeat: ticks(heartbeat), idle: ticks(idle) }
    }

    /// What this connection needs now, if anything.
    fn check(&self, outbox: &Outbox, now: u32) -> Option<Signal> {
        let silent = now.wrapping_sub(outbox.last_heard());
        if let Some(idle) = self.idle {
            let stalled = outbox.stalled_since();
            if silent >= idle || (stalled != NOT_STALLED && now.wrapping_sub(stalled) >= idle) {
                return Some(Signal::IdleTimeout);
            }
        }
        let pinged = outbox.signals() & (Signal::Pinged as u8 | Signal::PingDue as u8) != 0;
        match self.heartbeat {
            Some(heartbeat) if silent >= heartbeat && !pinged => Some(Signal::PingDue),
            _ => None,
        }
    }
}

/// The sweep tick for these intervals; None when both are off (only the stop is left to watch for).
fn tick_for(heartbeat: Duration, idle: Duration) -> Option<Duration> {
    let shortest = [heartbeat, idle].into_iter().filter(|d| !d.is_zero()).min()?;
    Some((shortest / 8).clamp(Duration::from_millis(5), Duration::from_secs(1)))
}

/// Sweep until the server stops, then tell every connection to go away.
pub async fn run(connections: Arc<Connections>, heartbeat: Duration, idle: Duration, shutdown: CancellationToken) {
    if let Some(tick) = tick_for(heartbeat, idle) {
        let limits = Limits::new(tick, heartbeat, idle);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = interval.tick() => {
                    let now = connections.now.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                    connections.for_each(|outbox| {
                        if let Some(signal) = limits.check(outbox, now) {
                            outbox.raise(signal);
                        }
                    });
                }
            }
        }
    } else {
        shutdown.cancelled().await;
    }
    // A connection registered after this look sees the token cancelled when it registers (conn::run).
    connections.for_each(|outbox| outbox.raise(Signal::GoingAway));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_an_eighth_of_the_shorter_interval_within_bounds() {
        assert_eq!(tick_for(Duration::ZERO, Duration::ZERO), None);
        assert_eq!(tick_for(Duration::from_secs(60), Duration::from_secs(600)), Some(Duration::from_secs(1)));
        assert_eq!(tick_for(Duration::ZERO, Duration::from_millis(800)), Some(Duration::from_millis(100)));
        assert_eq!(tick_for(Duration::from_millis(10), Duration::ZERO), Some(Duration::from_millis(5)));
    }

    #[test]
    fn silence_brings_one_ping_then_the_idle_close_and_a_stuck_write_counts_too() {
        let tick = Duration::from_millis(100);
        let limits = Limits::new(tick, Duration::from_millis(200), Duration::from_millis(600));
        assert_eq!((limits.heartbeat, limits.idle), (Some(3), Some(7)));
        let (outbox, _rx) = Outbox::new(1, 1 << 20, 10);
        assert_eq!(limits.check(&outbox, 12), None, "two ticks may be less than 200 ms");
        assert_eq!(limits.check(&outbox, 13), Some(Signal::PingDue));
        outbox.raise(Signal::PingDue);
        outbox.ping_sent();
        assert_eq!(outbox.signals(), Signal::Pinged as u8, "PingDue cleared, Pinged set, in one update");
        assert_eq!(limits.check(&outbox, 14), None, "one ping per silence");
        assert_eq!(limits.check(&outbox, 17), Some(Signal::IdleTimeout));
        outbox.heard(17);
        assert_eq!(outbox.signals(), 0, "hearing from the client allows the next ping");
        assert_eq!(limits.check(&outbox, 18), None);
        outbox.set_stalled_since(18);
        assert_eq!(limits.check(&outbox, 19), None);
        outbox.heard(24);
        assert_eq!(limits.check(&outbox, 25), Some(Signal::IdleTimeout), "the client talks but never reads");
        let (quiet, _rx) = Outbox::new(2, 1 << 20, u32::MAX - 1);
        assert_eq!(limits.check(&quiet, 1), Some(Signal::PingDue), "the tick counter may wrap");
    }
}
