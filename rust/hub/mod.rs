//! Stage: hub. The channel registry of this node: channel → local subscribers; subscribe, unsubscribe, publish.
//!
//! A publication arrives already encoded ([`Utf8Bytes`], refcounted) and each subscriber's outbox gets a clone of
//! the same bytes. The registry is a std `RwLock`: publishes take the read side and only push into non-blocking
//! queues while holding it, so the lock is never held across an await or a socket write. Empty channels are
//! removed. The multi-node broker (issue: Redis scale-out) sits in front of `publish`, not inside it.
//!
//! The hub also queues the replies whose order matters: `subscribed` (with the member list on presence
//! channels) and `member_added`/`member_removed`, under the same write lock as the change they report, so no
//! publication or presence event can overtake them. It keeps the user → connections index for `to_user`.

pub mod channel;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde_json::{Map, Value};
use tungstenite::Utf8Bytes;

use channel::Channel;
pub use channel::ChannelKind;

use crate::conn::outbox::{ConnId, Outbox};
use crate::presence::Member;
use crate::protocol::Reply;
use crate::stats::Stats;

/// A snapshot of one channel for stats and the Python API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub kind: ChannelKind,
    pub subscribers: usize,
    /// Distinct users, on presence channels.
    pub members: Option<usize>,
}

impl ChannelInfo {
    fn of(name: &str, channel: &Channel) -> Self {
        ChannelInfo {
            name: name.to_owned(),
            kind: channel.kind,
            subscribers: channel.subscribers.len(),
            members: channel.presence.as_ref().map(crate::presence::Presence::len),
        }
    }
}

/// Who joins a presence channel: the user id and the info other members will see.
pub struct MemberJoin {
    pub user_id: Arc<str>,
    pub info: Map<String, Value>,
}

pub struct Hub {
    channels: RwLock<HashMap<Box<str>, Channel>>,
    /// User id → that user's open connections, for `to_user`.
    users: RwLock<HashMap<Arc<str>, Vec<Arc<Outbox>>>>,
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
            users: RwLock::new(HashMap::new()),
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

