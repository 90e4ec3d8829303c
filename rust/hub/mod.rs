//! Stage: hub. The channel registry of this node: channel → local subscribers; subscribe, unsubscribe, publish.
//!
//! A publication arrives already encoded ([`Utf8Bytes`], refcounted) and each subscriber's outbox gets a clone of
//! the same bytes. The registry is a std `RwLock`: publishes take the read side and only push into non-blocking
//! queues while holding it, so the lock is never held across an await or a socket write. Empty channels are
//! removed. The multi-node broker (issue: Redis scale-out) sits in front of `publish`, not inside it.

pub mod channel;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tungstenite::Utf8Bytes;

use channel::Channel;
pub use channel::ChannelKind;

use crate::conn::outbox::{ConnId, Outbox};
use crate::stats::Stats;

/// A snapshot of one channel for stats and the Python API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub kind: ChannelKind,
    pub subscribers: usize,
}

pub struct Hub {
    channels: RwLock<HashMap<Box<str>, Channel>>,
    connections: AtomicUsize,
    next_conn_id: AtomicU64,
    /// Distinguishes this process's socket ids from another node's (`"<node>.<conn>"`, Pusher's socket_id shape).
    node_id: u32,
    pub stats: Stats,
}

impl Hub {
    pub fn new(node_id: u32) -> Self {
        Hub {
            channels: RwLock::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            node_id,
            stats: Stats::default(),
        }
    }

    pub fn new_conn_id(&self) -> ConnId {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn socket_id(&self, id: ConnId) -> String {
        format!("{}.{}", self.node_id, id)
    }

    /// The local connection a socket id names, if it was issued by this node.
    pub fn conn_id_of(&self, socket_id: &str) -> Option<ConnId> {
        let (node, id) = socket_id.split_once('.')?;
        (node.parse::<u32>().ok()? == self.node_id).then(|| id.parse().ok())?
    }

    pub fn connection_opened(&self) -> usize {
        self.connections.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Add a subscriber. Returns false when it was already subscribed.
    pub fn subscribe(&self, name: &str, outbox: &Arc<Outbox>) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get_mut(name) {
            Some(channel) => channel,
            None => channels.entry(name.into()).or_insert_with(|| Channel::new(name)),
        };
        channel.subscribers.insert(outbox.id, Arc::clone(outbox)).is_none()
    }

    /// Remove a subscriber, and the channel with its last one. Returns false when it was not subscribed.
    pub fn unsubscribe(&self, name: &str, id: ConnId) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get_mut(name) else {
            return false;
        };
        let removed = channel.subscribers.remove(&id).is_some();
        if channel.subscribers.is_empty() {
            channels.remove(name);
        }
        removed
    }

    /// Queue `frame` for every local subscriber of `name` except `exclude`. Returns how many it was queued for.
    pub fn publish(&self, name: &str, frame: &Utf8Bytes, exclude: Option<ConnId>) -> usize {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get(name) else { return 0 };
        let mut queued = 0;
        for (id, outbox) in &channel.subscribers {
            if Some(*id) != exclude && outbox.push(frame.clone()) {
                queued += 1;
            }
        }
        drop(channels);
        self.stats.published(queued, frame.len());
        queued
    }

    pub fn channel_info(&self, name: &str) -> Option<ChannelInfo> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        channels.get(name).map(|c| ChannelInfo {
            name: name.to_owned(),
            kind: c.kind,
            subscribers: c.subscribers.len(),
        })
    }

    /// Every channel with at least one local subscriber, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<ChannelInfo> = channels
            .iter()
            .map(|(name, c)| ChannelInfo {
                name: name.to_string(),
                kind: c.kind,
                subscribers: c.subscribers.len(),
            })
            .collect();
        drop(channels);
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(hub: &Hub) -> (Arc<Outbox>, crate::conn::outbox::OutboxReceiver) {
        let (outbox, rx) = Outbox::new(hub.new_conn_id(), 1 << 20);
        (Arc::new(outbox), rx)
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_of_that_channel_only() {
        let hub = Hub::new(7);
        let (a, mut rx_a) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        assert!(hub.subscribe("one", &a));
        assert!(!hub.subscribe("one", &a), "subscribing twice is a no-op");
        assert!(hub.subscribe("two", &b));
        assert_eq!(hub.publish("one", &Utf8Bytes::from_static("x"), None), 1);
        assert_eq!(rx_a.recv().await.unwrap().as_str(), "x");
        assert!(rx_b.try_recv().is_none());
        assert_eq!(hub.publish("nobody", &Utf8Bytes::from_static("x"), None), 0);
    }

    #[tokio::test]
    async fn exclude_skips_one_subscriber() {
        let hub = Hub::new(7);
        let (a, mut rx_a) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        hub.subscribe("c", &a);
        hub.subscribe("c", &b);
        assert_eq!(hub.publish("c", &Utf8Bytes::from_static("x"), Some(a.id)), 1);
        assert!(rx_a.try_recv().is_none());
        assert_eq!(rx_b.recv().await.unwrap().as_str(), "x");
    }

    #[test]
    fn last_unsubscribe_removes_the_channel() {
        let hub = Hub::new(7);
        let (a, _rx) = conn(&hub);
        hub.subscribe("private-x", &a);
        let info = hub.channel_info("private-x").unwrap();
        assert_eq!((info.kind, info.subscribers), (ChannelKind::Private, 1));
        assert!(hub.unsubscribe("private-x", a.id));
        assert!(!hub.unsubscribe("private-x", a.id));
        assert!(hub.channel_info("private-x").is_none());
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn socket_ids_round_trip_on_this_node_only() {
        let hub = Hub::new(42);
        assert_eq!(hub.conn_id_of(&hub.socket_id(9)), Some(9));
        assert_eq!(hub.conn_id_of("41.9"), None);
        assert_eq!(hub.conn_id_of("garbage"), None);
    }
}
