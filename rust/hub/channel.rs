//! One channel: its type (from its name), its local subscribers and, on presence channels, its members.

use std::collections::HashMap;
use std::sync::Arc;

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
    /// Members, on `presence-` channels only.
    pub presence: Option<Presence>,
}

impl Channel {
    pub fn new(name: &str) -> Self {
        let kind = ChannelKind::of(name);
        let presence = (kind == ChannelKind::Presence).then(Presence::default);
        Channel { kind, subscribers: HashMap::new(), presence }
    }

    /// Queue `frame` for every subscriber but `exclude`; returns how many it was queued for.
    pub fn deliver(&self, frame: &Utf8Bytes, exclude: Option<ConnId>, timer: Option<&Arc<PublishTimer>>) -> usize {
        let mut queued = 0;
        for (id, outbox) in &self.subscribers {
            if Some(*id) != exclude && outbox.push_timed(frame.clone(), timer) {
                queued += 1;
            }
        }
        queued
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
