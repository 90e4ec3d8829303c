//! Per-connection inbound rate limit: a token bucket of `rate_burst` messages refilled at `rate_limit` per second.
//!
//! Over the limit, messages are dropped: the first one gets error 4029, and a client that still has messages
//! dropped one second later is closed with 1008. A client that goes a whole second without a dropped message is
//! forgiven (its next excess gets a new 4029).

use std::sync::OnceLock;
use std::time::Instant;

/// How long (ms) a client may stay over the limit after its 4029 before it is closed.
const GRACE_MS: u32 = 1_000;

/// A millisecond clock for the limiter: 4 bytes per timestamp instead of an `Instant`'s 16, so every connection's
/// task is smaller. It wraps after 49.7 days; differences use wrapping arithmetic, so they are right for anything
/// shorter than that. A gap of a whole multiple of 49.7 days could at worst refill a bucket too little once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Millis(u32);

impl Millis {
    /// Now, counted from the first call in this process.
    pub fn now() -> Self {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        Millis(EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u32)
    }

    fn since(self, earlier: Millis) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }
}

/// One connection's bucket. The rate and burst are the server's (passed to [`RateLimiter::check`]), not copied
/// into every connection.
pub struct RateLimiter {
    tokens: f32,
    refilled: Millis,
    /// When the current violation began (its 4029), if one is going on, and the last message dropped in it.
    over_since: Millis,
    over: bool,
    last_drop: Millis,
}

/// What to do with one inbound message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Drop it and send error 4029 (the first message over the limit).
    Warn,
    /// Drop it silently (still within the grace second).
    Drop,
    /// Close with 1008.
    Close,
}

impl RateLimiter {
    /// A limiter with a full bucket; a rate of zero or less disables it.
    pub fn new(rate: f64, burst: f64, now: Millis) -> Option<Self> {
        (rate > 0.0).then_some(RateLimiter {
            tokens: burst.max(1.0) as f32,
            refilled: now,
            over_since: now,
            over: false,
            last_drop: now,
        })
    }

    /// One message at `now`, with the server's `rate` (per second) and `burst`.
    pub fn check(&mut self, now: Millis, rate: f64, burst: f64) -> Verdict {
        let elapsed = f64::from(now.since(self.refilled)) / 1_000.0;
        self.tokens = (f64::from(self.tokens) + elapsed * rate).min(burst.max(1.0)) as f32;
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if now.since(self.last_drop) >= GRACE_MS {
                self.over = false;
            }
            return Verdict::Accept;
        }
        self.last_drop = now;
        if !self.over {
            self.over = true;
            self.over_since = now;
            Verdict::Warn
        } else if now.since(self.over_since) >= GRACE_MS {
            Verdict::Close
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Millis, ms: u32) -> Millis {
        Millis(start.0.wrapping_add(ms))
    }

    #[test]
    fn burst_then_4029_then_1008_for_a_client_that_keeps_going() {
        let start = Millis::now();
        let mut limiter = RateLimiter::new(1.0, 2.0, start).unwrap();
        let mut check = |at: Millis| limiter.check(at, 1.0, 2.0);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Warn);
        assert_eq!(check(at(start, 500)), Verdict::Drop);
        assert_eq!(check(at(start, 1000)), Verdict::Accept, "a refilled token is still accepted");
        assert_eq!(check(at(start, 1000)), Verdict::Close, "dropping again a second after the 4029");
    }

    #[test]
    fn a_client_that_slows_down_is_forgiven() {
        let start = Millis::now();
        let mut limiter = RateLimiter::new(10.0, 1.0, start).unwrap();
        let mut check = |at: Millis| limiter.check(at, 10.0, 1.0);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Warn);
        for ms in [200, 400, 600, 800, 1000, 1200] {
            assert_eq!(check(at(start, ms)), Verdict::Accept);
        }
        assert_eq!(check(at(start, 1200)), Verdict::Warn, "a new violation gets a new 4029");
    }

    #[test]
    fn the_clock_wrapping_around_changes_nothing() {
        let start = Millis(u32::MAX - 500);
        let mut limiter = RateLimiter::new(1.0, 1.0, start).unwrap();
        let mut check = |at: Millis| limiter.check(at, 1.0, 1.0);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(at(start, 400)), Verdict::Warn);
        assert_eq!(check(at(start, 1000)), Verdict::Accept, "refilled across the wrap");
        assert_eq!(check(at(start, 1400)), Verdict::Close, "still dropping a second after the 4029");
    }

    #[test]
    fn zero_rate_disables_the_limit() {
        assert!(RateLimiter::new(0.0, 10.0, Millis::now()).is_none());
    }
}
