//! The Redis broker: several fastws nodes share one Redis (pub/sub for messages, keys for presence and figures).
//! docs/scaling.md is the user-facing description; the names below are the reference for it.
//!
//! Names (every one starts with the `redis_prefix` setting, `fastws` by default, shown as `{p}`):
//!
//! ```text
//! pub/sub {p}:ch:{channel}                 publications and presence events of one fastws channel (envelopes)
//!         {p}:users                        pushes to users; every node subscribes
//!         {p}:inbox:{node}                 presence member lists for one node's joining connections
//! keys    {p}:nodes                        SET of node ids
//!         {p}:node:{node}                  STRING, the node's liveness key: {"id","address","connections",...},
//!                                          expires after node_ttl unless the node refreshes it
//!         {p}:node:{node}:channels         HASH channel → this node's local subscribers
//!         {p}:node:{node}:presence         SET of presence channels where the node has connections
//!         {p}:presence:{channel}:members   HASH user → {"id","info"} JSON
//!         {p}:presence:{channel}:order     ZSET user, scored by first-join time in microseconds (Redis TIME)
//!         {p}:presence:{channel}:conns     HASH user → connections in the whole cluster
//!         {p}:presence:{channel}:node:{n}  HASH connection id → user, node n's share
//! ```
//!
//! Each node subscribes to `{p}:ch:{channel}` while it has a local subscriber there (the hub tells it when a
//! channel appears and disappears). A client's `subscribed` waits for Redis' confirmation of that SUBSCRIBE, so
//! a publication made after the reply is never missed. Presence changes run as Lua scripts, which update the
//! counts and PUBLISH `member_added`/`member_removed` in one atomic step; a joining connection gets the member
//! list through its node's inbox channel, on the same pub/sub connection as the channel's events, so the list
//! and the events that follow it can't cross.
//!
//! Tasks: one runner owns the connections (a multiplexed one for commands, a pub/sub one split into sink and
//! stream) and runs three loops: messages in, SUBSCRIBE/UNSUBSCRIBE, and commands (publications, presence,
//! heartbeat, figures). When any fails the node marks itself alone (the hub then serves locally, and the queues
//! are dropped), reconnects with backoff, resubscribes its channels and rewrites its presence from the hub.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisError, RedisResult, Script};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use super::{envelope, user_envelope, Broker, BrokerError, ClusterStats, Envelope, NodeInfo};
use crate::conn::outbox::ConnId;
use crate::hub::{ChannelInfo, ChannelKind, ClusterSnapshot, Hub};

/// How long connecting (and each Redis request) may take before it counts as a failure.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnection backoff: doubles from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Publications waiting for the command connection. Past it they are dropped (and counted): a node never
/// buffers without limit for a Redis that can't keep up.
const PUBLISH_QUEUE: usize = 65_536;
/// Commands sent in one pipeline.
const BATCH: usize = 512;
/// The liveness key is refreshed at this interval, or node_ttl / 3 when that is shorter.
const HEARTBEAT_MAX: Duration = Duration::from_secs(1);

/// The broker's settings, from `redis_url`, `redis_prefix` and `node_ttl`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub node_ttl: Duration,
}

/// The Redis names of one prefix (see the module docs).
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
    channel_prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.to_owned(), channel_prefix: format!("{prefix}:ch:") }
    }

    pub fn channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.channel_prefix)
    }

    pub fn users(&self) -> String {
        format!("{}:users", self.prefix)
    }

    pub fn inbox(&self, node: &str) -> String {
        format!("{}:inbox:{node}", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    pub fn node_channels(&self, node: &str) -> String {
        format!("{}:node:{node}:channels", self.prefix)
    }

    pub fn node_presence(&self, node: &str) -> String {
        format!("{}:node:{node}:presence", self.prefix)
    }
}

// -- Lua -------------------------------------------------------------------------------------------------------
//
// Every script takes no KEYS (they iterate over names they discover, so Redis Cluster is not supported) and
// ARGV[1] = the prefix. Member JSON is built by the nodes and only concatenated here, so key order and escaping
// are serde_json's.

const PRELUDE: &str = r#"
local prefix = ARGV[1]
local function pkey(channel, suffix) return prefix .. ':presence:' .. channel .. ':' .. suffix end
local function node_key(node, suffix)
  if suffix then return prefix .. ':node:' .. node .. ':' .. suffix end
  return prefix .. ':node:' .. node
end
local function publish_event(channel, event, member, exclude)
  local frame = '{"event":"' .. event .. '","channel":' .. cjson.encode(channel) .. ',"data":' .. member .. '}'
  local envelope = '{"frame":' .. frame .. '}'
  if exclude then envelope = '{"exclude":' .. cjson.encode(exclude) .. ',"frame":' .. frame .. '}' end
  redis.call('PUBLISH', prefix .. ':ch:' .. channel, envelope)
end
local function count(channel, user, member, exclude)
  if redis.call('HINCRBY', pkey(channel, 'conns'), user, 1) > 1 then return 0 end
  local now = redis.call('TIME')
  redis.call('ZADD', pkey(channel, 'order'), now[1] .. string.format('%06d', tonumber(now[2])), user)
  redis.call('HSET', pkey(channel, 'members'), user, member)
  publish_event(channel, 'member_added', member, exclude)
  return 1
end
local function uncount(channel, user)
  if redis.call('HINCRBY', pkey(channel, 'conns'), user, -1) > 0 then return 0 end
  redis.call('HDEL', pkey(channel, 'conns'), user)
  local member = redis.call('HGET', pkey(channel, 'members'), user)
  redis.call('HDEL', pkey(channel, 'members'), user)
  redis.call('ZREM', pkey(channel, 'order'), user)
  if member then publish_event(channel, 'member_removed', member, nil) end
  return 1
end
local function reap(node)
  local removed = 0
  local channels = node_key(node, 'presence')
  for _, channel in ipairs(redis.call('SMEMBERS', channels)) do
    local mine = pkey(channel, 'node:' .. node)
    local have = redis.call('HGETALL', mine)
    for i = 2, #have, 2 do removed = removed + uncount(channel, have[i]) end
    redis.call('DEL', mine)
  end
  redis.call('DEL', channels, node_key(node, 'channels'))
  redis.call('SREM', prefix .. ':nodes', node)
  return removed
end
local function member_list(channel)
  local order = redis.call('ZRANGE', pkey(channel, 'order'), 0, -1, 'WITHSCORES')
  local parts = {}
  for i = 1, #order, 2 do
    local member = redis.call('HGET', pkey(channel, 'members'), order[i])
    if member then parts[#parts + 1] = '[' .. member .. ',' .. order[i + 1] .. ']' end
  end
  return '[' .. table.concat(parts, ',') .. ']'
end
"#;

/// ARGV: prefix, channel, node, connection id, user id, member JSON, socket id. Counts the connection (once),
/// then sends the member list to the node's inbox.
const JOIN: &str = r#"
local channel, node, conn, user, member, socket = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if redis.call('HSETNX', pkey(channel, 'node:' .. node), conn, user) == 1 then
  redis.call('SADD', node_key(node, 'presence'), channel)
  count(channel, user, member, socket)
end
redis.call('PUBLISH', prefix .. ':inbox:' .. node,
  '{"joined":' .. cjson.encode(channel) .. ',"conn":' .. conn .. ',"members":' .. member_list(channel) .. '}')
return 1
"#;

/// ARGV: prefix, channel, node, connection id.
const LEAVE: &str = r#"
local channel, node, conn = ARGV[2], ARGV[3], ARGV[4]
local mine = pkey(channel, 'node:' .. node)
local user = redis.call('HGET', mine, conn)
if not user then return 0 end
redis.call('HDEL', mine, conn)
if redis.call('EXISTS', mine) == 0 then redis.call('SREM', node_key(node, 'presence'), channel) end
return uncount(channel, user)
"#;

/// ARGV: prefix, channel, node, then (connection id, user id, member JSON) for each of the node's connections
/// there. Makes the node's share exactly that, with events for the differences.
const SYNC: &str = r#"
local channel, node = ARGV[2], ARGV[3]
local mine = pkey(channel, 'node:' .. node)
local want, kept = {}, {}
for i = 4, #ARGV, 3 do want[ARGV[i]] = ARGV[i + 1] end
local have = redis.call('HGETALL', mine)
for i = 1, #have, 2 do
  if want[have[i]] == have[i + 1] then
    kept[have[i]] = true
  else
    redis.call('HDEL', mine, have[i])
    uncount(channel, have[i + 1])
  end
end
for i = 4, #ARGV, 3 do
  if not kept[ARGV[i]] then
    redis.call('HSET', mine, ARGV[i], ARGV[i + 1])
    count(channel, ARGV[i + 1], ARGV[i + 2], nil)
  end
end
if redis.call('EXISTS', mine) == 1 then
  redis.call('SADD', node_key(node, 'presence'), channel)
else
  redis.call('SREM', node_key(node, 'presence'), channel)
end
return 1
"#;

/// ARGV: prefix. Removes the presence and figures of every registered node whose liveness key expired.
const REAP_DEAD: &str = r#"
local reaped = 0
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':nodes')) do
  if redis.call('EXISTS', node_key(node)) == 0 then
    reap(node)
    reaped = reaped + 1
  end
