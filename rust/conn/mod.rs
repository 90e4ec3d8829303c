//! Stage: connection task. One task per WebSocket connection: it reads client frames, applies them to the hub,
//! and drains the connection's [`Outbox`] to the socket, all in one `select!` so a connection costs one task.
//!
//! Everything the client is sent (replies and publications) goes through the outbox, in order. Socket writes are
//! raced against shutdown and the slow-consumer signal, so a peer that stops reading cannot pin the task.

pub mod outbox;
pub mod rate;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::auth::{Authorization, User};
use crate::config::ServerConfig;
use crate::error::{CloseCode, ErrorCode};
use crate::handshake::ConnectRequest;
use crate::hub::{ChannelKind, Hub, Joining, MemberJoin};
use crate::protocol::{self, Command, Origin, Refusal, Reply};
use outbox::{ConnId, Outbox, OutboxReceiver, Outgoing};
use rate::{RateLimiter, Verdict};
use wire::{Incoming, ReadError, WsConn};

/// Frames written per flush when the outbox holds a backlog: batching amortises the syscall.
const MAX_BATCH_FRAMES: usize = 64;
/// In demo mode clients may publish on `demo.*` and join `presence-demo.*` without authentication.
const DEMO_PUBLISH_PREFIX: &str = "demo.";
const DEMO_PRESENCE_PREFIX: &str = "presence-demo.";
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a ping or pong may wait for room in the socket before the connection is dropped.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a connection ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server closes with this code.
    Close(CloseCode),
    /// The client sent a close frame, with this code if it gave one.
    ClientClosed(Option<u16>),
    /// The socket failed or hit EOF without a closing handshake.
    Dropped,
}

impl End {
    /// The close code lifecycle hooks see: sent or received; 1005 "no status" and 1006 "abnormal" as in RFC 6455.
    fn code(&self) -> u16 {
        match self {
            End::Close(code) => *code as u16,
            End::ClientClosed(code) => code.unwrap_or(1005),
            End::Dropped => 1006,
        }
    }
}

/// Run a connection until it ends. The caller has completed the upgrade and counted the connection.
/// `request` is given only when lifecycle hooks want it.
pub async fn run<S>(
    mut ws: WsConn<S>,
    user: Option<Arc<User>>,
    request: Option<Box<ConnectRequest>>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = hub.new_conn_id();
    let socket_id = hub.socket_id(id);
    let (outbox, mut rx) = Outbox::new(id, config.send_queue_bytes);
    if let Some(user) = &user {
        hub.add_user_connection(&user.id, &outbox);
    }
    let hooks = config.auth.hooks.clone().filter(|hooks| hooks.has_lifecycle());
    // on_connect runs beside the connection; on_disconnect waits for it, so the app sees them in order.
    let connected = match (&hooks, &request) {
        (Some(hooks), Some(request)) => Some(tokio::spawn(hooks.connected(&socket_id, user.as_ref(), request))),
        _ => None,
    };
    drop(request);
    let mut session = Session {
        id,
        rate: RateLimiter::new(config.rate_limit, config.rate_burst, std::time::Instant::now()),
        socket_id: socket_id.as_str().into(),
        outbox,
        user,
        subscriptions: Vec::new(),
        pending: Vec::new(),
        authorizations: None,
        hub,
        config,
    };
    session.reply(&Reply::Connected { socket_id: &socket_id });

    let end = session.serve(&mut ws, &mut rx, &shutdown).await;
    session.leave_all();
    if end == End::Close(CloseCode::SlowConsumer) {
        session.hub.stats.slow_consumer_closes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // Boxed like the write path: the closing handshake's futures are needed once, not for the task's lifetime.
    Box::pin(finish(&mut ws, &mut rx, &end)).await;
    if let Some(hooks) = hooks {
        let disconnected = hooks.disconnected(&socket_id, end.code());
        tokio::spawn(async move {
            if let Some(connected) = connected {
                let _ = connected.await;
            }
            if let Err(error) = disconnected.await {
                log::warn!("on_disconnect failed for {socket_id}: {error}");
            }
        });
    }
}

/// End the WebSocket: send our close frame and wait briefly for the client's, or answer the client's close.
async fn finish<S>(ws: &mut WsConn<S>, rx: &mut OutboxReceiver, end: &End)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match *end {
        End::Close(code) => {
            // Send our close, then wait briefly for the client's, so it sees a clean closing handshake.
            let _ = timeout(CLOSE_GRACE, async {
                // The server is stopping: what was queued before the stop goes out first (within the same grace, so
                // a client that stopped reading can't hold the stop up). Other closes are about this client.
                if code == CloseCode::GoingAway {
                    let mut queued = Vec::new();
                    rx.try_recv_many(&mut queued, usize::MAX);
                    if write_frames(ws, &queued).await.is_err() {
                        return;
                    }
                }
                if ws.close(Some(code as u16), code.reason()).await.is_ok() {
                    while !matches!(ws.next().await, Ok(Incoming::Close(_)) | Err(_)) {}
                }
            })
            .await;
        }
        // The client closed first: echo its code, as RFC 6455 asks.
        End::ClientClosed(code) => {
            let _ = timeout(CLOSE_GRACE, ws.close(code, "")).await;
        }
        End::Dropped => {}
    }
}

