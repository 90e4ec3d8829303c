//! One channel: its type (from its name), its local subscribers and, on presence channels, its members.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;
use tungstenite::Utf8Bytes;

use crate::conn::outbox::{ConnId, Outbox};
use crate::presence::Presence;
use crate::stats::PublishTimer;

/// Channel types, decided by name prefix as in Pusher: `private-…` and `presence-…` need an authorized user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    Presence,
}

impl ChannelKind {
    pub fn of(name: &str) -> Self {
        if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Public => "public",
            ChannelKind::Private => "private",
            ChannelKind::Presence => "presence",
        }
    }
}

pub struct Channel {
    pub kind: ChannelKind,
    pub subscribers: HashMap<ConnId, Arc<Outbox>>,
    /// Members, on `presence-` channels only. In a cluster: this node's connections, which the broker mirrors.
    pub presence: Option<Presence>,
    /// Which life of this name the channel is (it is removed when empty): the broker's confirmations name it.
    pub generation: u64,
    /// In a cluster, the broker confirmed that publications from other nodes reach this node.
    pub confirmed: bool,
    /// Subscribers waiting for the cluster (not delivered to yet); empty on a single node.
    pub held: HashMap<ConnId, Held>,
    /// When the last publication came ([`Hub`](super::Hub)'s clock, µs): tells sparse publications from bursts.
    last_publication: AtomicU64,
}

/// Publications at least this far apart (µs) are "sparse": each subscriber gets each alone, so writing it at once
/// beats waking the subscriber's task. Closer ones are a burst, which the tasks batch (several frames per write).
const SPARSE_AFTER_US: u64 = 1_000;

/// A subscriber whose `subscribed` waits for the broker: the channel's confirmation, then on a presence
/// channel the member list.
pub struct Held {
    pub outbox: Arc<Outbox>,
    /// On presence channels: the user id and the `{"id","info"}` JSON the join sends.
    pub member: Option<(Arc<str>, String)>,
    /// The presence join went to the broker; the member list is awaited.
    pub join_sent: bool,
    /// Completed when the subscriber is released (dropped when it leaves before).
    pub done: oneshot::Sender<()>,
}

impl Channel {
    pub fn new(name: &str, generation: u64) -> Self {
        let kind = ChannelKind::of(name);
        let presence = (kind == ChannelKind::Presence).then(Presence::default);
        Channel {
            kind,
            subscribers: HashMap::new(),
            presence,
            generation,
            confirmed: false,
            held: HashMap::new(),
            last_publication: AtomicU64::new(0),
        }
    }

    /// Note a publication at `now` (µs); returns whether it came at least `SPARSE_AFTER_US` after the last one.
    pub fn publication_is_sparse(&self, now: u64) -> bool {
        now.saturating_sub(self.last_publication.swap(now, Ordering::Relaxed)) >= SPARSE_AFTER_US
    }

    /// Every subscriber but `exclude`, into `outboxes`.
    pub fn collect(&self, exclude: Option<ConnId>, outboxes: &mut Vec<Arc<Outbox>>) {
        outboxes.extend(self.subscribers.iter().filter(|&(id, _)| Some(*id) != exclude).map(|(_, o)| Arc::clone(o)));
    }

    /// Queue `frame` for every subscriber but `exclude`; returns how many it was queued for.
    pub fn deliver(&self, frame: &Utf8Bytes, exclude: Option<ConnId>, timer: Option<&Arc<PublishTimer>>) -> usize {
        self.deliver_each(exclude, |outbox| outbox.push_timed(frame.clone(), timer))
    }

    /// Queue `frames` (each with its latency timer, if sampled) for every subscriber but `exclude`, in one push per
    /// subscriber; returns how many subscribers they were queued for.
    pub fn deliver_many(&self, frames: &[(Utf8Bytes, Option<Arc<PublishTimer>>)], exclude: Option<ConnId>) -> usize {
        self.deliver_each(exclude, |outbox| outbox.push_many(frames))
    }

    /// `push` to every subscriber but `exclude`; counts those that took it.
    fn deliver_each(&self, exclude: Option<ConnId>, push: impl Fn(&Outbox) -> bool) -> usize {
        self.subscribers.iter().filter(|&(id, outbox)| Some(*id) != exclude && push(outbox)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_follows_the_prefix() {
        assert_eq!(ChannelKind::of("chat.room.1"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-user.1"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("presence-room"), ChannelKind::Presence);
        assert_eq!(ChannelKind::of("privateish"), ChannelKind::Public);
    }
}
