//! Presence: who is on a `presence-` channel. One member per user, however many connections (tabs, devices) the
//! user has there; `member_added` is due on the first connection and `member_removed` after the last one leaves.
//!
//! This is the in-memory implementation, kept inside the hub's channel entry so joins, leaves and the events they
//! cause are ordered by the hub's lock. On a single node it is the whole truth. In a Redis cluster it holds this
//! node's connections, which the broker mirrors into Redis (rust/broker/redis.rs): the cluster-wide members and
//! their events then come from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::conn::outbox::ConnId;

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: Arc<str>,
    pub info: Map<String, Value>,
    /// Unix seconds of the member's first connection to the channel.
    pub connected_at: u64,
    connections: u32,
    /// Arrival order: `connected_at` has one-second resolution.
    arrival: u64,
}

impl Member {
    pub fn to_json(&self, with_connected_at: bool) -> Value {
        let mut object = Map::new();
        object.insert("id".into(), Value::from(&*self.id));
        object.insert("info".into(), Value::Object(self.info.clone()));
        if with_connected_at {
            object.insert("connected_at".into(), Value::from(self.connected_at));
        }
        Value::Object(object)
    }
}

#[derive(Default)]
pub struct Presence {
    members: HashMap<Arc<str>, Member>,
    /// The member each subscribed connection counts for.
    member_of: HashMap<ConnId, Arc<str>>,
    arrivals: u64,
}

impl Presence {
    /// Count `conn` as `user_id`. Returns the member when this is the user's first connection here.
    pub fn join(&mut self, conn: ConnId, user_id: &Arc<str>, info: Map<String, Value>) -> Option<&Member> {
        if self.member_of.insert(conn, Arc::clone(user_id)).is_some() {
            return None; // this connection was already counted
        }
        let mut is_new = false;
        let arrival = self.arrivals;
        let member = self.members.entry(Arc::clone(user_id)).or_insert_with(|| {
            is_new = true;
            Member { id: Arc::clone(user_id), info, connected_at: unix_now(), connections: 0, arrival }
        });
        self.arrivals += u64::from(is_new);
        member.connections += 1;
        is_new.then_some(&*member)
    }

    /// Uncount `conn`. Returns the member when that was the user's last connection here.
    pub fn leave(&mut self, conn: ConnId) -> Option<Member> {
        let user_id = self.member_of.remove(&conn)?;
        let member = self.members.get_mut(&user_id)?;
        member.connections -= 1;
        if member.connections == 0 {
            self.members.remove(&user_id)
        } else {
            None
        }
    }

    /// Each counted connection with its member.
    pub fn connections(&self) -> impl Iterator<Item = (ConnId, &Member)> {
        self.member_of.iter().filter_map(|(conn, user_id)| self.members.get(user_id).map(|member| (*conn, member)))
    }

    /// Members in the order they arrived.
    pub fn members(&self) -> Vec<&Member> {
        let mut list: Vec<&Member> = self.members.values().collect();
        list.sort_by_key(|member| member.arrival);
        list
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_with_two_connections_is_one_member() {
        let mut presence = Presence::default();
        let ana: Arc<str> = "ana".into();
        assert!(presence.join(1, &ana, Map::new()).is_some(), "first connection adds the member");
        assert!(presence.join(2, &ana, Map::new()).is_none(), "second connection does not");
        assert!(presence.join(2, &ana, Map::new()).is_none(), "the same connection twice counts once");
        assert_eq!(presence.len(), 1);
        assert!(presence.leave(1).is_none(), "one connection left: still a member");
        assert_eq!(presence.leave(2).unwrap().id, ana);
        assert!(presence.is_empty());
        assert!(presence.leave(2).is_none());
    }
}