/// One connection's state, owned by its task.
struct Session {
    id: ConnId,
    /// Inbound rate limit; None when `rate_limit` is 0.
    rate: Option<RateLimiter>,
    socket_id: Arc<str>,
    outbox: Arc<Outbox>,
    /// Who this connection authenticated as; None in open mode.
    user: Option<Arc<User>>,
    /// Channels this connection is subscribed to; a short Vec beats a set at `max_channels_per_connection` ≈ 100.
    subscriptions: Vec<Box<str>>,
    /// Channels whose authorize hook has not answered yet, or (in a cluster) that the broker has not confirmed
    /// yet: the hub holds those. An unsubscribe meanwhile removes them.
    pending: Vec<Box<str>>,
    /// The authorize hooks in flight. They run off the connection task, which keeps serving meanwhile.
    /// Created at the first authorization: an empty FuturesUnordered already holds two allocations.
    authorizations: Option<FuturesUnordered<AuthorizationFuture>>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
}

type AuthorizationFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (Box<str>, Settled)> + Send>>;
type AuthorizationResult = Result<Authorization, String>;

/// What a pending subscription waited for: the authorize hook's decision, or the cluster's confirmation (an
/// error when the hub let the subscriber go unconfirmed).
enum Settled {
    Authorization(AuthorizationResult),
    Joined(Result<(), tokio::sync::oneshot::error::RecvError>),
}

/// Why a socket write stopped.
enum WriteStop {
    Failed,
    Close(CloseCode),
}

impl Session {
    /// The main loop, until the connection ends.
    async fn serve<S>(&mut self, ws: &mut WsConn<S>, rx: &mut OutboxReceiver, shutdown: &CancellationToken) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let heartbeat = self.config.heartbeat_interval;
        let idle = self.config.idle_timeout;
        let mut last_heard = Instant::now();
        let mut pinged = false;
        let timer = sleep_until(next_check(last_heard, pinged, heartbeat, idle));
        tokio::pin!(timer);
        // Made once and kept registered: a fresh `cancelled()` per loop turn (and per write) registers and
        // unregisters with the token's mutex-guarded waiter list each time, a cost on every delivery.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);