end
return reaped
"#;

/// ARGV: prefix, node. A node leaving on purpose (stop): the same cleanup, at once.
const REMOVE_NODE: &str = r#"
reap(ARGV[2])
redis.call('DEL', node_key(ARGV[2]))
return 1
"#;

/// ARGV: prefix, node to leave out (the caller counts itself), then channel names the caller knows. Returns
/// `{"nodes":{id:{"info":…,"channels":{name:n}}},"members":{presence channel:n}}`.
const STATS: &str = r#"
local skip = ARGV[2]
local nodes, members, seen = {}, {}, {}
for i = 3, #ARGV do seen[ARGV[i]] = true end
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':nodes')) do
  local info = redis.call('GET', node_key(node))
  if info then
    local channels = {}
    if node ~= skip then
      local flat = redis.call('HGETALL', node_key(node, 'channels'))
      for i = 1, #flat, 2 do
        channels[flat[i]] = tonumber(flat[i + 1])
        seen[flat[i]] = true
      end
    end
    nodes[node] = {info = info, channels = channels}
  end
end
for channel in pairs(seen) do
  if string.sub(channel, 1, 9) == 'presence-' then members[channel] = redis.call('HLEN', pkey(channel, 'conns')) end
end
return cjson.encode({nodes = nodes, members = members})
"#;

/// ARGV: prefix, channel, node to leave out. Returns {subscribers on the other nodes, members}.
const CHANNEL: &str = r#"
local channel, skip = ARGV[2], ARGV[3]
local subscribers = 0
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':nodes')) do
  if node ~= skip and redis.call('EXISTS', node_key(node)) == 1 then
    subscribers = subscribers + (tonumber(redis.call('HGET', node_key(node, 'channels'), channel)) or 0)
  end
end
return {subscribers, redis.call('HLEN', pkey(channel, 'conns'))}
"#;

/// ARGV: prefix, channel. Returns the member list as JSON: [[{"id","info"}, first-join µs], ...].
const PRESENCE: &str = "return member_list(ARGV[2])";

struct Lua {
    code: String,
    script: Script,
}

impl Lua {
    fn new(body: &str) -> Self {
        let code = format!("{PRELUDE}{body}");
        let script = Script::new(&code);
        Lua { code, script }
    }

    /// `EVALSHA` for pipelines; every session loads the scripts first.
    fn cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(0);
        cmd
    }
}

struct Scripts {
    join: Lua,
    leave: Lua,
    sync: Lua,
    reap_dead: Lua,
    remove_node: Lua,
    stats: Lua,
    channel: Lua,
    presence: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    join: Lua::new(JOIN),
    leave: Lua::new(LEAVE),
    sync: Lua::new(SYNC),
    reap_dead: Lua::new(REAP_DEAD),
    remove_node: Lua::new(REMOVE_NODE),
    stats: Lua::new(STATS),
    channel: Lua::new(CHANNEL),
    presence: Lua::new(PRESENCE),
});

impl Scripts {
    fn all(&self) -> [&Lua; 8] {
        [
            &self.join,
            &self.leave,
            &self.sync,
            &self.reap_dead,
            &self.remove_node,
            &self.stats,
            &self.channel,
            &self.presence,
        ]
    }
}

