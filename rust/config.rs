//! The server's settings as the Rust core sees them.
//!
//! Python (`fastws/config.py`) owns the settings model: names, sources, precedence and validation. By the time a
//! [`ServerConfig`] is built every value is valid; the constructor only rejects what Rust itself cannot represent.

use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::auth::AuthConfig;
use crate::broker::redis::RedisSettings;

/// Everything the accept loop, connection tasks and hub need, validated once.
#[derive(Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Tokio worker threads.
    pub workers: usize,
    pub max_connections: usize,
    /// Largest inbound message (and frame) in bytes; larger closes with 1009.
    pub max_message_size: usize,
    pub max_channels_per_connection: usize,
    /// Channels on which clients may publish.
    pub client_publish: ChannelPatterns,
    /// Ping a client that has been silent this long. Zero disables pings.
    pub heartbeat_interval: Duration,
    /// Close a client that sent nothing for this long. Zero disables the check.
    pub idle_timeout: Duration,
    /// Drop a TCP connection whose HTTP upgrade is not complete in this time (slowloris).
    pub handshake_timeout: Duration,
    /// TCP connections allowed in their HTTP upgrade at once; further ones are closed at accept.
    pub max_pending_handshakes: usize,
    /// Length of the kernel's queue of connections not yet accepted (listen(2)); the kernel caps it at
    /// net.core.somaxconn. std's default of 128 overflowed under 200 connects in flight (SYNs dropped, 1 s retries).
    pub backlog: u32,
    /// Inbound messages per second per connection, and the burst allowed above it (a token bucket).
    pub rate_limit: f64,
    pub rate_burst: f64,
    /// Bound of each connection's outgoing queue.
    pub send_queue_bytes: usize,
    /// Origin rule, JWT verification and the application's hooks.
    pub auth: AuthConfig,
    /// Required by the operational HTTP endpoints when set; without it they answer loopback clients only.
    pub api_key: Option<String>,
    /// Serve the demo chat page at `/`, allow client publish on `demo.*` and anonymous presence on
    /// `presence-demo.*`.
    pub demo: bool,
    /// Join the cluster of nodes sharing this Redis (`redis_url`, `redis_prefix`, `node_ttl`); None: one node.
    pub redis: Option<RedisSettings>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "0.0.0.0".into(),
            port: 9501,
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            max_connections: 100_000,
            max_message_size: 65_536,
            max_channels_per_connection: 100,
            client_publish: ChannelPatterns::default(),
            heartbeat_interval: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            backlog: 2048,
            rate_limit: 100.0,
            rate_burst: 200.0,
            send_queue_bytes: 1 << 20,
            auth: AuthConfig { hook_timeout: Duration::from_secs(5), ..AuthConfig::default() },
            api_key: None,
            demo: false,
            redis: None,
        }
    }
}

/// A set of channel-name glob patterns (`demo.*`, `chat.room.?`); `*` also matches dots.
#[derive(Clone, Debug, Default)]
pub struct ChannelPatterns {
    set: Option<GlobSet>,
}

impl ChannelPatterns {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, String> {
        glob_set(patterns, "channel").map(|set| ChannelPatterns { set })
    }

    pub fn matches(&self, channel: &str) -> bool {
        self.set.as_ref().is_some_and(|set| set.is_match(channel))
    }
}

/// Compile glob patterns (channel names, origins); None for an empty list. `what` names them in errors.
pub fn glob_set<S: AsRef<str>>(patterns: &[S], what: &str) -> Result<Option<GlobSet>, String> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let pattern = pattern.as_ref();
        builder.add(Glob::new(pattern).map_err(|e| format!("bad {what} pattern {pattern:?}: {e}"))?);
    }
    builder.build().map(Some).map_err(|e| e.to_string())
}

/// Seconds as given by Python (floats allowed) to a Duration; zero and below mean "off".
pub fn seconds(value: f64) -> Duration {
    if value.is_finite() && value > 0.0 {
        Duration::from_secs_f64(value)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_across_dots_and_empty_matches_nothing() {
        let p = ChannelPatterns::new(&["demo.*", "chat.room.?"]).unwrap();
        assert!(p.matches("demo.a.b"));
        assert!(p.matches("chat.room.1"));
        assert!(!p.matches("chat.room.12"));
        assert!(!p.matches("other"));
        assert!(!ChannelPatterns::default().matches("anything"));
        assert!(ChannelPatterns::new(&["*"]).unwrap().matches("anything"));
    }

    #[test]
    fn bad_pattern_is_an_error() {
        assert!(ChannelPatterns::new(&["a[b"]).is_err());
    }
}
