//! Stage: hub. The channel registry of this node: channel → local subscribers; subscribe, unsubscribe, publish.
//!
//! A publication arrives already encoded ([`Utf8Bytes`], refcounted) and each subscriber's outbox gets a clone of
//! the same bytes. The registry is a std `RwLock`: publishes take the read side and only push into non-blocking
//! queues while holding it, so the lock is never held across an await or a socket write. Empty channels are
//! removed. The broker (rust/broker) sits beside it: [`Hub::broadcast`] delivers locally, then hands the
//! publication to the broker for the other nodes; what the broker receives comes back through [`Hub::publish`].
//!
//! The hub also queues the replies whose order matters: `subscribed` (with the member list on presence
//! channels) and `member_added`/`member_removed`, under the same write lock as the change they report, so no
//! publication or presence event can overtake them. It keeps the user → connections index for `to_user`.
//!
//! In a cluster ([`Broker::is_clustered`]) a new subscriber is *held*, not delivered to, until the broker
//! confirms that the channel's publications reach this node ([`Hub::channel_confirmed`]) and, on a presence
//! channel, sends the cluster's member list ([`Hub::presence_joined`]); presence events then come from the
//! broker, not from the local member list. If the broker loses the cluster ([`Hub::cluster_down`]) the held
//! subscribers are released and the node works as a single one until it is back.

pub mod channel;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tungstenite::Utf8Bytes;

pub use channel::ChannelKind;
use channel::{Channel, Held};

use crate::broker::memory::MemoryBroker;
use crate::broker::Broker;
use crate::conn::outbox::{ConnId, Outbox};
use crate::conn::sweep::Connections;
use crate::conn::wire;
use crate::presence::Member;
use crate::protocol::Reply;
use crate::stats::Stats;

thread_local! {
    /// The subscribers of a sparse publication, between the channel lookup and the writes (reused per thread).
    static SPARSE: std::cell::RefCell<Vec<Arc<Outbox>>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

    /// A channel nobody is subscribed to.
    pub fn empty(name: &str) -> Self {
        let kind = ChannelKind::of(name);
        ChannelInfo {
            name: name.to_owned(),
            kind,
            subscribers: 0,
            members: (kind == ChannelKind::Presence).then_some(0),
        }
    }
}

/// What [`Hub::join`] did: subscribed at once, or holding the subscriber until the cluster confirms (the
/// receiver completes when `subscribed` has been queued; it fails if the subscriber left first).
pub enum Joining {
    Done,
    Waiting(oneshot::Receiver<()>),
}

/// One local connection on a presence channel: (connection, user id, member `{"id","info"}` JSON).
pub type PresenceEntry = (ConnId, Arc<str>, String);

/// This node's share of the cluster, for the broker to write into Redis after a reconnection.
pub struct ClusterSnapshot {
    /// Per presence channel, its local connections.
    pub presence: Vec<(String, Vec<PresenceEntry>)>,
    /// Local subscribers per channel.
    pub subscribers: Vec<(String, usize)>,
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
    /// Every upgraded connection's outbox, for the sweeper (heartbeats, idle timeout, stop).
    pub live: Arc<Connections>,
    next_conn_id: AtomicU64,
    /// Distinguishes this process's socket ids from another node's (`"<node>.<conn>"`, Pusher's socket_id shape).
    node_id: u32,
    pub stats: Stats,
    broker: Arc<dyn Broker>,
    /// Numbers channel lives, so a confirmation for a removed channel cannot release its successor's subscribers.
    generations: AtomicU64,
}

impl Hub {
    /// A single node's hub.
    pub fn new(node_id: u32) -> Self {
        Hub::with_broker(node_id, Arc::new(MemoryBroker::default()))
    }

