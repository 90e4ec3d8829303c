//! Per-connection inbound rate limit: a token bucket of `rate_burst` messages refilled at `rate_limit` per second.
//!
//! Over the limit, messages are dropped: the first one gets error 4029, and a client that still has messages
//! dropped one second later is closed with 1008. A client that goes a whole second without a dropped message is
//! forgiven (its next excess gets a new 4029).

use std::time::{Duration, Instant};

/// How long a client may stay over the limit after its 4029 before it is closed.
const GRACE: Duration = Duration::from_secs(1);

/// One connection's bucket. The rate and burst are the server's (passed to [`RateLimiter::check`]), not copied
/// into every connection.
pub struct RateLimiter {
    tokens: f64,
    refilled: Instant,
    /// When the current violation began (its 4029), and the last message dropped in it.
    over_since: Option<Instant>,
    last_drop: Instant,
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
    pub fn new(rate: f64, burst: f64, now: Instant) -> Option<Self> {
        (rate > 0.0).then_some(RateLimiter { tokens: burst.max(1.0), refilled: now, over_since: None, last_drop: now })
    }

    /// One message at `now`, with the server's `rate` (per second) and `burst`.
    pub fn check(&mut self, now: Instant, rate: f64, burst: f64) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst.max(1.0));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if now.saturating_duration_since(self.last_drop) >= GRACE {
                self.over_since = None;
            }
            return Verdict::Accept;
        }
        self.last_drop = now;
        match self.over_since {
            None => {
                self.over_since = Some(now);
                Verdict::Warn
            }
            Some(since) if now.saturating_duration_since(since) >= GRACE => Verdict::Close,
            Some(_) => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn burst_then_4029_then_1008_for_a_client_that_keeps_going() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1.0, 2.0, start).unwrap();
        let mut check = |at: Instant| limiter.check(at, 1.0, 2.0);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Warn);
        assert_eq!(check(at(start, 500)), Verdict::Drop);
        assert_eq!(check(at(start, 1000)), Verdict::Accept, "a refilled token is still accepted");
        assert_eq!(check(at(start, 1000)), Verdict::Close, "dropping again a second after the 4029");
    }

    #[test]
    fn a_client_that_slows_down_is_forgiven() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(10.0, 1.0, start).unwrap();
        let mut check = |at: Instant| limiter.check(at, 10.0, 1.0);
        assert_eq!(check(start), Verdict::Accept);
        assert_eq!(check(start), Verdict::Warn);
        for ms in [200, 400, 600, 800, 1000, 1200] {
            assert_eq!(check(at(start, ms)), Verdict::Accept);
        }
        assert_eq!(check(at(start, 1200)), Verdict::Warn, "a new violation gets a new 4029");
    }

    #[test]
    fn zero_rate_disables_the_limit() {
        assert!(RateLimiter::new(0.0, 10.0, Instant::now()).is_none());
    }
}