// -- the node's broker ---------------------------------------------------------------------------------------

enum SubCommand {
    Subscribe(Box<str>, u64),
    Unsubscribe(Box<str>),
}

enum PresenceOp {
    Join { channel: Box<str>, conn: ConnId, user_id: Box<str>, member: Box<str> },
    Leave { channel: Box<str>, conn: ConnId },
}

/// A PUBLISH waiting for the command connection.
struct Publication {
    key: String,
    envelope: String,
}

struct Shared {
    settings: RedisSettings,
    client: redis::Client,
    keys: Keys,
    /// This node's id, as in socket ids.
    node: String,
    address: String,
    started_at: u64,
    /// Connected, channels resubscribed: the hub works as part of the cluster.
    up: AtomicBool,
    /// Unbounded on purpose: each command is one local channel appearing or disappearing, already limited by
    /// the clients' rate limit and max_channels_per_connection, and dropping one would leave a channel
    /// unsubscribed. Only filled while up; emptied when a connection starts.
    subs: mpsc::UnboundedSender<SubCommand>,
    /// Unbounded for the same reason (one per presence subscribe or unsubscribe): a lost leave would keep a
    /// member until the next resync.
    presence: mpsc::UnboundedSender<PresenceOp>,
    publications: mpsc::Sender<Publication>,
    /// Channels whose local subscriber count changed since it was last written.
    dirty: Mutex<HashSet<Box<str>>>,
    dirty_signal: Notify,
    /// The current command connection, for reads (`/stats`, presence); None while disconnected.
    reads: RwLock<Option<MultiplexedConnection>>,
    dropped_publications: AtomicU64,
    /// Whether the "queue full" warning was logged since the queue last drained.
    full_warned: AtomicBool,
}

impl Shared {
    fn url(&self) -> String {
        redact_url(&self.settings.url)
    }

    fn node_info(&self, connections: usize) -> String {
        serde_json::json!({
            "id": self.node,
            "address": self.address,
            "connections": connections,
            "started_at": self.started_at,
        })
        .to_string()
    }

    fn ttl_ms(&self) -> u64 {
        (self.settings.node_ttl.as_millis() as u64).max(1)
    }

    fn read_connection(&self) -> Result<MultiplexedConnection, BrokerError> {
        self.reads
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| BrokerError(format!("Redis at {} is unreachable; this node is reconnecting", self.url())))
    }

    fn enqueue_publication(&self, key: String, envelope: String) {
        if self.publications.try_send(Publication { key, envelope }).is_err() {
            self.dropped_publications.fetch_add(1, Ordering::Relaxed);
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "Redis is not keeping up: {PUBLISH_QUEUE} publications are waiting, so new ones reach this \
                     node's subscribers only until it catches up"
                );
            }
        }
    }
}

/// The broker of a node with `redis_url`. [`RedisBroker::connect`] builds it with its [`RedisRunner`].
pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// The tasks behind a [`RedisBroker`]; run it once the hub exists.
pub struct RedisRunner {
    shared: Arc<Shared>,
    subs: mpsc::UnboundedReceiver<SubCommand>,
    presence: mpsc::UnboundedReceiver<PresenceOp>,
    publications: mpsc::Receiver<Publication>,
    first: Option<Session>,
}

/// One connection to Redis: commands, and pub/sub split into its sink and stream.
struct Session {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
}

impl RedisBroker {
    /// Connect, load the scripts and register this node under the first id `pick_node_id` gives that no live
    /// node uses. The error is one line naming the (password-free) URL.
    pub async fn connect(
        settings: RedisSettings,
        address: String,
        mut pick_node_id: impl FnMut() -> u32,
    ) -> Result<(RedisBroker, RedisRunner, u32), String> {
        let shown = redact_url(&settings.url);
        let client = open_client(&settings.url).map_err(|e| format!("invalid redis_url {e}"))?;
        let cannot = |e: &dyn std::fmt::Display| format!("cannot connect to Redis at {shown}: {e}");
        let mut conn = open_connection(&client).await.map_err(|e| cannot(&one_line(&e)))?;
        let keys = Keys::new(&settings.prefix);
        let started_at = unix_now();
        let ttl_ms = (settings.node_ttl.as_millis() as u64).max(1);
        let mut node_id = pick_node_id();
        // A node id is claimed with SET NX on its liveness key, so two live nodes never share one.
        for _ in 0..16 {
            let info = serde_json::json!({"id": node_id.to_string(), "address": address, "connections": 0,
                                          "started_at": started_at});
            let claimed: Option<String> = redis::cmd("SET")
                .arg(keys.node(&node_id.to_string()))
                .arg(info.to_string())
                .arg("PX")
                .arg(ttl_ms)
                .arg("NX")
                .query_async(&mut conn)
                .await
                .map_err(|e| cannot(&one_line(&e)))?;
            if claimed.is_some() {
                break;
            }
            node_id = pick_node_id();
        }
        let node = node_id.to_string();
        let session = timeout(REDIS_TIMEOUT, Session::open(&client, conn, &keys, &node))
            .await
            .map_err(|_| cannot(&"no answer in time"))?
            .map_err(|e| cannot(&one_line(&e)))?;
        let (subs_tx, subs_rx) = mpsc::unbounded_channel();
        let (presence_tx, presence_rx) = mpsc::unbounded_channel();
        let (publications_tx, publications_rx) = mpsc::channel(PUBLISH_QUEUE);
        let shared = Arc::new(Shared {
            settings,
            client,
            keys,
            node,
            address,
            started_at,
            up: AtomicBool::new(false),
            subs: subs_tx,
            presence: presence_tx,
            publications: publications_tx,
            dirty: Mutex::new(HashSet::new()),
            dirty_signal: Notify::new(),
            reads: RwLock::new(None),
            dropped_publications: AtomicU64::new(0),
            full_warned: AtomicBool::new(false),
        });
        let runner = RedisRunner {
            shared: Arc::clone(&shared),
            subs: subs_rx,
            presence: presence_rx,
            publications: publications_rx,
            first: Some(session),
        };
        Ok((RedisBroker { shared }, runner, node_id))
    }
}

impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn describe(&self) -> String {
        format!("redis ({}, prefix {}, node {})", self.shared.url(), self.shared.settings.prefix, self.shared.node)
    }

    fn is_clustered(&self) -> bool {
        self.shared.up.load(Ordering::SeqCst)
    }

    fn channel_added(&self, channel: &str, generation: u64) {
        // While down nothing is queued: reconnecting subscribes to every channel the hub has then.
        if self.is_clustered() {
            let _ = self.shared.subs.send(SubCommand::Subscribe(channel.into(), generation));
        }
    }

    fn channel_removed(&self, channel: &str) {
        if self.is_clustered() {
            let _ = self.shared.subs.send(SubCommand::Unsubscribe(channel.into()));
        }
    }

    fn subscribers_changed(&self, channel: &str) {
        let mut dirty = self.shared.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        if dirty.insert(channel.into()) && dirty.len() == 1 {
            self.shared.dirty_signal.notify_one();
        }
    }

    fn publish(&self, channel: &str, frame: &Utf8Bytes, exclude: Option<&str>) {
        if self.is_clustered() {
            let envelope = envelope(Some(&self.shared.node), exclude, frame.as_str());
            self.shared.enqueue_publication(self.shared.keys.channel(channel), envelope);
        }
    }

    fn push_to_user(&self, user_id: &str, frame: &Utf8Bytes) {
        if self.is_clustered() {
            let envelope = user_envelope(Some(&self.shared.node), user_id, frame.as_str());
            self.shared.enqueue_publication(self.shared.keys.users(), envelope);
        }
    }

    fn presence_join(&self, channel: &str, conn: ConnId, user_id: &str, member: &str) {
        let op = PresenceOp::Join { channel: channel.into(), conn, user_id: user_id.into(), member: member.into() };
        let _ = self.shared.presence.send(op);
    }

    fn presence_leave(&self, channel: &str, conn: ConnId) {
        // While down the leave is not queued: reconnecting rewrites this node's presence from the hub.
        if self.is_clustered() {
            let _ = self.shared.presence.send(PresenceOp::Leave { channel: channel.into(), conn });
        }
    }

    fn presence<'a>(&'a self, _hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<Vec<Value>, BrokerError>> {
        async move {
            let mut conn = self.shared.read_connection()?;
            let json: String = SCRIPTS
                .presence
                .script
                .arg(&self.shared.settings.prefix)
                .arg(channel)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.read_failed(&e))?;
            parse_members(&json).map_err(BrokerError)
        }
        .boxed()
    }

    fn channel_info<'a>(&'a self, hub: &'a Hub, channel: &'a str) -> BoxFuture<'a, Result<ChannelInfo, BrokerError>> {
        async move {
            let mut conn = self.shared.read_connection()?;
            let (others, members): (usize, usize) = SCRIPTS
                .channel
                .script
                .arg(&self.shared.settings.prefix)
                .arg(channel)
                .arg(&self.shared.node)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.read_failed(&e))?;
            let local = hub.channel_info(channel).map_or(0, |info| info.subscribers);
            Ok(channel_info(channel, local + others, members))
        }
        .boxed()
    }

    fn stats<'a>(&'a self, hub: &'a Hub) -> BoxFuture<'a, Result<ClusterStats, BrokerError>> {
        async move {
            let mut conn = self.shared.read_connection()?;
            let local_channels = hub.channels();
            let mut invocation = SCRIPTS.stats.script.prepare_invoke();
            invocation.arg(&self.shared.settings.prefix).arg(&self.shared.node);
            for info in &local_channels {
                invocation.arg(&info.name);
            }
            let json: String = invocation.invoke_async(&mut conn).await.map_err(|e| self.read_failed(&e))?;
            let connections = hub.connection_count();
            let me = NodeInfo { id: self.shared.node.clone(), address: self.shared.address.clone(), connections };
            aggregate_stats(&json, Some((me, &local_channels))).map_err(BrokerError)
        }
        .boxed()
    }
}

impl RedisBroker {
    fn read_failed(&self, error: &RedisError) -> BrokerError {
        BrokerError(format!("cannot read the cluster's state from Redis at {}: {}", self.shared.url(), one_line(error)))
    }
}

impl Session {
    async fn open(
        client: &redis::Client,
        mut conn: MultiplexedConnection,
        keys: &Keys,
        node: &str,
    ) -> RedisResult<Self> {
        let mut load = redis::pipe();
        for lua in SCRIPTS.all() {
            load.cmd("SCRIPT").arg("LOAD").arg(&lua.code).ignore();
        }
        load.query_async::<()>(&mut conn).await?;
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        sink.subscribe(&[keys.users(), keys.inbox(node)]).await?;
        Ok(Session { conn, sink, stream })
    }

    async fn connect(shared: &Shared) -> RedisResult<Self> {
        let conn = open_connection(&shared.client).await?;
        Session::open(&shared.client, conn, &shared.keys, &shared.node).await
    }
}

async fn open_connection(client: &redis::Client) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await
}

