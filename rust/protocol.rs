//! Stage: protocol. The native JSON wire protocol: client frames → [`Command`], server frames → bytes.
//!
//! Owns the shapes of every frame documented in docs/protocol.md. It does no I/O and knows nothing of sockets,
//! channels or Python, so every rule here is unit-tested without a server. Later codecs (Pusher v7 at
//! `/app/{key}`) live beside this module and decode into the same [`Command`]s for the same hub.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

use crate::error::ErrorCode;

/// A decoded client request.
#[derive(Debug)]
pub enum Command<'a> {
    /// `info` is the member info a demo presence subscription carries (`presence-demo.*` in demo mode).
    Subscribe {
        channel: Cow<'a, str>,
        info: Option<&'a RawValue>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Ping,
    Publish {
        channel: Cow<'a, str>,
        payload: &'a RawValue,
    },
}

impl PartialEq for Command<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Command::Subscribe { channel: a, info: i }, Command::Subscribe { channel: b, info: j }) => {
                a == b && i.map(RawValue::get) == j.map(RawValue::get)
            }
            (Command::Unsubscribe { channel: a }, Command::Unsubscribe { channel: b }) => a == b,
            (Command::Ping, Command::Ping) => true,
            (Command::Publish { channel: a, payload: p }, Command::Publish { channel: b, payload: q }) => {
                a == b && p.get() == q.get()
            }
            _ => false,
        }
    }
}

/// Why a client frame was refused; becomes an `error` frame and never closes the connection.
#[derive(Debug, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub channel: Option<String>,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, channel: Option<&str>, message: impl Into<String>) -> Self {
        Refusal { code, channel: channel.map(str::to_owned), message: message.into() }
    }

    fn malformed(message: impl Into<String>) -> Self {
        Refusal::new(ErrorCode::Malformed, None, message)
    }
}

/// The envelope every client frame shares. Unknown fields are ignored, as the protocol promises.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    info: Option<&'a RawValue>,
}

/// Decode one text frame. Borrowed strings point into `text`, so the common case allocates nothing.
pub fn decode(text: &str) -> Result<Command<'_>, Refusal> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return Err(Refusal::malformed(if serde_json::from_str::<&RawValue>(text).is_ok() {
            "a frame must be a JSON object such as {\"event\":\"subscribe\",\"data\":{\"channel\":\"news\"}}"
        } else {
            "a frame must be valid JSON"
        }));
    }
    let envelope: Envelope<'_> =
        serde_json::from_str(text).map_err(|e| Refusal::malformed(format!("a frame must be valid JSON ({e})")))?;
    let event = match envelope.event {
        None => return Err(Refusal::malformed("the frame has no \"event\" field")),
        Some(raw) => str_field(raw).ok_or_else(|| Refusal::malformed("\"event\" must be a string"))?,
    };
    match &*event {
        "ping" => Ok(Command::Ping),
        "subscribe" | "unsubscribe" | "publish" => {
            let data = envelope.data.ok_or_else(|| {
                Refusal::malformed(format!("\"{event}\" needs \"data\": {{\"channel\": \"<name>\"}}"))
            })?;
            let data: ChannelData<'_> = serde_json::from_str(data.get())
                .map_err(|_| Refusal::malformed(format!("\"data\" of \"{event}\" must be an object")))?;
            let channel = match data.channel {
                None => return Err(Refusal::malformed(format!("\"{event}\" needs \"data.channel\""))),
                Some(raw) => str_field(raw).ok_or_else(|| Refusal::malformed("\"data.channel\" must be a string"))?,
            };
            match &*event {
                "subscribe" => Ok(Command::Subscribe { channel, info: data.info }),
                "unsubscribe" => Ok(Command::Unsubscribe { channel }),
                _ => {
                    let payload = data.payload.ok_or_else(|| {
                        Refusal::new(ErrorCode::Malformed, Some(&channel), "\"publish\" needs \"data.payload\"")
                    })?;
                    Ok(Command::Publish { channel, payload })
                }
            }
        }
        other => Err(Refusal::new(
            ErrorCode::UnknownEvent,
            None,
            format!("unknown event \"{}\"; expected subscribe, unsubscribe, publish or ping", truncate(other, 64)),
        )),
    }
}

