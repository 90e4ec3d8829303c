//! The one table of error and close codes (docs/protocol.md mirrors it).
//!
//! Ranges follow Pusher's convention so a client can act on a code without knowing it:
//! 4000–4099 are per-request errors sent in `error` frames (the connection stays open),
//! 4100–4199 close codes mean "reconnect with backoff", 4200–4299 "reconnect now".

/// Codes carried by `{"event":"error","data":{"code":…}}` frames. The connection stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or wrongly typed field, or a binary frame.
    Malformed = 4000,
    /// A channel name outside `[A-Za-z0-9_\-=@,.;:]{1,200}`.
    InvalidChannel = 4002,
    /// Authorization refused, a private/presence channel without a user, or a publish that is not allowed.
    Forbidden = 4003,
    /// An `event` the server does not know.
    UnknownEvent = 4004,
    /// `max_channels_per_connection` reached.
    TooManyChannels = 4005,
    /// Over the per-connection inbound rate limit.
    RateLimited = 4029,
}

/// Close codes the server sends, beside the RFC 6455 ones (1001 going away, 1007 invalid UTF-8, 1009 too big).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// Server shutting down (RFC 6455).
    GoingAway = 1001,
    /// A frame that breaks RFC 6455 (unmasked, bad opcode, fragmented control frame…).
    ProtocolError = 1002,
    /// A text frame that is not UTF-8 (RFC 6455).
    InvalidPayload = 1007,
    /// Kept sending over the rate limit for a second after error 4029 (RFC 6455 "policy violation").
    PolicyViolation = 1008,
    /// A message larger than `max_message_size` (RFC 6455).
    TooBig = 1009,
    /// The connection could not keep up with what it was sent: its outgoing queue passed `send_queue_bytes`.
    SlowConsumer = 4100,
    /// Nothing was received from the client for `idle_timeout` seconds.
    IdleTimeout = 4201,
}

impl CloseCode {
    /// The reason text sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "going away",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidPayload => "text frame is not valid UTF-8",
            CloseCode::PolicyViolation => "rate limit exceeded",
            CloseCode::TooBig => "message too big",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::IdleTimeout => "idle timeout",
        }
    }
}