impl RedisRunner {
    /// Serve until `shutdown`: reconnect whenever the connection is lost, then leave the cluster (this node's
    /// members are removed, with `member_removed`, and its keys deleted).
    pub async fn run(mut self, hub: Arc<Hub>, shutdown: CancellationToken) {
        let shared = Arc::clone(&self.shared);
        let mut session = self.first.take();
        let mut lost_at: Option<Instant> = None;
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        loop {
            let current = match session.take() {
                Some(current) => current,
                None => {
                    let attempt = tokio::select! {
                        () = shutdown.cancelled() => break,
                        attempt = timeout(REDIS_TIMEOUT, Session::connect(&shared)) => attempt,
                    };
                    match attempt {
                        Ok(Ok(current)) => current,
                        failed => {
                            failures += 1;
                            // One line when it starts failing, then one every ~30 attempts, not one per retry.
                            if failures == 1 || failures.is_multiple_of(30) {
                                let why = match failed {
                                    Ok(Err(e)) => one_line(&e),
                                    _ => "no answer in time".to_owned(),
                                };
                                let still = if failures == 1 { "" } else { "still " };
                                log::warn!(
                                    "{still}cannot reach Redis at {}: {why} (attempt {failures}; retrying with \
                                     backoff, every {:?} at most)",
                                    shared.url(),
                                    BACKOFF_MAX
                                );
                            }
                            tokio::select! {
                                () = shutdown.cancelled() => break,
                                () = sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
            };
            backoff = BACKOFF_MIN;
            failures = 0;
            match self.serve(current, &hub, &shutdown, lost_at).await {
                Ok(mut conn) => {
                    leave_cluster(&shared, &mut conn).await;
                    return;
                }
                Err(error) => {
                    shared.up.store(false, Ordering::SeqCst);
                    *shared.reads.write().unwrap_or_else(PoisonError::into_inner) = None;
                    hub.cluster_down();
                    log::warn!(
                        "lost the connection to Redis at {}: {error}; this node's clients keep getting the \
                         publications made on this node, and it is reconnecting",
                        shared.url()
                    );
                    lost_at = Some(Instant::now());
                }
            }
        }
        // Stopped while disconnected: one quick try to leave the cluster cleanly; else the others reap us.
        if let Ok(Ok(mut conn)) = timeout(Duration::from_secs(1), open_connection(&shared.client)).await {
            leave_cluster(&shared, &mut conn).await;
        }
    }

    /// Bring a fresh connection into service and run it until it fails (Err) or the server stops (Ok).
    async fn serve(
        &mut self,
        session: Session,
        hub: &Arc<Hub>,
        shutdown: &CancellationToken,
        lost_at: Option<Instant>,
    ) -> Result<MultiplexedConnection, String> {
        let shared = Arc::clone(&self.shared);
        let Session { mut conn, mut sink, mut stream } = session;
        // What was queued for a previous connection is stale: the resync below covers it.
        while self.presence.try_recv().is_ok() {}
        while self.publications.try_recv().is_ok() {}
        *shared.reads.write().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        // Up before the snapshot: a channel created from now on queues its own SUBSCRIBE, one created before
        // is in the snapshot. A new subscriber waits (held by the hub) until its channel is confirmed.
        shared.up.store(true, Ordering::SeqCst);
        while self.subs.try_recv().is_ok() {}
        let channels = hub.channel_generations();
        for chunk in channels.chunks(BATCH) {
            let names: Vec<String> = chunk.iter().map(|(name, _)| shared.keys.channel(name)).collect();
            sink.subscribe(names).await.map_err(|e| format!("SUBSCRIBE failed: {}", one_line(&e)))?;
            for (name, generation) in chunk {
                hub.channel_confirmed(name, *generation);
            }
        }
        register(&shared, &mut conn, hub.connection_count()).await.map_err(|e| one_line(&e))?;
        let restored = resync(&shared, &mut conn, hub).await.map_err(|e| one_line(&e))?;
        if let Some(lost_at) = lost_at {
            log::info!(
                "reconnected to Redis at {} after {:.1} s: resubscribed {} channels and restored this node's \
                 presence on {restored} channels",
                shared.url(),
                lost_at.elapsed().as_secs_f64(),
                channels.len()
            );
        }
        let error = tokio::select! {
            () = shutdown.cancelled() => return Ok(conn),
            error = receive(&mut stream, &shared, hub) => error,
            error = subscriptions(&mut sink, &mut self.subs, &shared, hub) => error,
            error = commands(&mut conn, &shared, hub, &mut self.presence, &mut self.publications) => error,
        };
        Err(error)
    }
}

/// Messages from Redis → the hub, in the order Redis sent them. Returns why it stopped.
async fn receive(stream: &mut PubSubStream, shared: &Shared, hub: &Hub) -> String {
    let inbox = shared.keys.inbox(&shared.node);
    let users = shared.keys.users();
    while let Some(message) = stream.next().await {
        let channel = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if let Some(name) = channel.strip_prefix(shared.keys.channel_prefix.as_str()) {
            match serde_json::from_slice::<Envelope<'_>>(payload) {
                // The publishing node delivered it locally already.
                Ok(envelope) if envelope.from.as_deref() == Some(shared.node.as_str()) => {}
                Ok(envelope) => {
                    let exclude = envelope.exclude.as_deref().and_then(|socket_id| hub.conn_id_of(socket_id));
                    hub.publish(name, &envelope.frame(), exclude, false);
                }
                Err(error) => log::debug!("ignored a malformed message on {channel}: {error}"),
            }
        } else if channel == users {
            match serde_json::from_slice::<Envelope<'_>>(payload) {
                Ok(envelope) if envelope.from.as_deref() == Some(shared.node.as_str()) => {}
                Ok(Envelope { user: Some(user), frame, .. }) => {
                    hub.push_to_user(&user, &Utf8Bytes::from(frame.get().to_owned()));
                }
                _ => log::debug!("ignored a malformed message on {channel}"),
            }
        } else if channel == inbox {
            match parse_joined(payload) {
                Ok((channel, conn, members)) => hub.presence_joined(&channel, conn, members),
                Err(error) => log::warn!("ignored a malformed presence list from Redis: {error}"),
            }
        }
    }
    "the pub/sub connection closed".to_owned()
}

/// SUBSCRIBE / UNSUBSCRIBE as local channels appear and disappear, in order; consecutive ones of a kind go in
/// one command. A SUBSCRIBE returns once Redis confirmed it; the hub then releases the channel's waiting
/// subscribers.
async fn subscriptions(
    sink: &mut PubSubSink,
    queue: &mut mpsc::UnboundedReceiver<SubCommand>,
    shared: &Shared,
    hub: &Hub,
) -> String {
    let mut carried: Option<SubCommand> = None;
    loop {
        let first = match carried.take() {
            Some(command) => command,
            None => match queue.recv().await {
                Some(command) => command,
                None => return std::future::pending().await,
            },
        };
        let subscribing = matches!(first, SubCommand::Subscribe(..));
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(command) if matches!(command, SubCommand::Subscribe(..)) == subscribing => batch.push(command),
                Ok(command) => {
                    carried = Some(command);
                    break;
                }
                Err(_) => break,
            }
        }
        let names: Vec<String> = batch
            .iter()
            .map(|command| match command {
                SubCommand::Subscribe(name, _) | SubCommand::Unsubscribe(name) => shared.keys.channel(name),
            })
            .collect();
        let done = if subscribing { sink.subscribe(names).await } else { sink.unsubscribe(names).await };
        if let Err(error) = done {
            return format!("{} failed: {}", if subscribing { "SUBSCRIBE" } else { "UNSUBSCRIBE" }, one_line(&error));
        }
        for command in batch {
            if let SubCommand::Subscribe(name, generation) = command {
                hub.channel_confirmed(&name, generation);
            }
        }
    }
}