fn str_field(raw: &RawValue) -> Option<Cow<'_, str>> {
    <Cow<'_, str>>::deserialize(raw).ok().filter(|_| raw.get().starts_with('"'))
}

fn truncate(s: &str, max_chars: usize) -> &str {
    s.char_indices().nth(max_chars).map_or(s, |(i, _)| &s[..i])
}

/// Longest channel name accepted, in characters (all allowed characters are ASCII, so also bytes).
pub const MAX_CHANNEL_NAME_LEN: usize = 200;

/// Check a channel name: 1–200 characters of `[A-Za-z0-9_\-=@,.;:]`.
pub fn validate_channel_name(name: &str) -> Result<(), Refusal> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b);
    if name.is_empty() || name.len() > MAX_CHANNEL_NAME_LEN || !name.bytes().all(allowed) {
        return Err(Refusal::new(
            ErrorCode::InvalidChannel,
            None,
            format!(
                "invalid channel name \"{}\": use 1-{MAX_CHANNEL_NAME_LEN} characters of A-Z a-z 0-9 _ - = @ , . ; :",
                truncate(name, 64)
            ),
        ));
    }
    Ok(())
}

/// Who a publication comes from decides which `event` names it may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The application (Python push, HTTP publish): any `event` is delivered as written.
    Server,
    /// A client's publish frame: only `client-*` events survive, so no client can forge `member_added` or `error`.
    Client,
}

/// The top-level entries of a JSON object, in their written order, values left undecoded.
struct ObjectEntries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for ObjectEntries<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = ObjectEntries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(ObjectEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// The payload given to push was not JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPayload(pub String);

impl fmt::Display for InvalidPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the payload is not valid JSON: {}", self.0)
    }
}

/// Build the frame a publication is delivered as, once per publish; every subscriber gets a clone of these bytes.
///
/// An object payload with an `"event"` key (a `client-*` one when it comes from a client) is delivered as that
/// object with `"channel"` set; anything else is wrapped as `{"event":"message","channel":…,"data":payload}`.
pub fn encode_publication(channel: &str, payload: &str, origin: Origin) -> Result<Utf8Bytes, InvalidPayload> {
    encode_delivery(Some(channel), payload, origin)
}

/// The frame of a push to a user's connections: a channel push's shape without `"channel"`.
pub fn encode_user_push(payload: &str) -> Result<Utf8Bytes, InvalidPayload> {
    encode_delivery(None, payload, Origin::Server)
}

/// What the caller knows of a payload it serialised itself (the Python bridge, from orjson's output and the dict it
/// inspected), so [`encode_known_delivery`] can build the frame without parsing the JSON again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownShape {
    /// An object with an `"event"` key and no `"channel"` key: delivered as is, with `"channel"` appended.
    EventObject,
    /// Anything without an `"event"` key at the top: wrapped as `"data"`.
    Data,
}

/// The frame [`encode_delivery`] would build for `json`, which must be valid JSON of the given shape (no leading
/// or trailing whitespace). An object holding both `"event"` and `"channel"` is neither shape: it goes through
/// [`encode_publication`], which drops the payload's `"channel"`.
pub fn encode_known_delivery(channel: Option<&str>, json: &str, shape: KnownShape) -> Utf8Bytes {
    let mut out = String::with_capacity(json.len() + channel.map_or(0, str::len) + 40);
    match shape {
        KnownShape::EventObject => {
            debug_assert!(json.starts_with('{') && json.ends_with('}') && json.len() > 2);
            match channel {
                Some(channel) => {
                    out.push_str(&json[..json.len() - 1]);
                    out.push_str(",\"channel\":");
                    push_json_str(&mut out, channel);
                    out.push('}');
                }
                None => out.push_str(json),
            }
        }
        KnownShape::Data => wrap_data(&mut out, channel, json),
    }
    Utf8Bytes::from(out)
}

