//! Stage: broker. Carries what one node must tell the others: channel publications, pushes to users, presence
//! joins and leaves, and the figures `/stats` adds up. It sits beside the hub: the hub keeps this node's
//! subscribers and calls the broker when its channels appear and disappear; the broker hands what arrives from
//! other nodes back to the hub ([`Hub::publish`], [`Hub::push_to_user`], [`Hub::channel_confirmed`],
//! [`Hub::presence_joined`]).
//!
//! Two implementations share this trait: [`memory::MemoryBroker`] (a single node: every call is a no-op or reads
//! the hub) and [`redis::RedisBroker`] (Redis pub/sub and keys; docs/scaling.md). Nothing here touches Python.
//!
//! Local delivery always comes first and never waits for the broker: a publish reaches this node's subscribers
//! from the caller's thread, and the broker forwards a copy to the other nodes. So a node that loses Redis keeps
//! serving its own clients.

pub mod memory;
pub mod redis;

use std::borrow::Cow;
use std::fmt;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tungstenite::Utf8Bytes;

use crate::conn::outbox::ConnId;
use crate::hub::{ChannelInfo, Hub};

/// One node of the cluster, as `/stats` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id: the first part of the socket ids it issues (`"<node>.<n>"`).
    pub id: String,
    /// `host:port` the node listens on (the machine's host name when it listens on every interface).
    pub address: String,
    /// Its open WebSocket connections (another node's figure is at most a second old).
    pub connections: usize,
}

/// The whole cluster's figures: connections, channels with cluster-wide counts, and the nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    pub connections: usize,
    /// Every channel with a subscriber on some node, sorted by name.
    pub channels: Vec<ChannelInfo>,
    /// The live nodes, sorted by id.
    pub nodes: Vec<NodeInfo>,
}

/// A cluster read failed: Redis is unreachable or answered something unexpected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerError(pub String);

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BrokerError {}

/// What a node does with the other nodes. Every method but the reads returns at once: work that needs the
/// network is queued to the broker's own tasks.
pub trait Broker: Send + Sync {
    /// `"memory"` or `"redis"`, for logs and `/stats`.
    fn name(&self) -> &'static str;

    /// True while the node works as part of a cluster: the hub then holds a new subscriber until the broker
    /// confirms its channel ([`Hub::channel_confirmed`]), and presence members and events come from the broker.
    /// False for a single node, and for a Redis node while Redis is unreachable (it then serves alone).
    fn is_clustered(&self) -> bool;

    /// A channel got its first local subscriber (`generation` tells apart successive lives of one name).
    fn channel_added(&self, channel: &str, generation: u64);

    /// A channel lost its last local subscriber.
    fn channel_removed(&self, channel: &str);

    /// The number of local subscribers of a channel changed (for the cluster's per-channel counts).
    fn subscribers_changed(&self, channel: &str);

    /// Forward a publication to the other nodes. The caller has delivered it locally already; `exclude` is the
    /// socket id not to deliver to, on whichever node it lives.
    fn publish(&self, channel: &str, frame: &Utf8Bytes, exclude: Option<&str>);

    /// Forward a push to a user's connections on the other nodes (the caller delivered it locally).
    fn push_to_user(&self, user_id: &str, frame: &Utf8Bytes);

    /// A local connection joins a presence channel as `user_id`; `member` is its `{"id","info"}` JSON. The
    /// broker answers with [`Hub::presence_joined`] and the channel's members. Called only while clustered.
    fn presence_join(&self, channel: &str, conn: ConnId, user_id: &str, member: &str);

    /// A local connection left a presence channel.
    fn presence_leave(&self, channel: &str, conn: ConnId);

    /// The members of a presence channel across the cluster, in arrival order, as `{"id","info","connected_at"}`.
    fn presence<'a>(&'a self, hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<Vec<Value>, BrokerError>>;

    /// One channel's cluster-wide counts; a channel nobody is subscribed to has 0 subscribers.
    fn channel_info<'a>(&'a self, hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<ChannelInfo, BrokerError>>;

    /// The cluster's connections, channels and nodes.
    fn stats<'a>(&'a self, hub: &'a Hub) -> BoxFuture<'a, Result<ClusterStats, BrokerError>>;

    /// A short description for the start-up line, e.g. `redis (redis://10.0.0.5:6379/0, prefix fastws)`.
    fn describe(&self) -> String {
        self.name().to_owned()
    }
}

/// The message nodes exchange on a channel (and on the users channel): the frame exactly as subscribers get
/// it, plus routing. Built by [`envelope`] and [`user_envelope`] here and by the presence scripts, and parsed by
/// the nodes; external publishers (`fastws.Client`) build the same bytes through [`redis::RedisPublisher`].
///
/// ```text
/// {"from":"418933845","exclude":"418933845.7","frame":{"event":"new-message","data":{...},"channel":"chat"}}
/// {"from":"418933845","user":"123","frame":{"event":"notification","data":{...}}}
/// ```
///
/// `from` names the node that already delivered the frame locally (it skips its own copy); it is absent when
/// every node should deliver (external publishers, presence events). `exclude` is a socket id.
#[derive(Deserialize)]
pub struct Envelope<'a> {
    #[serde(default, borrow)]
    pub from: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub exclude: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub frame: &'a RawValue,
}

impl Envelope<'_> {
    /// The frame as subscribers receive it.
    pub fn frame(&self) -> Utf8Bytes {
        Utf8Bytes::from(self.frame.get().to_owned())
    }
}

/// The envelope of a channel publication.
pub fn envelope(from: Option<&str>, exclude: Option<&str>, frame: &str) -> String {
    let mut out = String::with_capacity(frame.len() + 64);
    out.push('{');
    push_field(&mut out, "from", from);
    push_field(&mut out, "exclude", exclude);
    out.push_str("\"frame\":");
    out.push_str(frame);
    out.push('}');
    out
}

/// The envelope of a push to a user.
pub fn user_envelope(from: Option<&str>, user_id: &str, frame: &str) -> String {
    let mut out = String::with_capacity(frame.len() + user_id.len() + 48);
    out.push('{');
    push_field(&mut out, "from", from);
    push_field(&mut out, "user", Some(user_id));
    out.push_str("\"frame\":");
    out.push_str(frame);
    out.push('}');
    out
}

fn push_field(out: &mut String, name: &str, value: Option<&str>) {
    if let Some(value) = value {
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        // serde_json's escaping is the reference; writing into a String cannot fail.
        out.push_str(&serde_json::to_string(value).unwrap_or_default());
        out.push(',');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let frame = r#"{"event":"x","channel":"c"}"#;
        let text = envelope(Some("12"), Some("12.3"), frame);
        let parsed: Envelope<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!((parsed.from.as_deref(), parsed.exclude.as_deref()), (Some("12"), Some("12.3")));
        assert_eq!(parsed.frame().as_str(), frame);
        let text = user_envelope(None, "an \"odd\" id", r#"{"event":"y"}"#);
        let parsed: Envelope<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!((parsed.from, parsed.user.as_deref()), (None, Some("an \"odd\" id")));
        assert_eq!(envelope(None, None, "1"), r#"{"frame":1}"#);
    }
}