/// Publications, presence scripts, the heartbeat and the per-channel figures, on the command connection.
async fn commands(
    conn: &mut MultiplexedConnection,
    shared: &Shared,
    hub: &Arc<Hub>,
    presence: &mut mpsc::UnboundedReceiver<PresenceOp>,
    publications: &mut mpsc::Receiver<Publication>,
) -> String {
    let period = (shared.settings.node_ttl / 3).clamp(Duration::from_millis(50), HEARTBEAT_MAX);
    let mut heartbeat = tokio::time::interval(period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            Some(op) = presence.recv() => send_batch(conn, shared, Some(op), None, presence, publications).await,
            Some(publication) = publications.recv() => {
                send_batch(conn, shared, None, Some(publication), presence, publications).await
            }
            _ = heartbeat.tick() => refresh(conn, shared, hub).await,
            () = shared.dirty_signal.notified() => write_counts(conn, shared, hub).await,
        };
        if let Err(error) = result {
            if is_connection_error(&error) {
                return one_line(&error);
            }
            log::warn!("a Redis command failed: {}", one_line(&error));
        }
    }
}

/// Send the given command and whatever else is queued (up to [`BATCH`] of each kind) in one pipeline.
async fn send_batch(
    conn: &mut MultiplexedConnection,
    shared: &Shared,
    first_op: Option<PresenceOp>,
    first_publication: Option<Publication>,
    presence: &mut mpsc::UnboundedReceiver<PresenceOp>,
    publications: &mut mpsc::Receiver<Publication>,
) -> RedisResult<()> {
    let prefix = &shared.settings.prefix;
    let node = &shared.node;
    let mut pipe = redis::pipe();
    let mut op = first_op.or_else(|| presence.try_recv().ok());
    let mut ops = 0;
    while let Some(current) = op.take() {
        let cmd = match current {
            PresenceOp::Join { channel, conn: id, user_id, member } => {
                let mut cmd = SCRIPTS.join.cmd();
                let socket_id = format!("{node}.{id}");
                cmd.arg(prefix).arg(&*channel).arg(node).arg(id).arg(&*user_id).arg(&*member).arg(socket_id);
                cmd
            }
            PresenceOp::Leave { channel, conn: id } => {
                let mut cmd = SCRIPTS.leave.cmd();
                cmd.arg(prefix).arg(&*channel).arg(node).arg(id);
                cmd
            }
        };
        pipe.add_command(cmd).ignore();
        ops += 1;
        if ops < BATCH {
            op = presence.try_recv().ok();
        }
    }
    let mut publication = first_publication.or_else(|| publications.try_recv().ok());
    let mut sent = 0;
    while let Some(Publication { key, envelope }) = publication.take() {
        pipe.cmd("PUBLISH").arg(key).arg(envelope).ignore();
        sent += 1;
        if sent < BATCH {
            publication = publications.try_recv().ok();
        }
    }
    if sent > 0 {
        shared.full_warned.store(false, Ordering::Relaxed);
    }
    if pipe.is_empty() {
        return Ok(());
    }
    pipe.query_async::<()>(conn).await
}

/// The heartbeat: refresh the liveness key (re-register and resync when it was gone), then reap dead nodes.
async fn refresh(conn: &mut MultiplexedConnection, shared: &Shared, hub: &Hub) -> RedisResult<()> {
    let refreshed: Option<String> = redis::cmd("SET")
        .arg(shared.keys.node(&shared.node))
        .arg(shared.node_info(hub.connection_count()))
        .arg("PX")
        .arg(shared.ttl_ms())
        .arg("XX")
        .query_async(conn)
        .await?;
    if refreshed.is_none() {
        log::warn!(
            "this node's liveness key in Redis was gone (Redis restarted, or the node missed node_ttl = {:?}); \
             registering again and restoring its presence",
            shared.settings.node_ttl
        );
        register(shared, conn, hub.connection_count()).await?;
        resync(shared, conn, hub).await?;
    }
    let reaped: usize = SCRIPTS.reap_dead.cmd().arg(&shared.settings.prefix).query_async(conn).await?;
    if reaped > 0 {
        log::info!("removed the presence and figures of {reaped} node(s) that stopped refreshing their liveness key");
    }
    Ok(())
}

/// Write the local subscriber counts of the channels that changed.
async fn write_counts(conn: &mut MultiplexedConnection, shared: &Shared, hub: &Hub) -> RedisResult<()> {
    let dirty = std::mem::take(&mut *shared.dirty.lock().unwrap_or_else(PoisonError::into_inner));
    if dirty.is_empty() {
        return Ok(());
    }
    let key = shared.keys.node_channels(&shared.node);
    let mut pipe = redis::pipe();
    for channel in dirty {
        match hub.channel_info(&channel).map_or(0, |info| info.subscribers) {
            0 => pipe.cmd("HDEL").arg(&key).arg(&*channel).ignore(),
            n => pipe.cmd("HSET").arg(&key).arg(&*channel).arg(n).ignore(),
        };
    }
    pipe.query_async::<()>(conn).await
}

async fn register(shared: &Shared, conn: &mut MultiplexedConnection, connections: usize) -> RedisResult<()> {
    redis::pipe()
        .cmd("SET")
        .arg(shared.keys.node(&shared.node))
        .arg(shared.node_info(connections))
        .arg("PX")
        .arg(shared.ttl_ms())
        .ignore()
        .cmd("SADD")
        .arg(shared.keys.nodes())
        .arg(&shared.node)
        .ignore()
        .query_async::<()>(conn)
        .await
}