    pub fn with_broker(node_id: u32, broker: Arc<dyn Broker>) -> Self {
        Hub {
            channels: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            live: Arc::default(),
            next_conn_id: AtomicU64::new(1),
            node_id,
            stats: Stats::default(),
            broker,
            generations: AtomicU64::new(0),
        }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    pub fn node_id(&self) -> u32 {
        self.node_id
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

    /// Add a subscriber at once and queue its `subscribed` reply (with the members, on a presence channel, where
    /// `member` says who joins), as a single node does. Returns false when it was already subscribed (the reply
    /// is queued again). Connections use [`Hub::join`], which also waits for the cluster.
    pub fn subscribe(&self, name: &str, outbox: &Arc<Outbox>, member: Option<MemberJoin>) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let channel = self.channel_entry(&mut channels, name);
        let added = subscribe_now(name, channel, outbox, member);
        drop(channels);
        self.broker.subscribers_changed(name);
        added
    }

    /// Subscribe a connection: at once on a single node; in a cluster, held until the broker confirms the channel
    /// (and sends the members, on a presence channel). Subscribing again queues the reply again.
    pub fn join(&self, name: &str, outbox: &Arc<Outbox>, member: Option<MemberJoin>) -> Joining {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock: cluster_down takes it too, so a subscriber is never held after it released them.
        let clustered = self.broker.is_clustered();
        let channel = self.channel_entry(&mut channels, name);
        let id = outbox.id;
        if !clustered {
            subscribe_now(name, channel, outbox, member);
            drop(channels);
            self.broker.subscribers_changed(name);
            return Joining::Done;
        }
        if channel.subscribers.contains_key(&id) {
            // Already subscribed: the reply again; on a presence channel the broker sends it with the members.
            match member.filter(|_| channel.presence.is_some()) {
                Some(member) => {
                    let json = member_json(&member.user_id, &member.info);
                    self.broker.presence_join(name, id, &member.user_id, &json);
                }
                None => {
                    outbox.push(Reply::Subscribed { channel: name }.encode());
                }
            }
            return Joining::Done;
        }
        let member = match (channel.presence.as_mut(), member) {
            (Some(presence), Some(member)) => {
                let json = member_json(&member.user_id, &member.info);
                // The local list only records this node's share here; the events come from the broker.
                presence.join(id, &member.user_id, member.info);
                Some((member.user_id, json))
            }
            _ => None,
        };
        if channel.confirmed && member.is_none() {
            channel.subscribers.insert(id, Arc::clone(outbox));
            outbox.push(Reply::Subscribed { channel: name }.encode());
            drop(channels);
            self.broker.subscribers_changed(name);
            return Joining::Done;
        }
        let join_sent = channel.confirmed;
        if let (true, Some((user_id, json))) = (join_sent, &member) {
            self.broker.presence_join(name, id, user_id, json);
        }
        let (done, released) = oneshot::channel();
        channel.held.insert(id, Held { outbox: Arc::clone(outbox), member, join_sent, done });
        Joining::Waiting(released)
    }

    /// The channel entry, created (and announced to the broker) when it is new.
    fn channel_entry<'a>(&self, channels: &'a mut HashMap<Box<str>, Channel>, name: &str) -> &'a mut Channel {
        if !channels.contains_key(name) {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
            self.broker.channel_added(name, generation);
            channels.insert(name.into(), Channel::new(name, generation));
        }
        channels.get_mut(name).expect("the channel was just inserted")
    }

    /// Remove a subscriber (or a held one), and the channel with its last one; on a presence channel, tell the
    /// others when that was the member's last connection (in a cluster, the broker does). Returns false when it
    /// was not subscribed.
    pub fn unsubscribe(&self, name: &str, id: ConnId) -> bool {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get_mut(name) else { return false };
        // Dropping a held entry fails its waiter: the connection already stopped waiting.
        let removed = channel.subscribers.remove(&id).is_some() || channel.held.remove(&id).is_some();
        let gone = channel.presence.as_mut().and_then(|presence| presence.leave(id));
        if self.broker.is_clustered() {
            if removed && channel.presence.is_some() {
                self.broker.presence_leave(name, id);
            }
        } else if let Some(gone) = gone {
            channel.deliver(&Reply::MemberRemoved { channel: name, member: gone.to_json(false) }.encode(), None, None);
        }
        if channel.subscribers.is_empty() && channel.held.is_empty() {
            channels.remove(name);
            self.broker.channel_removed(name);
        }
        drop(channels);
        if removed {
            self.broker.subscribers_changed(name);
        }
        removed
    }

    /// The broker confirmed a channel (the life `generation` of it): release its held subscribers, or send their
    /// presence joins.
    pub fn channel_confirmed(&self, name: &str, generation: u64) {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get_mut(name).filter(|c| c.generation == generation && !c.confirmed) else {
            return;
        };
        channel.confirmed = true;
        let mut released = false;
        for (id, mut waiting) in std::mem::take(&mut channel.held) {
            match &waiting.member {
                None => {
                    channel.subscribers.insert(id, Arc::clone(&waiting.outbox));
                    waiting.outbox.push(Reply::Subscribed { channel: name }.encode());
                    let _ = waiting.done.send(());
                    released = true;
                }
                Some((user_id, json)) => {
                    if !waiting.join_sent {
                        self.broker.presence_join(name, id, user_id, json);
                        waiting.join_sent = true;
                    }
                    channel.held.insert(id, waiting);
                }
            }
        }
        drop(channels);
        if released {
            self.broker.subscribers_changed(name);
        }
    }

    /// The broker's member list for a presence join: release the held connection with it (or, for a repeated
    /// subscribe, queue the reply again).
    pub fn presence_joined(&self, name: &str, id: ConnId, members: Vec<Value>) {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get_mut(name) else { return };
        if let Some(waiting) = channel.held.remove(&id) {
            channel.subscribers.insert(id, Arc::clone(&waiting.outbox));
            waiting.outbox.push(Reply::SubscribedWithMembers { channel: name, members }.encode());
            let _ = waiting.done.send(());
            drop(channels);
            self.broker.subscribers_changed(name);
        } else if let Some(outbox) = channel.subscribers.get(&id) {
            outbox.push(Reply::SubscribedWithMembers { channel: name, members }.encode());
        }
    }

    /// The broker lost the cluster: forget the confirmations and release every held subscriber as a single
    /// node would (presence lists are then this node's).
    pub fn cluster_down(&self) {
        let mut channels = self.channels.write().unwrap_or_else(PoisonError::into_inner);
        for (name, channel) in channels.iter_mut() {
            channel.confirmed = false;
            for (id, waiting) in channel.held.drain() {
                channel.subscribers.insert(id, Arc::clone(&waiting.outbox));
                let reply = match (&channel.presence, &waiting.member) {
                    (Some(presence), Some(_)) => {
                        let members = presence.members().into_iter().map(|m| m.to_json(true)).collect();
                        Reply::SubscribedWithMembers { channel: name, members }
                    }
                    _ => Reply::Subscribed { channel: name },
                };
                waiting.outbox.push(reply.encode());
                let _ = waiting.done.send(());
            }
        }
    }

    /// Every channel with its generation, for the broker to subscribe to after a reconnection.
    pub fn channel_generations(&self) -> Vec<(String, u64)> {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        channels.iter().map(|(name, channel)| (name.to_string(), channel.generation)).collect()
    }

    /// This node's presence connections and subscriber counts.
    pub fn cluster_snapshot(&self) -> ClusterSnapshot {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let mut snapshot = ClusterSnapshot { presence: Vec::new(), subscribers: Vec::new() };
        for (name, channel) in channels.iter() {
            if !channel.subscribers.is_empty() {
                snapshot.subscribers.push((name.to_string(), channel.subscribers.len()));
            }
            if let Some(presence) = channel.presence.as_ref().filter(|presence| !presence.is_empty()) {
                let entries = presence
                    .connections()
                    .map(|(id, member)| (id, Arc::clone(&member.id), member.to_json(false).to_string()))
                    .collect();
                snapshot.presence.push((name.to_string(), entries));
            }
        }
        snapshot
    }

    /// Deliver `frame` to every local subscriber of `name` except `exclude`: written at once to the idle sockets
    /// when the publication is sparse (see `Hub::sparse_audience`), queued otherwise. `more_coming`: the caller
    /// has more publications right behind this one. Returns how many subscribers took it.
    pub fn publish(&self, name: &str, frame: &Utf8Bytes, exclude: Option<ConnId>, more_coming: bool) -> usize {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get(name) else {
            return 0;
        };
        let timer = self.stats.publish_timer();
        let queued = if !more_coming && self.sparse_audience(channel, exclude) {
            drop(channels);
            let wire = encode_once([frame]);
            SPARSE.with_borrow_mut(|outboxes| {
                outboxes.drain(..).filter(|outbox| outbox.write_or_push(frame.clone(), timer.as_ref(), &wire)).count()
            })
        } else {
            channel.deliver(frame, exclude, timer.as_ref())
        };
        if let Some(latency) = timer.and_then(|timer| timer.arm(queued)) {
            self.stats.observe_publish_latency(latency);
        }
        self.stats.published(queued, frame.len());
        queued
    }

    /// [`Hub::publish`] for several publications to `name`, one write or push per subscriber for the lot.
    pub fn publish_many(&self, name: &str, frames: &[Utf8Bytes], exclude: Option<ConnId>, more_coming: bool) -> usize {
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        let Some(channel) = channels.get(name) else {
            return 0;
        };
        let timed: Vec<_> = frames.iter().map(|frame| (frame.clone(), self.stats.publish_timer())).collect();
        let queued = if !more_coming && self.sparse_audience(channel, exclude) {
            drop(channels);
            let wire = encode_once(frames);
            SPARSE.with_borrow_mut(|outboxes| {
                outboxes.drain(..).filter(|outbox| outbox.write_or_push_many(&timed, &wire)).count()
            })
        } else {
            channel.deliver_many(&timed, exclude)
        };
        for (_, timer) in timed {
            if let Some(latency) = timer.and_then(|timer| timer.arm(queued)) {
                self.stats.observe_publish_latency(latency);
            }
        }
        for frame in frames {
            self.stats.published(queued, frame.len());
        }
        queued
    }

    /// Whether this publication to `channel` is sparse (see [`Channel::publication_is_sparse`]), to be written to
    /// each subscriber at once (`Outbox::write_or_push`) rather than by the subscriber's task. Not when the caller
    /// has `more_coming` (a backlog of pushes): queued, the connection tasks write them together, up to 64
    /// frames a write, where direct writes would write each run alone. If it is sparse, its subscribers but
    /// `exclude` are copied into [`SPARSE`], so that the frames can be written to them after the channels' lock
    /// is released (a direct write takes microseconds; a subscribe elsewhere must not wait for a whole sweep).
    fn sparse_audience(&self, channel: &Channel, exclude: Option<ConnId>) -> bool {
        let now = u64::try_from(self.stats.uptime().as_micros()).unwrap_or(u64::MAX);
        let sparse = channel.publication_is_sparse(now);
        if sparse {
            SPARSE.with_borrow_mut(|outboxes| channel.collect(exclude, outboxes));
        }
        sparse
    }

    /// Several publications to one channel: [`Hub::broadcast`] for each, with one push per local subscriber.
    pub fn broadcast_many(&self, name: &str, frames: &[Utf8Bytes], exclude: Option<&str>, more_coming: bool) -> usize {
        let exclude_id = exclude.and_then(|socket_id| self.conn_id_of(socket_id));
        let queued = self.publish_many(name, frames, exclude_id, more_coming);
        for frame in frames {
            self.broker.publish(name, frame, exclude);
        }
        queued
    }

    /// How many local subscribers a publication to `name` would reach now (what `publish` would return).
    pub fn audience(&self, name: &str, exclude: Option<&str>) -> usize {
        let exclude = exclude.and_then(|socket_id| self.conn_id_of(socket_id));
        let channels = self.channels.read().unwrap_or_else(PoisonError::into_inner);
        channels.get(name).map_or(0, |channel| {
            let excluded = exclude.is_some_and(|id| channel.subscribers.contains_key(&id));
            channel.subscribers.len() - usize::from(excluded)
        })
    }

    /// How many local connections a push to this user would reach now (what `push_to_user` would return).
    pub fn user_audience(&self, user_id: &str) -> usize {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        users.get(user_id).map_or(0, Vec::len)
    }

    /// Deliver to this node's subscribers, then hand the publication to the broker for the other nodes.
    /// `exclude` is a socket id (of any node). Returns how many local subscribers it was queued for. `more_coming`:
    /// the caller has more publications to deliver right after this one (see [`Hub::publish`]).
    pub fn broadcast(&self, name: &str, frame: &Utf8Bytes, exclude: Option<&str>, more_coming: bool) -> usize {
        let queued = self.publish(name, frame, exclude.and_then(|socket_id| self.conn_id_of(socket_id)), more_coming);
        self.broker.publish(name, frame, exclude);
        queued
    }

    /// Deliver to the user's connections on this node, then hand the push to the broker for the other nodes.
    pub fn broadcast_to_user(&self, user_id: &str, frame: &Utf8Bytes) -> usize {
        let queued = self.push_to_user(user_id, frame);
        self.broker.push_to_user(user_id, frame);
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

/// A sparse publication's frames as they go on the wire: encoded once here, then written as they are to each
/// subscriber (one contiguous buffer per write; see `WsConn::poll_write_frames` for why not `writev` slices).
fn encode_once<'a>(frames: impl IntoIterator<Item = &'a Utf8Bytes>) -> Vec<u8> {
    let mut wire = Vec::new();
    wire::push_text_frames(&mut wire, frames.into_iter().map(|frame| frame.as_bytes()));
    wire
}