fn encode_delivery(channel: Option<&str>, payload: &str, origin: Origin) -> Result<Utf8Bytes, InvalidPayload> {
    let trimmed = payload.trim();
    let channel_len = channel.map_or(0, str::len);
    let mut out = String::with_capacity(trimmed.len() + channel_len + 40);
    if trimmed.starts_with('{') {
        let ObjectEntries(entries) = serde_json::from_str(trimmed).map_err(|e| InvalidPayload(e.to_string()))?;
        let keeps_event = entries.iter().any(|(key, value)| {
            key == "event"
                && match origin {
                    Origin::Server => true,
                    Origin::Client => str_field(value).is_some_and(|name| name.starts_with("client-")),
                }
        });
        if keeps_event {
            out.push('{');
            for (key, value) in entries.iter().filter(|(key, _)| key != "channel") {
                push_json_str(&mut out, key);
                out.push(':');
                out.push_str(value.get());
                out.push(',');
            }
            match channel {
                Some(channel) => {
                    out.push_str("\"channel\":");
                    push_json_str(&mut out, channel);
                    out.push('}');
                }
                None if out.len() > 1 => out.replace_range(out.len() - 1.., "}"),
                None => out.push('}'),
            }
            return Ok(Utf8Bytes::from(out));
        }
    } else {
        // Validate without building a tree: the payload is written through verbatim below.
        serde_json::from_str::<&RawValue>(trimmed).map_err(|e| InvalidPayload(e.to_string()))?;
    }
    wrap_data(&mut out, channel, trimmed);
    Ok(Utf8Bytes::from(out))
}

/// `{"event":"message","channel":…,"data":json}` (no `"channel"` for a user push).
fn wrap_data(out: &mut String, channel: Option<&str>, json: &str) {
    out.push_str("{\"event\":\"message\",");
    if let Some(channel) = channel {
        out.push_str("\"channel\":");
        push_json_str(out, channel);
        out.push(',');
    }
    out.push_str("\"data\":");
    out.push_str(json);
    out.push('}');
}