/// Make this node's presence and figures in Redis exactly what the hub has (after a reconnection, or when the
/// node had been reaped). Returns the number of presence channels written.
async fn resync(shared: &Shared, conn: &mut MultiplexedConnection, hub: &Hub) -> RedisResult<usize> {
    shared.dirty.lock().unwrap_or_else(PoisonError::into_inner).clear();
    let ClusterSnapshot { presence, subscribers } = hub.cluster_snapshot();
    let recorded: Vec<String> =
        redis::cmd("SMEMBERS").arg(shared.keys.node_presence(&shared.node)).query_async(conn).await?;
    let prefix = &shared.settings.prefix;
    let mut pipe = redis::pipe();
    let local: HashSet<&str> = presence.iter().map(|(channel, _)| channel.as_str()).collect();
    for (channel, entries) in &presence {
        let mut cmd = SCRIPTS.sync.cmd();
        cmd.arg(prefix).arg(channel).arg(&shared.node);
        for (id, user_id, member) in entries {
            cmd.arg(*id).arg(&**user_id).arg(member);
        }
        pipe.add_command(cmd).ignore();
    }
    for channel in recorded.iter().filter(|channel| !local.contains(channel.as_str())) {
        pipe.add_command(SCRIPTS.sync.cmd().arg(prefix).arg(channel).arg(&shared.node).clone()).ignore();
    }
    let counts_key = shared.keys.node_channels(&shared.node);
    pipe.cmd("DEL").arg(&counts_key).ignore();
    for chunk in subscribers.chunks(BATCH) {
        let hset = pipe.cmd("HSET").arg(&counts_key);
        for (channel, n) in chunk {
            hset.arg(channel).arg(*n);
        }
        hset.ignore();
    }
    pipe.query_async::<()>(conn).await?;
    Ok(presence.len())
}

/// Leave the cluster on purpose: this node's members go (with `member_removed`), its keys are deleted.
async fn leave_cluster(shared: &Shared, conn: &mut MultiplexedConnection) {
    let mut remove = SCRIPTS.remove_node.cmd();
    remove.arg(&shared.settings.prefix).arg(&shared.node);
    match timeout(Duration::from_secs(2), remove.query_async::<()>(conn)).await {
        Ok(Ok(())) => log::debug!("left the cluster: node {} removed from Redis", shared.node),
        Ok(Err(error)) => log::warn!("could not remove this node from Redis on stop: {}", one_line(&error)),
        Err(_) => log::warn!("could not remove this node from Redis on stop: no answer in time"),
    }
}

/// A client for the URL; an error message starts with the (password-free) URL.
fn open_client(url: &str) -> Result<redis::Client, String> {
    let shown = redact_url(url);
    if url.starts_with("rediss://") {
        // TLS would bring a TLS stack (rustls and a crypto provider) into the extension for this one setting.
        return Err(format!(
            "{shown}: rediss:// (TLS to Redis) is not supported by this build; reach Redis over a private network, \
             or through a TLS tunnel (stunnel, spiped) with redis://"
        ));
    }
    redis::Client::open(url).map_err(|e| format!("{shown}: {}", one_line(&e)))
}

fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

// -- publishing from any process ------------------------------------------------------------------------------

/// A plain Redis client that publishes exactly what the nodes publish, for processes that run no server
/// (`fastws.Client(redis_url=...)`, `fastws push --redis`). Blocking: one connection, reopened once when it
/// fails.
pub struct RedisPublisher {
    client: redis::Client,
    keys: Keys,
    prefix: String,
    url: String,
    conn: Mutex<Option<redis::Connection>>,
}

impl RedisPublisher {
    /// Check the URL; the connection opens on first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, String> {
        let client = open_client(url).map_err(|e| format!("invalid Redis URL {e}"))?;
        Ok(RedisPublisher {
            client,
            keys: Keys::new(prefix),
            prefix: prefix.to_owned(),
            url: redact_url(url),
            conn: Mutex::new(None),
        })
    }

    /// Publish a channel frame (built by `protocol::encode_publication`). Returns PUBLISH's answer: the number of
    /// nodes with a subscriber on that channel, each of which delivers it.
    pub fn publish(&self, channel: &str, frame: &str, exclude: Option<&str>) -> Result<usize, String> {
        let envelope = envelope(None, exclude, frame);
        let key = self.keys.channel(channel);
        self.with_connection(|conn| redis::cmd("PUBLISH").arg(&key).arg(&envelope).query(conn))
    }

    /// Publish a user push (built by `protocol::encode_user_push`). Returns the number of nodes that received it
    /// (every live node: each looks the user up among its own connections).
    pub fn push_to_user(&self, user_id: &str, frame: &str) -> Result<usize, String> {
        let envelope = user_envelope(None, user_id, frame);
        let key = self.keys.users();
        self.with_connection(|conn| redis::cmd("PUBLISH").arg(&key).arg(&envelope).query(conn))
    }

    pub fn presence(&self, channel: &str) -> Result<Vec<Value>, String> {
        let json: String =
            self.with_connection(|conn| SCRIPTS.presence.script.arg(&self.prefix).arg(channel).invoke(conn))?;
        parse_members(&json)
    }

    pub fn channel_info(&self, channel: &str) -> Result<ChannelInfo, String> {
        let (subscribers, members): (usize, usize) =
            self.with_connection(|conn| SCRIPTS.channel.script.arg(&self.prefix).arg(channel).arg("").invoke(conn))?;
        Ok(channel_info(channel, subscribers, members))
    }

    pub fn stats(&self) -> Result<ClusterStats, String> {
        let json: String = self.with_connection(|conn| SCRIPTS.stats.script.arg(&self.prefix).arg("").invoke(conn))?;
        aggregate_stats(&json, None)
    }

    fn with_connection<T>(
        &self,
        mut request: impl FnMut(&mut redis::Connection) -> RedisResult<T>,
    ) -> Result<T, String> {
        let mut slot = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let mut retried = false;
        loop {
            let conn = match slot.as_mut() {
                Some(conn) => conn,
                None => {
                    let conn = self
                        .client
                        .get_connection_with_timeout(REDIS_TIMEOUT)
                        .and_then(|conn| {
                            conn.set_read_timeout(Some(REDIS_TIMEOUT))?;
                            conn.set_write_timeout(Some(REDIS_TIMEOUT))?;
                            Ok(conn)
                        })
                        .map_err(|e| format!("cannot connect to Redis at {}: {}", self.url, one_line(&e)))?;
                    slot.insert(conn)
                }
            };
            match request(conn) {
                Ok(value) => return Ok(value),
                Err(error) if is_connection_error(&error) => {
                    *slot = None;
                    if retried {
                        return Err(format!("Redis at {} failed: {}", self.url, one_line(&error)));
                    }
                    retried = true;
                }
                Err(error) => return Err(format!("Redis at {} refused the request: {}", self.url, one_line(&error))),
            }
        }
    }
}

