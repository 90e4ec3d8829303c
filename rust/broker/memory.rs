//! The single-node broker: there are no other nodes, so forwarding is a no-op and the cluster's figures are
//! this node's. The hub then behaves as it always did: subscriptions are confirmed at once and presence
//! events come from its own member lists.

use futures_util::future::{self, BoxFuture, FutureExt};
use serde_json::Value;
use tungstenite::Utf8Bytes;

use super::{Broker, BrokerError, ClusterStats, NodeInfo};
use crate::conn::outbox::ConnId;
use crate::hub::{ChannelInfo, Hub};

/// The broker of a server without `redis_url`.
#[derive(Default)]
pub struct MemoryBroker {
    /// This node's `host:port`, for `/stats`.
    address: String,
}

impl MemoryBroker {
    pub fn new(address: String) -> Self {
        MemoryBroker { address }
    }
}

impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn is_clustered(&self) -> bool {
        false
    }

    fn channel_added(&self, _channel: &str, _generation: u64) {}

    fn channel_removed(&self, _channel: &str) {}

    fn subscribers_changed(&self, _channel: &str) {}

    fn publish(&self, _channel: &str, _frame: &Utf8Bytes, _exclude: Option<&str>) {}

    fn push_to_user(&self, _user_id: &str, _frame: &Utf8Bytes) {}

    fn presence_join(&self, _channel: &str, _conn: ConnId, _user_id: &str, _member: &str) {}

    fn presence_leave(&self, _channel: &str, _conn: ConnId) {}

    fn presence<'a>(&'a self, hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<Vec<Value>, BrokerError>> {
        future::ready(Ok(hub.presence(channel).iter().map(|member| member.to_json(true)).collect())).boxed()
    }

    fn channel_info<'a>(&'a self, hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<ChannelInfo, BrokerError>> {
        future::ready(Ok(hub.channel_info(channel).unwrap_or_else(|| ChannelInfo::empty(channel)))).boxed()
    }

    fn stats<'a>(&'a self, hub: &'a Hub) -> BoxFuture<'a, Result<ClusterStats, BrokerError>> {
        let connections = hub.connection_count();
        let node = NodeInfo { id: hub.node_id().to_string(), address: self.address.clone(), connections };
        future::ready(Ok(ClusterStats { connections, channels: hub.channels(), nodes: vec![node] })).boxed()
    }
}