        loop {
            tokio::select! {
                biased;
                () = &mut cancelled => return End::Close(CloseCode::GoingAway),
                () = self.outbox.overflowed() => return End::Close(CloseCode::SlowConsumer),
                frame = rx.recv() => {
                    // The session holds the sender, so the queue cannot close while it runs.
                    let Some(frame) = frame else { return End::Dropped };
                    let stall_limit = self.config.idle_timeout;
                    // Boxed: the write future is large and lives only while writing, so an idle task stays small.
                    if let Err(stop) = Box::pin(write_batch(ws, rx, frame, &self.outbox, &self.hub, stall_limit, cancelled.as_mut())).await {
                        return match stop { WriteStop::Failed => End::Dropped, WriteStop::Close(code) => End::Close(code) };
                    }
                }
                incoming = ws.next() => {
                    last_heard = Instant::now();
                    pinged = false;
                    let incoming = match incoming {
                        Ok(Incoming::Close(code)) => return End::ClientClosed(code),
                        // A pong only proves the client is alive.
                        Ok(Incoming::Pong) => continue,
                        Ok(incoming) => incoming,
                        Err(ReadError::Gone) => return End::Dropped,
                        Err(ReadError::Protocol(_)) => return End::Close(CloseCode::ProtocolError),
                        Err(ReadError::TooBig) => return End::Close(CloseCode::TooBig),
                        Err(ReadError::InvalidUtf8) => return End::Close(CloseCode::InvalidPayload),
                    };
                    // Pings count too: each costs a pong, so a ping flood costs writes.
                    let verdict = self.rate.as_mut().map_or(Verdict::Accept, |rate| rate.check(std::time::Instant::now()));
                    match verdict {
                        Verdict::Accept => {}
                        Verdict::Warn => {
                            self.refuse(&Refusal::new(
                                ErrorCode::RateLimited,
                                None,
                                format!(
                                    "rate limited: at most {} messages/s (burst {}); messages are dropped, \
                                     and the connection closes if this goes on for a second",
                                    self.config.rate_limit, self.config.rate_burst
                                ),
                            ));
                            continue;
                        }
                        Verdict::Drop => continue,
                        Verdict::Close => return End::Close(CloseCode::PolicyViolation),
                    }
                    match incoming {
                        Incoming::Text(text) => self.handle_text(&text),
                        Incoming::Binary(data) => {
                            self.hub.stats.received(data.len());
                            let refusal = Refusal::new(ErrorCode::Malformed, None, "binary frames are not supported: send JSON text frames");
                            self.refuse(&refusal);
                        }
                        Incoming::Ping(payload) => {
                            // Bounded: a client that pings but never reads must not pin the task on its pong.
                            if !matches!(timeout(CONTROL_WRITE_TIMEOUT, Box::pin(ws.pong(&payload))).await, Ok(Ok(()))) {
                                return End::Dropped;
                            }
                        }
                        Incoming::Pong | Incoming::Close(_) => {}
                    }
                }
                Some((channel, decision)) = next_authorization(&mut self.authorizations), if self.authorizations.as_ref().is_some_and(|a| !a.is_empty()) => {
                    // A channel no longer pending was unsubscribed while its hook ran: the answer is moot.
                    if let Some(index) = self.pending.iter().position(|c| *c == channel) {
                        self.pending.swap_remove(index);
                        self.authorized(&channel, decision);
                    }
                }
                () = &mut timer => {
                    let silent = last_heard.elapsed();
                    if !idle.is_zero() && silent >= idle {
                        return End::Close(CloseCode::IdleTimeout);
                    }
                    if !heartbeat.is_zero() && silent >= heartbeat && !pinged {
                        pinged = true;
                        if !matches!(timeout(CONTROL_WRITE_TIMEOUT, Box::pin(ws.ping())).await, Ok(Ok(()))) {
                            return End::Dropped;
                        }
                    }
                    timer.as_mut().reset(next_check(last_heard, pinged, heartbeat, idle));
                }
            }
        }
    }

    fn handle_text(&mut self, text: &str) {
        self.hub.stats.received(text.len());
        match protocol::decode(text) {
            Ok(Command::Ping) => self.reply(&Reply::Pong),
            Ok(Command::Subscribe { channel, info }) => self.subscribe(&channel, info),
            Ok(Command::Unsubscribe { channel }) => self.unsubscribe(&channel),
            Ok(Command::Publish { channel, payload }) => self.publish(&channel, payload.get()),
            Err(refusal) => self.refuse(&refusal),
        }
    }

    fn subscribe(&mut self, channel: &str, info: Option<&serde_json::value::RawValue>) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        let kind = ChannelKind::of(channel);
        if self.is_subscribed(channel) {
            // Idempotent: the hub queues the reply again (with the members, on a presence channel).
            let member = self.member_join(kind, serde_json::Map::new());
            self.hub.join(channel, &self.outbox, member);
            return;
        }
        if self.pending.iter().any(|c| &**c == channel) {
            return; // the reply comes when the authorize hook (or the cluster) answers
        }
        let count = self.subscriptions.len() + self.pending.len();
        if count >= self.config.max_channels_per_connection {
            return self.refuse(&Refusal::new(
                ErrorCode::TooManyChannels,
                Some(channel),
                format!("this connection is already subscribed to {count} channels (max_channels_per_connection)"),
            ));
        }
        if kind == ChannelKind::Public {
            return self.join(channel, None);
        }
        if self.user.is_none() && self.config.demo && channel.starts_with(DEMO_PRESENCE_PREFIX) {
            // Demo mode's anonymous presence: the member is this socket, its info what the client sent.
            let info = info.and_then(|raw| serde_json::from_str(raw.get()).ok()).unwrap_or_default();
            let member = MemberJoin { user_id: Arc::clone(&self.socket_id), info };
            return self.join(channel, Some(member));
        }
        // With authentication configured every connection has a user, so only open mode gets here.
        let Some(user) = self.user.clone() else {
            let why = "private- and presence- channels need an authenticated user, and this server has no \
                       authentication configured (open mode)";
            return self.refuse(&Refusal::new(ErrorCode::Forbidden, Some(channel), why));
        };
        match self.config.auth.authorize_now(&user.id, channel) {
            Some(decision) => self.authorized(channel, Settled::Authorization(Ok(decision))),
            None => {
                self.pending.push(channel.into());
                let auth = self.config.auth.clone();
                let channel: Box<str> = channel.into();
                self.authorizations.get_or_insert_with(FuturesUnordered::new).push(Box::pin(async move {
                    let decision = auth.authorize(&user, &channel).await;
                    (channel, Settled::Authorization(decision))
                }));
            }
        }
    }

    /// Settle a pending subscription: apply an authorize decision for a `private-`/`presence-` channel, or
    /// record the cluster's confirmation (the hub has queued `subscribed` already).
    fn authorized(&mut self, channel: &str, outcome: Settled) {
        let decision = match outcome {
            Settled::Authorization(decision) => decision,
            Settled::Joined(Ok(())) => return self.subscriptions.push(channel.into()),
            Settled::Joined(Err(_)) => return, // let go unconfirmed: nothing was sent
        };
        let info = match decision {
            Ok(Authorization::Allowed) => None,
            Ok(Authorization::AllowedWithInfo(info)) => Some(info),
            Ok(Authorization::Denied) => {
                return self.refuse(&Refusal::new(
                    ErrorCode::Forbidden,
                    Some(channel),
                    "you are not authorized to subscribe to this channel",
                ));
            }
            Err(error) => {
                log::warn!("authorize for {channel} failed on connection {}: {error}", self.id);
                return self.refuse(&Refusal::new(
                    ErrorCode::Forbidden,
                    Some(channel),
                    "authorization failed; the subscription was refused",
                ));
            }
        };
        let kind = ChannelKind::of(channel);
        let info = info.unwrap_or_else(|| self.user.as_ref().map(|user| user.presence_info()).unwrap_or_default());
        let member = self.member_join(kind, info);
        self.join(channel, member);
    }

    fn member_join(&self, kind: ChannelKind, info: serde_json::Map<String, serde_json::Value>) -> Option<MemberJoin> {
        let user = self.user.as_ref().filter(|_| kind == ChannelKind::Presence)?;
        Some(MemberJoin { user_id: Arc::clone(&user.id), info })
    }

    /// Join the hub; it queues `subscribed` under its lock, so no publication can overtake the reply. In a
    /// cluster it may hold the subscriber until the broker confirms the channel; it is pending until then.
    fn join(&mut self, channel: &str, member: Option<MemberJoin>) {
        match self.hub.join(channel, &self.outbox, member) {
            Joining::Done => self.subscriptions.push(channel.into()),
            Joining::Waiting(released) => {
                self.pending.push(channel.into());
                let channel: Box<str> = channel.into();
                let authorizations = self.authorizations.get_or_insert_with(FuturesUnordered::new);
                authorizations.push(Box::pin(async move { (channel, Settled::Joined(released.await)) }));
            }
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        if let Some(index) = self.pending.iter().position(|c| &**c == channel) {
            self.pending.swap_remove(index);
            self.hub.unsubscribe(channel, self.id); // the hub may be holding it for the cluster
        }
        if let Some(index) = self.subscriptions.iter().position(|c| &**c == channel) {
            self.subscriptions.swap_remove(index);
            self.hub.unsubscribe(channel, self.id);
        }
        self.reply(&Reply::Unsubscribed { channel });
    }

    fn publish(&mut self, channel: &str, payload: &str) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        let demo_channel = self.config.demo && channel.starts_with(DEMO_PUBLISH_PREFIX);
        if !demo_channel && !self.config.client_publish.matches(channel) {
            return self.refuse(&Refusal::new(
                ErrorCode::Forbidden,
                Some(channel),
                "clients may not publish to this channel (see the client_publish setting)",
            ));
        }
        if ChannelKind::of(channel) != ChannelKind::Public && !self.is_subscribed(channel) {
            return self.refuse(&Refusal::new(
                ErrorCode::Forbidden,
                Some(channel),
                "subscribe to a private or presence channel before publishing to it",
            ));
        }
        match protocol::encode_publication(channel, payload, Origin::Client) {
            Ok(frame) => {
                self.hub.broadcast(channel, &frame, Some(&self.socket_id));
            }
            Err(error) => self.refuse(&Refusal::new(ErrorCode::Malformed, Some(channel), error.to_string())),
        }
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions.iter().any(|c| &**c == channel)
    }

    fn reply(&self, reply: &Reply<'_>) {
        self.outbox.push(reply.encode());
    }

    fn refuse(&self, refusal: &Refusal) {
        self.reply(&Reply::Error(refusal));
    }

    fn leave_all(&mut self) {
        for channel in self.subscriptions.drain(..).chain(self.pending.drain(..)) {
            self.hub.unsubscribe(&channel, self.id);
        }
    }
}