fn push_json_str(out: &mut String, s: &str) {
    // The common case (every valid channel name, most keys) needs no escape: JSON escapes only `"`, `\` and control
    // characters. Otherwise serde_json's escaping is the reference; writing into a String cannot fail.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// Server → client frames other than publications.
pub enum Reply<'a> {
    Connected {
        socket_id: &'a str,
    },
    Subscribed {
        channel: &'a str,
    },
    /// A presence subscription's reply: the members, the subscriber included.
    SubscribedWithMembers {
        channel: &'a str,
        members: Vec<serde_json::Value>,
    },
    MemberAdded {
        channel: &'a str,
        member: serde_json::Value,
    },
    MemberRemoved {
        channel: &'a str,
        member: serde_json::Value,
    },
    Unsubscribed {
        channel: &'a str,
    },
    Pong,
    Error(&'a Refusal),
}

impl Reply<'_> {
    pub fn encode(&self) -> Utf8Bytes {
        let json = match self {
            Reply::Connected { socket_id } => {
                serde_json::json!({"event": "connected", "data": {"socket_id": socket_id}})
            }
            Reply::Subscribed { channel } => serde_json::json!({"event": "subscribed", "channel": channel}),
            Reply::SubscribedWithMembers { channel, members } => {
                serde_json::json!({"event": "subscribed", "channel": channel, "data": {"members": members}})
            }
            Reply::MemberAdded { channel, member } => {
                serde_json::json!({"event": "member_added", "channel": channel, "data": member})
            }
            Reply::MemberRemoved { channel, member } => {
                serde_json::json!({"event": "member_removed", "channel": channel, "data": member})
            }
            Reply::Unsubscribed { channel } => serde_json::json!({"event": "unsubscribed", "channel": channel}),
            Reply::Pong => return Utf8Bytes::from_static("{\"event\":\"pong\"}"),
            Reply::Error(refusal) => {
                let data = serde_json::json!({"code": refusal.code as u16, "message": refusal.message});
                match &refusal.channel {
                    Some(channel) => serde_json::json!({"event": "error", "channel": channel, "data": data}),
                    None => serde_json::json!({"event": "error", "data": data}),
                }
            }
        };
        Utf8Bytes::from(json.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal_code(text: &str) -> ErrorCode {
        decode(text).expect_err(text).code
    }

    #[test]
    fn decodes_the_seed_subscribe_frame() {
        let cmd = decode(r#"{"event":"subscribe","data":{"channel":"chat.room.1"}}"#).unwrap();
        assert_eq!(cmd, Command::Subscribe { channel: "chat.room.1".into(), info: None });
    }

    #[test]
    fn decodes_unsubscribe_ping_publish_and_ignores_unknown_fields() {
        assert_eq!(
            decode(r#"{"event":"unsubscribe","data":{"channel":"a"},"extra":1}"#).unwrap(),
            Command::Unsubscribe { channel: "a".into() }
        );
        assert_eq!(decode(r#" {"event":"ping"}"#).unwrap(), Command::Ping);
        match decode(r#"{"event":"publish","data":{"channel":"a","payload":{"x":[1,2]}}}"#).unwrap() {
            Command::Publish { channel, payload } => {
                assert_eq!(channel, "a");
                assert_eq!(payload.get(), r#"{"x":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_strings_decode() {
        assert_eq!(
            decode(r#"{"event":"subscribe","data":{"channel":"a\u002eb"}}"#).unwrap(),
            Command::Subscribe { channel: "a.b".into(), info: None }
        );
    }

    #[test]
    fn malformed_frames_are_4000() {
        for text in [
            "not json",
            "[1,2]",
            "42",
            "{",
            r#"{"data":{}}"#,
            r#"{"event":5}"#,
            r#"{"event":"subscribe"}"#,
            r#"{"event":"subscribe","data":"x"}"#,
            r#"{"event":"subscribe","data":{}}"#,
            r#"{"event":"subscribe","data":{"channel":7}}"#,
            r#"{"event":"publish","data":{"channel":"a"}}"#,
        ] {
            assert_eq!(refusal_code(text), ErrorCode::Malformed, "{text}");
        }
    }

    #[test]
    fn deep_nesting_neither_crashes_nor_blocks_a_valid_frame() {
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        // Skipped without recursion in an unknown field; refused where the value must be decoded.
        assert_eq!(decode(&format!(r#"{{"event":"ping","x":{open}{close}}}"#)).unwrap(), Command::Ping);
        let deep_channel = format!(r#"{{"event":"subscribe","data":{{"channel":{open}{close}}}}}"#);
        assert_eq!(refusal_code(&deep_channel), ErrorCode::Malformed);
        // Deep but valid JSON is passed through verbatim (RawValue skips it iteratively).
        assert!(encode_publication("c", &format!("{open}{close}"), Origin::Server).is_ok());
    }

    #[test]
    fn unknown_event_is_4004() {
        assert_eq!(refusal_code(r#"{"event":"dance"}"#), ErrorCode::UnknownEvent);
    }

    #[test]
    fn channel_names() {
        for ok in ["a", "chat.room.1", "A-Z_a=z@b,c;d:e", &"x".repeat(200)] {
            assert!(validate_channel_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "é", "a/b", "a*", &"x".repeat(201)] {
            assert_eq!(validate_channel_name(bad).unwrap_err().code, ErrorCode::InvalidChannel, "{bad}");
        }
    }

    fn publication(channel: &str, payload: &str, origin: Origin) -> serde_json::Value {
        serde_json::from_str(encode_publication(channel, payload, origin).unwrap().as_str()).unwrap()
    }

    #[test]
    fn server_object_with_event_keeps_its_shape_and_gains_the_channel() {
        let frame =
            encode_publication("chat.room.1", r#"{"event":"new-message","data":{"user":"João"}}"#, Origin::Server)
                .unwrap();
        assert_eq!(frame.as_str(), r#"{"event":"new-message","data":{"user":"João"},"channel":"chat.room.1"}"#);
    }

    #[test]
    fn a_channel_key_in_the_payload_is_replaced_by_the_real_channel() {
        let v = publication("real", r#"{"channel":"fake","event":"e"}"#, Origin::Server);
        assert_eq!(v, serde_json::json!({"event": "e", "channel": "real"}));
    }

    #[test]
    fn other_payloads_are_wrapped_as_message() {
        for (payload, data) in [
            (r#"{"a":1}"#, serde_json::json!({"a": 1})),
            ("[1,2]", serde_json::json!([1, 2])),
            (r#""hi""#, serde_json::json!("hi")),
            ("null", serde_json::Value::Null),
        ] {
            let v = publication("c", payload, Origin::Server);
            assert_eq!(v, serde_json::json!({"event": "message", "channel": "c", "data": data}));
        }
    }

    #[test]
    fn clients_cannot_forge_server_events() {
        let v = publication("c", r#"{"event":"member_added","data":1}"#, Origin::Client);
        assert_eq!(v["event"], "message");
        assert_eq!(v["data"]["event"], "member_added");
        let v = publication("c", r#"{"event":"client-typing","data":1}"#, Origin::Client);
        assert_eq!(v, serde_json::json!({"event": "client-typing", "data": 1, "channel": "c"}));
    }

    #[test]
    fn user_pushes_have_no_channel() {
        assert_eq!(
            encode_user_push(r#"{"event":"notification","data":1}"#).unwrap().as_str(),
            r#"{"event":"notification","data":1}"#
        );
        assert_eq!(encode_user_push(r#"{"event":"e","channel":"x"}"#).unwrap().as_str(), r#"{"event":"e"}"#);
        assert_eq!(encode_user_push("[1]").unwrap().as_str(), r#"{"event":"message","data":[1]}"#);
    }

    #[test]
    fn a_payload_of_known_shape_gets_the_frame_a_parsed_one_would() {
        let cases = [
            (r#"{"event":"e","data":{"a":[1,"}"]}}"#, KnownShape::EventObject),
            (r#"{"data":1}"#, KnownShape::Data),
            ("{}", KnownShape::Data),
            ("[1,2]", KnownShape::Data),
            (r#""text""#, KnownShape::Data),
        ];
        for (json, shape) in cases {
            let parsed = encode_publication("chat.room.1", json, Origin::Server).unwrap();
            assert_eq!(encode_known_delivery(Some("chat.room.1"), json, shape), parsed, "{json}");
            let parsed = encode_user_push(json).unwrap();
            assert_eq!(encode_known_delivery(None, json, shape), parsed, "{json}");
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        for s in ["plain", "quo\"te", "back\\slash", "tab\there", "João", "\u{1}"] {
            let mut out = String::new();
            push_json_str(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn invalid_payload_is_an_error() {
        assert!(encode_publication("c", "{nope", Origin::Server).is_err());
        assert!(encode_publication("c", "", Origin::Server).is_err());
    }

    #[test]
    fn replies_encode() {
        assert_eq!(Reply::Subscribed { channel: "a" }.encode().as_str(), r#"{"event":"subscribed","channel":"a"}"#);
        let refusal = Refusal::new(ErrorCode::Forbidden, Some("private-x"), "no");
        let v: serde_json::Value = serde_json::from_str(Reply::Error(&refusal).encode().as_str()).unwrap();
        assert_eq!(v, serde_json::json!({"event":"error","channel":"private-x","data":{"code":4003,"message":"no"}}));
    }
}