    /// Add a subscriber and queue its `subscribed` reply (with the members, on a presence channel, where
    /// `member` says who joins). Returns false when it was already subscribed (the reply is queued again).
    pub fn subscribe(&self, name: &str, outbox: &Arc<Outbox>, member: Option<MemberJoin>) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get_mut(name) {
            Some(channel) => channel,
            None => channels.entry(name.into()).or_insert_with(|| Channel::new(name)),
        };
        let added = channel.subscribers.insert(outbox.id, Arc::clone(outbox)).is_none();
        let (Some(presence), Some(member)) = (channel.presence.as_mut(), member) else {
            outbox.push(Reply::Subscribed { channel: name }.encode());
            return added;
        };
        let joined = presence.join(outbox.id, &member.user_id, member.info).map(|m| m.to_json(false));
        let members = presence.members().into_iter().map(|m| m.to_json(true)).collect();
        outbox.push(Reply::SubscribedWithMembers { channel: name, members }.encode());
        if let Some(member) = joined {
            channel.deliver(&Reply::MemberAdded { channel: name, member }.encode(), Some(outbox.id), None);
        }
        added
    }

    /// Remove a subscriber, and the channel with its last one; on a presence channel, tell the others when
    /// that was the member's last connection. Returns false when it was not subscribed.
    pub fn unsubscribe(&self, name: &str, id: ConnId) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get_mut(name) else { return false };
        let removed = channel.subscribers.remove(&id).is_some();
        if let Some(gone) = channel.presence.as_mut().and_then(|presence| presence.leave(id)) {
            channel.deliver(&Reply::MemberRemoved { channel: name, member: gone.to_json(false) }.encode(), None, None);
        }
        if channel.subscribers.is_empty() {
            channels.remove(name);
        }
        removed
    }

    /// Queue `frame` for every local subscriber of `name` except `exclude`. Returns how many it was queued for.
    pub fn publish(&self, name: &str, frame: &Utf8Bytes, exclude: Option<ConnId>) -> usize {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let queued = channels.get(name).map_or(0, |channel| {
            let timer = self.stats.publish_timer();
            let queued = channel.deliver(frame, exclude, timer.as_ref());
            if let Some(latency) = timer.and_then(|timer| timer.arm(queued)) {
                self.stats.observe_publish_latency(latency);
            }
            queued
        });
        drop(channels);
        self.stats.published(queued, frame.len());
        queued
    }

    /// Index a connection under its user, for `to_user`.
    pub fn add_user_connection(&self, user_id: &Arc<str>, outbox: &Arc<Outbox>) {
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        users.entry(Arc::clone(user_id)).or_default().push(Arc::clone(outbox));
    }

    pub fn remove_user_connection(&self, user_id: &str, id: ConnId) {
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(connections) = users.get_mut(user_id) {
            connections.retain(|outbox| outbox.id != id);
            if connections.is_empty() {
                users.remove(user_id);
            }
        }
    }

    /// Queue `frame` for every connection of a user. Returns how many it was queued for.
    pub fn push_to_user(&self, user_id: &str, frame: &Utf8Bytes) -> usize {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        let queued = users
            .get(user_id)
            .map_or(0, |connections| connections.iter().filter(|outbox| outbox.push(frame.clone())).count());
        drop(users);
        self.stats.published(queued, frame.len());
        queued
    }

    /// The members of a presence channel, in arrival order; empty when nobody is there.
    pub fn presence(&self, name: &str) -> Vec<Member> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        channels
            .get(name)
            .and_then(|channel| channel.presence.as_ref())
            .map(|presence| presence.members().into_iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn channel_info(&self, name: &str) -> Option<ChannelInfo> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        channels.get(name).map(|channel| ChannelInfo::of(name, channel))
    }

    /// Every channel with at least one local subscriber, sorted by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<ChannelInfo> =
            channels.iter().map(|(name, channel)| ChannelInfo::of(name, channel)).collect();
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
        assert!(hub.subscribe("one", &a, None));
        assert!(!hub.subscribe("one", &a, None), "subscribing twice is a no-op");
        assert!(hub.subscribe("two", &b, None));
        for _ in 0..2 {
            assert!(rx_a.recv().await.unwrap().frame.as_str().contains("subscribed"));
        }
        assert!(rx_b.recv().await.unwrap().frame.as_str().contains("subscribed"));
        assert_eq!(hub.publish("one", &Utf8Bytes::from_static("x"), None), 1);
        assert_eq!(rx_a.recv().await.unwrap().frame.as_str(), "x");
        assert!(rx_b.try_recv().is_none());
        assert_eq!(hub.publish("nobody", &Utf8Bytes::from_static("x"), None), 0);
    }

    #[tokio::test]
    async fn exclude_skips_one_subscriber() {
        let hub = Hub::new(7);
        let (a, mut rx_a) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        hub.subscribe("c", &a, None);
        hub.subscribe("c", &b, None);
        rx_a.recv().await.unwrap();
        rx_b.recv().await.unwrap();
        assert_eq!(hub.publish("c", &Utf8Bytes::from_static("x"), Some(a.id)), 1);
        assert!(rx_a.try_recv().is_none());
        assert_eq!(rx_b.recv().await.unwrap().frame.as_str(), "x");
    }

    #[test]
    fn last_unsubscribe_removes_the_channel() {
        let hub = Hub::new(7);
        let (a, _rx) = conn(&hub);
        hub.subscribe("private-x", &a, None);
        let info = hub.channel_info("private-x").unwrap();
        assert_eq!((info.kind, info.subscribers), (ChannelKind::Private, 1));
        assert!(hub.unsubscribe("private-x", a.id));
        assert!(!hub.unsubscribe("private-x", a.id));
        assert!(hub.channel_info("private-x").is_none());
        assert!(hub.channels().is_empty());
    }

    fn frame(rx: &mut crate::conn::outbox::OutboxReceiver) -> Value {
        serde_json::from_str(rx.try_recv().expect("a queued frame").frame.as_str()).unwrap()
    }

    fn join(user: &str) -> Option<MemberJoin> {
        Some(MemberJoin { user_id: user.into(), info: Map::new() })
    }

    #[test]
    fn presence_events_follow_members_not_connections() {
        let hub = Hub::new(7);
        let (ana_tab1, mut rx1) = conn(&hub);
        let (ana_tab2, mut rx2) = conn(&hub);
        let (bob, mut rx_bob) = conn(&hub);
        hub.subscribe("presence-room", &bob, join("bob"));
        assert_eq!(frame(&mut rx_bob)["data"]["members"][0]["id"], "bob");
        hub.subscribe("presence-room", &ana_tab1, join("ana"));
        assert_eq!(frame(&mut rx1)["data"]["members"].as_array().unwrap().len(), 2);
        assert_eq!(
            frame(&mut rx_bob),
            serde_json::json!({"event":"member_added","channel":"presence-room","data":{"id":"ana","info":{}}})
        );
        hub.subscribe("presence-room", &ana_tab2, join("ana"));
        frame(&mut rx2);
        assert!(rx_bob.try_recv().is_none(), "a second tab is not a new member");
        assert_eq!(hub.channel_info("presence-room").unwrap().members, Some(2));
        hub.unsubscribe("presence-room", ana_tab1.id);
        assert!(rx_bob.try_recv().is_none(), "ana still has a tab open");
        hub.unsubscribe("presence-room", ana_tab2.id);
        assert_eq!(frame(&mut rx_bob)["event"], "member_removed");
        assert_eq!(hub.presence("presence-room").len(), 1);
    }

    #[tokio::test]
    async fn push_to_user_reaches_all_of_their_connections() {
        let hub = Hub::new(7);
        let (a1, mut rx1) = conn(&hub);
        let (a2, mut rx2) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        let (ana, bob): (Arc<str>, Arc<str>) = ("ana".into(), "bob".into());
        hub.add_user_connection(&ana, &a1);
        hub.add_user_connection(&ana, &a2);
        hub.add_user_connection(&bob, &b);
        assert_eq!(hub.push_to_user("ana", &Utf8Bytes::from_static("x")), 2);
        assert_eq!(rx1.recv().await.unwrap().frame.as_str(), "x");
        assert_eq!(rx2.recv().await.unwrap().frame.as_str(), "x");
        assert!(rx_b.try_recv().is_none());
        hub.remove_user_connection("ana", a1.id);
        hub.remove_user_connection("ana", a2.id);
        assert_eq!(hub.push_to_user("ana", &Utf8Bytes::from_static("x")), 0);
    }

    #[test]
    fn socket_ids_round_trip_on_this_node_only() {
        let hub = Hub::new(42);
        assert_eq!(hub.conn_id_of(&hub.socket_id(9)), Some(9));
        assert_eq!(hub.conn_id_of("41.9"), None);
        assert_eq!(hub.conn_id_of("garbage"), None);
    }
}
