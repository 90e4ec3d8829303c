//! One channel: its type (from its name) and its local subscribers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::conn::outbox::{ConnId, Outbox};

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
}

impl Channel {
    pub fn new(name: &str) -> Self {
        Channel {
            kind: ChannelKind::of(name),
            subscribers: HashMap::new(),
        }
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