impl Drop for Session {
    /// Also runs when the task panics or is aborted, so the hub never keeps a dead subscriber.
    fn drop(&mut self) {
        self.leave_all();
        if let Some(user) = &self.user {
            self.hub.remove_user_connection(&user.id, self.id);
        }
    }
}

/// Write queued frames as one batch (one writev where the socket takes it all).
async fn write_frames<S>(ws: &mut WsConn<S>, batch: &[Outgoing]) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let payloads: Vec<&[u8]> = batch.iter().map(|outgoing| outgoing.frame.as_bytes()).collect();
    ws.write_texts(&payloads).await
}

/// Write `first` and whatever else is already queued, then flush once; raced against shutdown and overflow.
async fn write_batch<S>(
    ws: &mut WsConn<S>,
    rx: &mut OutboxReceiver,
    first: Outgoing,
    outbox: &Outbox,
    hub: &Hub,
    idle_timeout: Duration,
    cancelled: Pin<&mut WaitForCancellationFuture<'_>>,
) -> Result<(), WriteStop>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        let mut batch = vec![first];
        rx.try_recv_many(&mut batch, MAX_BATCH_FRAMES - 1);
        write_frames(ws, &batch).await?;
        for outgoing in &batch {
            outbox.written(outgoing.frame.len());
            // Written means flushed to the socket: only now does a sampled publish count this subscriber as done.
            if let Some(latency) = outgoing.timer.as_ref().and_then(|timer| timer.written()) {
                hub.stats.observe_publish_latency(latency);
            }
        }
        Ok::<(), std::io::Error>(())
    };
    // A write that cannot finish within the idle timeout means the peer stopped reading.
    let stall_limit = if idle_timeout.is_zero() { Duration::MAX } else { idle_timeout };
    tokio::select! {
        result = timeout(stall_limit, write) => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteStop::Failed),
            Err(_) => Err(WriteStop::Close(CloseCode::IdleTimeout)),
        },
        () = cancelled => Err(WriteStop::Close(CloseCode::GoingAway)),
        () = outbox.overflowed() => Err(WriteStop::Close(CloseCode::SlowConsumer)),
    }
}

/// The next answered authorization (None, so the select branch is skipped, when there are none).
async fn next_authorization(
    authorizations: &mut Option<FuturesUnordered<AuthorizationFuture>>,
) -> Option<(Box<str>, Settled)> {
    authorizations.as_mut()?.next().await
}

/// When the heartbeat timer should next look at the connection.
fn next_check(last_heard: Instant, pinged: bool, heartbeat: Duration, idle: Duration) -> Instant {
    let far = last_heard + Duration::from_secs(86_400);
    let ping_at = if heartbeat.is_zero() || pinged { far } else { last_heard + heartbeat };
    let idle_at = if idle.is_zero() { far } else { last_heard + idle };
    let next = ping_at.min(idle_at);
    // After the ping went out with no idle timeout, re-check a heartbeat later rather than spin.
    if next <= Instant::now() {
        Instant::now() + heartbeat.max(Duration::from_secs(1))
    } else {
        next
    }
}
