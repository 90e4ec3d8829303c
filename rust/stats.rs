//! Process-wide counters, updated with relaxed atomics on the hot path and read as a snapshot by `/stats`,
//! `/metrics` and the Python API.
//!
//! The Prometheus text format is written by hand ([`Stats::render_prometheus`]): it is a dozen lines for the
//! metrics we have, and keeps the hot-path counters plain `AtomicU64`s rather than a metrics crate's types.
//! Tests parse the output with the official Python client's parser.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a WebSocket handshake ended, for `fastws_handshakes_total{result=…}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Accepted = 0,
    /// 401: authentication refused.
    Unauthorized,
    /// 403: the Origin rule refused.
    Forbidden,
    /// 400 or 431: not a valid upgrade.
    BadRequest,
    /// 503: `max_connections` reached.
    Unavailable,
    /// The request head did not arrive within `handshake_timeout`.
    Timeout,
}

const HANDSHAKE_RESULTS: [(Handshake, &str); 6] = [
    (Handshake::Accepted, "accepted"),
    (Handshake::Unauthorized, "unauthorized"),
    (Handshake::Forbidden, "forbidden"),
    (Handshake::BadRequest, "bad_request"),
    (Handshake::Unavailable, "unavailable"),
    (Handshake::Timeout, "timeout"),
];

/// Upper bounds (seconds) of the publish latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// At most one publish per interval is timed; at low rates that is every publish, at high rates ~100 a second,
/// so timing costs nothing measurable on the fan-out path.
const LATENCY_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

pub struct Stats {
    started: Instant,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames queued for delivery to subscribers (one publish to N subscribers counts N).
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    handshakes: [AtomicU64; HANDSHAKE_RESULTS.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// Nanoseconds since `started` before which no publish is timed.
    next_sample_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            handshakes: Default::default(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            next_sample_ns: AtomicU64::new(0),
        }
    }
}

/// One timed publish: observed when the last local subscriber's frame has been written to its socket.
///
/// It starts with a large placeholder count, so frames written while the publish is still being queued cannot
/// bring it to zero; [`PublishTimer::arm`] then subtracts the placeholder and adds the real number queued.
pub struct PublishTimer {
    started: Instant,
    remaining: AtomicU64,
}

const PLACEHOLDER: u64 = 1 << 62;

impl PublishTimer {
    /// Set the number of frames queued. Returns the latency when they were all written already.
    pub fn arm(&self, queued: usize) -> Option<Duration> {
        let delta = PLACEHOLDER - queued as u64;
        (self.remaining.fetch_sub(delta, Ordering::AcqRel) == delta).then(|| self.started.elapsed())
    }

    /// Called once a frame carrying this timer is written; the last call returns the publish's latency.
    pub fn written(&self) -> Option<Duration> {
        (self.remaining.fetch_sub(1, Ordering::AcqRel) == 1).then(|| self.started.elapsed())
    }
}

impl Stats {
    pub fn received(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn published(&self, deliveries: usize, frame_len: usize) {
        self.messages_out.fetch_add(deliveries as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add((deliveries * frame_len) as u64, Ordering::Relaxed);
    }

    pub fn handshake(&self, result: Handshake) {
        self.handshakes[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A timer for the next publish when it is time for a sample, else None.
    pub fn publish_timer(&self) -> Option<Arc<PublishTimer>> {
        let now = self.started.elapsed().as_nanos() as u64;
        let next = self.next_sample_ns.load(Ordering::Relaxed);
        let until = now + LATENCY_SAMPLE_INTERVAL.as_nanos() as u64;
        if now < next
            || self.next_sample_ns.compare_exchange(next, until, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return None;
        }
        Some(Arc::new(PublishTimer { started: Instant::now(), remaining: AtomicU64::new(PLACEHOLDER) }))
    }

    pub fn observe_publish_latency(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound) {
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(latency.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, with the gauges the hub knows.
    pub fn render_prometheus(&self, connections: usize, channels: usize) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        metric("fastws_connections", "gauge", "Open WebSocket connections.", connections as u64);
        metric("fastws_channels", "gauge", "Channels with at least one local subscriber.", channels as u64);
        metric("fastws_messages_in_total", "counter", "Frames received from clients.", load(&self.messages_in));
        metric(
            "fastws_messages_out_total",
            "counter",
            "Frames queued to clients by publishes.",
            load(&self.messages_out),
        );
        metric("fastws_bytes_in_total", "counter", "Payload bytes received from clients.", load(&self.bytes_in));
        metric(
            "fastws_bytes_out_total",
            "counter",
            "Payload bytes queued to clients by publishes.",
            load(&self.bytes_out),
        );
        metric(
            "fastws_slow_consumer_closes_total",
            "counter",
            "Connections closed with 4100 because their outgoing queue passed send_queue_bytes.",
            load(&self.slow_consumer_closes),
        );
        out.push_str("# HELP fastws_handshakes_total WebSocket handshakes by result.\n");
        out.push_str("# TYPE fastws_handshakes_total counter\n");
        for (result, label) in HANDSHAKE_RESULTS {
            let _ = writeln!(
                out,
                "fastws_handshakes_total{{result=\"{label}\"}} {}",
                load(&self.handshakes[result as usize])
            );
        }
        out.push_str(
            "# HELP fastws_publish_latency_seconds From a publish accepted to its last local subscriber's frame \
             written (sampled).\n# TYPE fastws_publish_latency_seconds histogram\n",
        );
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += load(bucket);
            let _ = writeln!(out, "fastws_publish_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = load(&self.latency_count);
        let _ = writeln!(out, "fastws_publish_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "fastws_publish_latency_seconds_sum {}", load(&self.latency_sum_ns) as f64 / 1e9);
        let _ = writeln!(out, "fastws_publish_latency_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_reports_once_the_last_frame_is_written() {
        let stats = Stats::default();
        let timer = stats.publish_timer().expect("the first publish is sampled");
        assert!(stats.publish_timer().is_none(), "a second one within the interval is not");
        assert!(timer.written().is_none(), "written before armed");
        assert!(timer.arm(2).is_none(), "one of two still unwritten");
        let latency = timer.written().expect("last subscriber");
        stats.observe_publish_latency(latency);
        let text = stats.render_prometheus(1, 1);
        assert!(text.contains("fastws_publish_latency_seconds_count 1"), "{text}");
        assert!(text.contains("fastws_publish_latency_seconds_bucket{le=\"+Inf\"} 1"));
        let all_written_first = Stats::default().publish_timer().unwrap();
        assert!(all_written_first.written().is_none());
        assert!(all_written_first.arm(1).is_some(), "armed after its only frame was written");
    }

    #[test]
    fn handshakes_are_counted_by_result() {
        let stats = Stats::default();
        stats.handshake(Handshake::Accepted);
        stats.handshake(Handshake::Unauthorized);
        stats.handshake(Handshake::Unauthorized);
        let text = stats.render_prometheus(0, 0);
        assert!(text.contains("fastws_handshakes_total{result=\"accepted\"} 1"));
        assert!(text.contains("fastws_handshakes_total{result=\"unauthorized\"} 2"));
    }
}