// -- shared helpers ------------------------------------------------------------------------------------------

fn channel_info(channel: &str, subscribers: usize, members: usize) -> ChannelInfo {
    let kind = ChannelKind::of(channel);
    ChannelInfo {
        name: channel.to_owned(),
        kind,
        subscribers,
        members: (kind == ChannelKind::Presence).then_some(members),
    }
}

/// `[[{"id","info"}, first-join µs], ...]` → `[{"id","info","connected_at"}, ...]`.
fn members_from(list: Vec<(&RawValue, f64)>) -> Result<Vec<Value>, String> {
    list.into_iter()
        .map(|(member, joined_us)| {
            let mut member: Map<String, Value> = serde_json::from_str(member.get()).map_err(|e| e.to_string())?;
            member.insert("connected_at".into(), Value::from((joined_us / 1e6).floor() as u64));
            Ok(Value::Object(member))
        })
        .collect()
}

fn parse_members(json: &str) -> Result<Vec<Value>, String> {
    let list: Vec<(&RawValue, f64)> =
        serde_json::from_str(json).map_err(|e| format!("unexpected member list from Redis: {e}"))?;
    members_from(list).map_err(|e| format!("unexpected member in Redis: {e}"))
}

/// An inbox message: `{"joined": channel, "conn": id, "members": [...]}`.
fn parse_joined(payload: &[u8]) -> Result<(String, ConnId, Vec<Value>), String> {
    #[derive(Deserialize)]
    struct Joined<'a> {
        #[serde(borrow)]
        joined: Cow<'a, str>,
        conn: ConnId,
        #[serde(borrow)]
        members: Vec<(&'a RawValue, f64)>,
    }
    let joined: Joined<'_> = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok((joined.joined.into_owned(), joined.conn, members_from(joined.members)?))
}

/// The STATS script's document, plus this node's own live figures when it is a node asking.
fn aggregate_stats(json: &str, me: Option<(NodeInfo, &[ChannelInfo])>) -> Result<ClusterStats, String> {
    #[derive(Deserialize)]
    struct Document {
        nodes: HashMap<String, NodeDocument>,
        members: HashMap<String, usize>,
    }
    #[derive(Deserialize)]
    struct NodeDocument {
        info: String,
        channels: HashMap<String, usize>,
    }
    #[derive(Deserialize)]
    struct Info {
        id: String,
        #[serde(default)]
        address: String,
        #[serde(default)]
        connections: usize,
    }
    let document: Document =
        serde_json::from_str(json).map_err(|e| format!("unexpected statistics from Redis: {e}"))?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
    for (id, node) in document.nodes {
        for (channel, n) in node.channels {
            *counts.entry(channel).or_default() += n;
        }
        let info: Info =
            serde_json::from_str(&node.info).unwrap_or(Info { id, address: String::new(), connections: 0 });
        nodes.insert(info.id.clone(), NodeInfo { id: info.id, address: info.address, connections: info.connections });
    }
    if let Some((me, local)) = me {
        for channel in local {
            *counts.entry(channel.name.clone()).or_default() += channel.subscribers;
        }
        nodes.insert(me.id.clone(), me);
    }
    let channels = counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| {
            let members = document.members.get(&name).copied().unwrap_or(0);
            channel_info(&name, n, members)
        })
        .collect();
    let nodes: Vec<NodeInfo> = nodes.into_values().collect();
    Ok(ClusterStats { connections: nodes.iter().map(|node| node.connections).sum(), channels, nodes })
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let user = rest[..at].split_once(':').map_or("", |(user, _)| user);
    format!("{scheme}://{user}:***@{}", &rest[at + 1..])
}

/// A redis-rs error on one line (some carry a multi-line detail).
fn one_line(error: &impl std::fmt::Display) -> String {
    error.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_start_with_the_prefix() {
        let keys = Keys::new("app1");
        assert_eq!(keys.channel("chat.room.1"), "app1:ch:chat.room.1");
        assert_eq!(keys.users(), "app1:users");
        assert_eq!(keys.inbox("42"), "app1:inbox:42");
        assert_eq!(keys.node("42"), "app1:node:42");
        assert_eq!(keys.node_channels("42"), "app1:node:42:channels");
        assert_eq!(keys.node_presence("42"), "app1:node:42:presence");
        assert_eq!(keys.nodes(), "app1:nodes");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://:secret@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(redact_url("rediss://user:pw@host/1"), "rediss://user:***@host/1");
        assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
        assert_eq!(redact_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }

    #[test]
    fn member_lists_get_connected_at_in_seconds() {
        let members = parse_members(r#"[[{"id":"ana","info":{"n":1}},1732291200123456]]"#).unwrap();
        assert_eq!(members, vec![serde_json::json!({"id":"ana","info":{"n":1},"connected_at":1732291200})]);
        let (channel, conn, members) =
            parse_joined(br#"{"joined":"presence-x","conn":7,"members":[[{"id":"b","info":{}},1.5e15]]}"#).unwrap();
        assert_eq!((channel.as_str(), conn, members.len()), ("presence-x", 7, 1));
    }

    #[test]
    fn cluster_stats_add_up_every_node() {
        let json = r#"{"nodes":{"1":{"info":"{\"id\":\"1\",\"address\":\"a:1\",\"connections\":3}",
                       "channels":{"chat":2,"presence-room":1}},
                       "2":{"info":"{\"id\":\"2\",\"address\":\"b:2\",\"connections\":0}","channels":{}}},
                       "members":{"presence-room":1}}"#;
        let me = NodeInfo { id: "9".into(), address: "c:3".into(), connections: 4 };
        let local = [channel_info("chat", 1, 0)];
        let stats = aggregate_stats(json, Some((me, &local))).unwrap();
        assert_eq!(stats.connections, 7);
        assert_eq!(stats.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["1", "2", "9"]);
        assert_eq!(stats.channels, vec![channel_info("chat", 3, 0), channel_info("presence-room", 1, 1)]);
        let empty = aggregate_stats(r#"{"nodes":{},"members":{}}"#, None).unwrap();
        assert_eq!(empty, ClusterStats::default());
    }
}