/// Subscribe at once, as a single node does: queue `subscribed` (with the members on a presence channel) and,
/// for a user's first connection there, `member_added` to the others. Returns false when already subscribed.
fn subscribe_now(name: &str, channel: &mut Channel, outbox: &Arc<Outbox>, member: Option<MemberJoin>) -> bool {
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

/// A member as the other members see it: `{"id","info"}`.
fn member_json(user_id: &str, info: &Map<String, Value>) -> String {
    serde_json::json!({"id": user_id, "info": info}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(hub: &Hub) -> (Arc<Outbox>, crate::conn::outbox::OutboxReceiver) {
        Outbox::new(hub.new_conn_id(), 1 << 20, 0)
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
        assert_eq!(hub.publish("one", &Utf8Bytes::from_static("x"), None, false), 1);
        assert_eq!(rx_a.recv().await.unwrap().frame.as_str(), "x");
        assert!(rx_b.try_recv().is_none());
        assert_eq!(hub.publish("nobody", &Utf8Bytes::from_static("x"), None, false), 0);
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
        assert_eq!(hub.publish("c", &Utf8Bytes::from_static("x"), Some(a.id), false), 1);
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

    /// A broker that is clustered while `up` and records what the hub asks of it.
    #[derive(Default)]
    struct RecordingBroker {
        up: std::sync::atomic::AtomicBool,
        calls: std::sync::Mutex<Vec<String>>,
    }

    impl RecordingBroker {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn record(&self, call: String) {
            self.calls.lock().unwrap().push(call);
        }
    }

    impl Broker for RecordingBroker {
        fn name(&self) -> &'static str {
            "recording"
        }
        fn is_clustered(&self) -> bool {
            self.up.load(Ordering::SeqCst)
        }
        fn channel_added(&self, channel: &str, generation: u64) {
            self.record(format!("added {channel} {generation}"));
        }
        fn channel_removed(&self, channel: &str) {
            self.record(format!("removed {channel}"));
        }
        fn subscribers_changed(&self, _channel: &str) {}
        fn publish(&self, channel: &str, _frame: &Utf8Bytes, exclude: Option<&str>) {
            self.record(format!("publish {channel} {exclude:?}"));
        }
        fn push_to_user(&self, user_id: &str, _frame: &Utf8Bytes) {
            self.record(format!("user {user_id}"));
        }
        fn presence_join(&self, channel: &str, conn: ConnId, user_id: &str, member: &str) {
            self.record(format!("join {channel} {conn} {user_id} {member}"));
        }
        fn presence_leave(&self, channel: &str, conn: ConnId) {
            self.record(format!("leave {channel} {conn}"));
        }
        fn presence<'a>(
            &'a self,
            _hub: &'a Hub,
            _channel: &'a str,
        ) -> futures_util::future::BoxFuture<'a, Result<Vec<Value>, crate::broker::BrokerError>> {
            unimplemented!()
        }
        fn channel_info<'a>(
            &'a self,
            _hub: &'a Hub,
            _channel: &'a str,
        ) -> futures_util::future::BoxFuture<'a, Result<ChannelInfo, crate::broker::BrokerError>> {
            unimplemented!()
        }
        fn stats<'a>(
            &'a self,
            _hub: &'a Hub,
        ) -> futures_util::future::BoxFuture<'a, Result<crate::broker::ClusterStats, crate::broker::BrokerError>>
        {
            unimplemented!()
        }
    }

    fn clustered_hub() -> (Hub, Arc<RecordingBroker>) {
        let broker = Arc::new(RecordingBroker::default());
        broker.up.store(true, Ordering::SeqCst);
        (Hub::with_broker(7, Arc::clone(&broker) as Arc<dyn Broker>), broker)
    }

    fn waiting(joining: Joining) -> oneshot::Receiver<()> {
        match joining {
            Joining::Waiting(released) => released,
            Joining::Done => panic!("expected the hub to hold the subscriber"),
        }
    }

    #[test]
    fn in_a_cluster_subscribed_waits_for_the_brokers_confirmation() {
        let (hub, broker) = clustered_hub();
        let (a, mut rx_a) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        let mut released = waiting(hub.join("news", &a, None));
        assert_eq!(broker.take(), ["added news 1"]);
        assert!(rx_a.try_recv().is_none(), "no reply before the confirmation");
        assert_eq!(hub.publish("news", &Utf8Bytes::from_static("early"), None, false), 0, "held: not delivered to");
        let mut released_b = waiting(hub.join("news", &b, None));
        hub.channel_confirmed("news", 99); // another life of the channel: ignored
        assert!(released.try_recv().is_err());
        hub.channel_confirmed("news", 1);
        assert!(released.try_recv().is_ok() && released_b.try_recv().is_ok());
        assert_eq!(frame(&mut rx_a), serde_json::json!({"event":"subscribed","channel":"news"}));
        frame(&mut rx_b);
        assert_eq!(hub.publish("news", &Utf8Bytes::from_static("x"), None, false), 2);
        // Once confirmed, a new subscriber is answered at once.
        let (c, mut rx_c) = conn(&hub);
        assert!(matches!(hub.join("news", &c, None), Joining::Done));
        assert_eq!(frame(&mut rx_c)["event"], "subscribed");
        // broadcast delivers locally and forwards, with the socket id to exclude.
        assert_eq!(hub.broadcast("news", &Utf8Bytes::from_static("y"), Some(&hub.socket_id(a.id)), false), 2);
        assert_eq!(broker.take(), [format!("publish news Some(\"7.{}\")", a.id)]);
        for id in [a.id, b.id, c.id] {
            hub.unsubscribe("news", id);
        }
        assert_eq!(broker.take(), ["removed news"]);
    }

    #[test]
    fn a_held_subscriber_that_leaves_is_never_answered() {
        let (hub, broker) = clustered_hub();
        let (a, mut rx_a) = conn(&hub);
        let mut released = waiting(hub.join("news", &a, None));
        assert!(hub.unsubscribe("news", a.id));
        assert!(released.try_recv().is_err(), "the wait fails: the subscriber is gone");
        assert_eq!(broker.take(), ["added news 1", "removed news"]);
        // The channel comes back to life under a new generation; the old confirmation releases nobody.
        let (b, _rx_b) = conn(&hub);
        let _released = waiting(hub.join("news", &b, None));
        hub.channel_confirmed("news", 1);
        assert!(rx_a.try_recv().is_none());
        assert_eq!(hub.channel_info("news").unwrap().subscribers, 0);
        hub.channel_confirmed("news", 2);
        assert_eq!(hub.channel_info("news").unwrap().subscribers, 1);
    }

    #[test]
    fn cluster_presence_takes_members_and_events_from_the_broker() {
        let (hub, broker) = clustered_hub();
        let (ana, mut rx_ana) = conn(&hub);
        let (bob, mut rx_bob) = conn(&hub);
        let mut released = waiting(hub.join("presence-room", &ana, join("ana")));
        hub.channel_confirmed("presence-room", 1);
        assert_eq!(
            broker.take(),
            [
                "added presence-room 1".to_owned(),
                format!("join presence-room {} ana {{\"id\":\"ana\",\"info\":{{}}}}", ana.id)
            ]
        );
        assert!(released.try_recv().is_err(), "the member list is still to come");
        let members = vec![
            serde_json::json!({"id": "zoe", "info": {}, "connected_at": 1}),
            serde_json::json!({"id": "ana", "info": {}, "connected_at": 2}),
        ];
        hub.presence_joined("presence-room", ana.id, members.clone());
        assert!(released.try_recv().is_ok());
        assert_eq!(frame(&mut rx_ana)["data"]["members"], Value::Array(members));
        // A second local member: no member_added from the hub itself (the broker publishes events).
        let _bob_released = waiting(hub.join("presence-room", &bob, join("bob")));
        assert!(rx_ana.try_recv().is_none());
        hub.presence_joined("presence-room", bob.id, Vec::new());
        frame(&mut rx_bob);
        broker.take();
        hub.unsubscribe("presence-room", ana.id);
        assert!(rx_bob.try_recv().is_none(), "member_removed comes from the broker");
        assert_eq!(broker.take(), [format!("leave presence-room {}", ana.id)]);
        let snapshot = hub.cluster_snapshot();
        assert_eq!(snapshot.presence.len(), 1);
        assert_eq!(snapshot.presence[0].1[0].1.as_ref(), "bob");
        assert_eq!(snapshot.subscribers, [("presence-room".to_owned(), 1)]);
    }

    #[test]
    fn losing_the_cluster_releases_held_subscribers_as_a_single_node() {
        let (hub, broker) = clustered_hub();
        let (a, mut rx_a) = conn(&hub);
        let (b, mut rx_b) = conn(&hub);
        let mut released_a = waiting(hub.join("news", &a, None));
        let mut released_b = waiting(hub.join("presence-room", &b, join("bob")));
        broker.up.store(false, Ordering::SeqCst);
        hub.cluster_down();
        assert!(released_a.try_recv().is_ok() && released_b.try_recv().is_ok());
        assert_eq!(frame(&mut rx_a)["event"], "subscribed");
        assert_eq!(frame(&mut rx_b)["data"]["members"][0]["id"], "bob", "this node's own members");
        assert_eq!(hub.channel_generations().len(), 2);
        // Alone, the hub answers at once again and sends presence events itself.
        let (c, mut rx_c) = conn(&hub);
        assert!(matches!(hub.join("presence-room", &c, join("cy")), Joining::Done));
        frame(&mut rx_c);
        assert_eq!(frame(&mut rx_b)["event"], "member_added");
    }
}
