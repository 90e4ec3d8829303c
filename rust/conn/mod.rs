//! Stage: connection task. One task per WebSocket connection: it reads client frames, applies them to the hub,
//! and writes the connection's [`Outbox`] to the socket.
//!
//! Everything the client is sent (replies and publications) goes through the outbox, in order; a sparse
//! publication may be written by the publisher's thread when the outbox is idle (outbox.rs, "Direct writes").
//! The task is a plain `poll` loop over one [`Connection`] struct rather than a `select!` of futures: between
//! wake-ups an idle connection holds only its socket, its session and a few words of writer state (no timer, no
//! shutdown future, no per-branch futures), and a wake-up for a burst of publications does no allocation.
//! Heartbeats, the idle timeout and the stop come from the sweeper (sweep.rs) as outbox signals, which wake the
//! task like frames do; so does a queue overflow, even while a write is waiting for room in the socket.

pub mod outbox;
pub mod rate;
pub mod sweep;
pub mod wire;
pub mod writer;

use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use crate::auth::{Authorization, Hooks, User};
use crate::config::ServerConfig;
use crate::error::{CloseCode, ErrorCode};
use crate::handshake::ConnectRequest;
use crate::hub::{ChannelKind, Hub, Joining, MemberJoin};
use crate::protocol::{self, Command, Origin, Refusal, Reply};
use outbox::{ConnId, Outbox, OutboxReceiver, Signal};
use rate::{Millis, RateLimiter, Verdict};
use wire::{Incoming, ReadError, WsConn};
use writer::Writer;

/// In demo mode clients may publish on `demo.*` and join `presence-demo.*` without authentication.
const DEMO_PUBLISH_PREFIX: &str = "demo.";
const DEMO_PRESENCE_PREFIX: &str = "presence-demo.";
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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

/// The task of a connection that completed its upgrade (the caller has counted it). `request` is given only
/// when lifecycle hooks want it.
///
/// Not an `async fn`: its arguments would be stored twice in the task (as arguments and as the body's locals).
/// Here they are moved into one [`Connection`] first, and the returned future owns that and little else.
pub fn run<S>(
    ws: WsConn<S>,
    direct: Option<outbox::direct::Socket>,
    user: Option<Arc<User>>,
    request: Option<Box<ConnectRequest>>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    shutdown: &CancellationToken,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = hub.new_conn_id();
    let socket_id = hub.socket_id(id);
    let (outbox, rx) = Outbox::new(id, config.send_queue_bytes, hub.live.now());
    if let Some(socket) = direct {
        rx.allow_direct(socket);
    }
    hub.live.add(&outbox);
    // The sweeper raises GoingAway on the connections it knows of when the server stops; one that registers
    // after that look sees the token cancelled here.
    if shutdown.is_cancelled() {
        outbox.raise(Signal::GoingAway);
    }
    if let Some(user) = &user {
        hub.add_user_connection(&user.id, &outbox);
    }
    let hooks = lifecycle_hooks(&config);
    // on_connect runs beside the connection; on_disconnect waits for it, so the app sees them in order.
    let connected = match (hooks, &request) {
        (Some(hooks), Some(request)) => Some(tokio::spawn(hooks.connected(&socket_id, user.as_ref(), request))),
        _ => None,
    };
    drop(request);
    let session = Session {
        rate: RateLimiter::new(config.rate_limit, config.rate_burst, Millis::now()),
        outbox,
        user,
        subscriptions: Vec::new(),
        waiting: None,
        publishing: None,
        hub,
        config,
    };
    session.reply(&Reply::Connected { socket_id: &socket_id });
    drop(socket_id);
    let mut connection = Connection { rx, ws, writer: Writer::default(), session };

    async move {
        let end = poll_fn(|cx| connection.poll_serve(cx)).await;
        // Whatever the end, nothing more is written to the socket but by this task (its close frame).
        connection.rx.stop_direct();
        connection.session.flush_publications();
        connection.session.leave_all();
        if end == End::Close(CloseCode::SlowConsumer) {
            connection.session.hub.stats.slow_consumer_closes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Boxed: the closing handshake's futures are needed once, not for the task's lifetime.
        Box::pin(connection.finish(end)).await;
        // Looked up again rather than kept from the start: every byte the future holds is held per connection.
        if let Some(hooks) = lifecycle_hooks(&connection.session.config) {
            let socket_id = connection.session.socket_id();
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
}

/// The application's hooks, when it has on_connect or on_disconnect.
fn lifecycle_hooks(config: &ServerConfig) -> Option<&Arc<dyn Hooks>> {
    config.auth.hooks.as_ref().filter(|hooks| hooks.has_lifecycle())
}

/// Everything a connection keeps between wake-ups.
struct Connection<S> {
    /// Before `ws`: fields drop in order, and dropping the receiver turns direct writes off before the socket
    /// closes (if the task is dropped unfinished, at a runtime's shutdown).
    rx: OutboxReceiver,
    ws: WsConn<S>,
    writer: Writer,
    session: Session,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Serve until the connection ends: follow signals, write what is queued, handle what the client sent and
    /// what authorize hooks answered; Pending when none of them has anything more.
    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        loop {
            if let Some(end) = self.follow_signals() {
                return Poll::Ready(end);
            }
            let hub = &self.session.hub;
            if let Poll::Ready(Err(_)) = self.writer.poll_flush(cx, &mut self.ws, &mut self.rx, hub, true) {
                return Poll::Ready(End::Dropped);
            }
            if let Poll::Ready(incoming) = self.ws.poll_next(cx) {
                match self.session.received(incoming, &mut self.writer) {
                    Some(end) => return Poll::Ready(end),
                    None => continue,
                }
            }
            // The client's burst is read: its publications go out together.
            self.session.flush_publications();
            if let Some(waiting) = self.session.waiting.as_mut().filter(|waiting| !waiting.answers.is_empty()) {
                if let Poll::Ready(Some((channel, settled))) = waiting.answers.poll_next_unpin(cx) {
                    self.session.settled(&channel, settled);
                    continue;
                }
            }
            // Register, then look again: a frame or signal that came after the looks above must not be missed.
            self.rx.register(cx);
            let signalled = self.session.outbox.signals() & !(Signal::Pinged as u8) != 0;
            if signalled || (!self.writer.is_stalled() && self.rx.has_queued()) {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Act on the outbox's signals: an end, or a ping to send.
    fn follow_signals(&mut self) -> Option<End> {
        let outbox = &self.session.outbox;
        let signals = outbox.signals();
        if signals & !(Signal::Pinged as u8) == 0 {
            return None;
        }
        if signals & Signal::GoingAway as u8 != 0 {
            return Some(End::Close(CloseCode::GoingAway));
        }
        if signals & Signal::Overflowed as u8 != 0 {
            return Some(End::Close(CloseCode::SlowConsumer));
        }
        if signals & Signal::IdleTimeout as u8 != 0 {
            return Some(End::Close(CloseCode::IdleTimeout));
        }
        if signals & Signal::PingDue as u8 != 0 {
            self.writer.ping();
            outbox.ping_sent();
        }
        None
    }

    /// End the WebSocket: send our close frame and wait briefly for the client's, or answer the client's close.
    async fn finish(&mut self, end: End) {
        let (code, reason, drain) = match end {
            // The server is stopping: what was queued before the stop goes out first (within the same grace, so a
            // client that stopped reading can't hold the stop up). Other closes are about this client.
            End::Close(code) => (Some(code as u16), code.reason(), code == CloseCode::GoingAway),
            // The client closed first: echo its code, as RFC 6455 asks.
            End::ClientClosed(code) => (code, "", false),
            End::Dropped => return,
        };
        let _ = timeout(CLOSE_GRACE, async {
            if !drain {
                // A batch not yet started is dropped; one cut off mid-frame must be completed first, or the
                // close frame would be read as part of its payload.
                self.writer.discard_unless_mid_frame();
            }
            let hub = &self.session.hub;
            if poll_fn(|cx| self.writer.poll_flush(cx, &mut self.ws, &mut self.rx, hub, drain)).await.is_err() {
                return;
            }
            if self.ws.close(code, reason).await.is_ok() && matches!(end, End::Close(_)) {
                while !matches!(self.ws.next().await, Ok(Incoming::Close(_)) | Err(_)) {}
            }
        })
        .await;
    }
}

/// One connection's state, owned by its task.
struct Session {
    /// Inbound rate limit; None when `rate_limit` is 0.
    rate: Option<RateLimiter>,
    outbox: Arc<Outbox>,
    /// Who this connection authenticated as; None in open mode.
    user: Option<Arc<User>>,
    /// Channels this connection is subscribed to; a short Vec beats a set at `max_channels_per_connection` ≈ 100.
    subscriptions: Vec<Box<str>>,
    /// Subscriptions waiting for an answer. Boxed and created at the first: most connections never have one.
    waiting: Option<Box<Waiting>>,
    /// Publications of this client's current burst to one channel, delivered together when the burst is read.
    publishing: Option<Box<Publishing>>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
}

/// Consecutive publications to one channel, delivered with one push per subscriber (one outbox lock and one
/// wake-up instead of one per publication).
struct Publishing {
    channel: Box<str>,
    frames: Vec<Utf8Bytes>,
}

/// Most publications delivered together.
const MAX_PUBLISHING: usize = 64;

/// Subscriptions waiting for their authorize hook or, in a cluster, for the broker's confirmation.
#[derive(Default)]
struct Waiting {
    /// Their channels (the hub holds those subscribers meanwhile). An unsubscribe meanwhile removes the channel.
    channels: Vec<Box<str>>,
    /// The answers in flight. The hooks run off the connection task, which keeps serving meanwhile.
    answers: FuturesUnordered<AuthorizationFuture>,
}

type AuthorizationFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (Box<str>, Settled)> + Send>>;
type AuthorizationResult = Result<Authorization, String>;

/// What a pending subscription waited for: the authorize hook's decision, or the cluster's confirmation (an
/// error when the hub let the subscriber go unconfirmed).
enum Settled {
    Authorization(AuthorizationResult),
    Joined(Result<(), tokio::sync::oneshot::error::RecvError>),
}

impl Session {
    /// Handle one read from the client: a message, a control frame, or the end of the connection.
    fn received(&mut self, incoming: Result<Incoming, ReadError>, writer: &mut Writer) -> Option<End> {
        self.outbox.heard(self.hub.live.now());
        let incoming = match incoming {
            Ok(Incoming::Close(code)) => return Some(End::ClientClosed(code)),
            // A pong only proves the client is alive.
            Ok(Incoming::Pong) => return None,
            Ok(incoming) => incoming,
            Err(ReadError::Gone) => return Some(End::Dropped),
            Err(ReadError::Protocol(_)) => return Some(End::Close(CloseCode::ProtocolError)),
            Err(ReadError::TooBig) => return Some(End::Close(CloseCode::TooBig)),
            Err(ReadError::InvalidUtf8) => return Some(End::Close(CloseCode::InvalidPayload)),
        };
        // Pings count too: each costs a pong, so a ping flood costs writes.
        let (limit, burst) = (self.config.rate_limit, self.config.rate_burst);
        let verdict = self.rate.as_mut().map_or(Verdict::Accept, |rate| rate.check(Millis::now(), limit, burst));
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
                return None;
            }
            Verdict::Drop => return None,
            Verdict::Close => return Some(End::Close(CloseCode::PolicyViolation)),
        }
        match incoming {
            Incoming::Text(text) => self.handle_text(&text),
            Incoming::Binary(data) => {
                self.hub.stats.received(data.len());
                let refusal =
                    Refusal::new(ErrorCode::Malformed, None, "binary frames are not supported: send JSON text frames");
                self.refuse(&refusal);
            }
            Incoming::Ping(payload) => writer.pong(&payload),
            Incoming::Pong | Incoming::Close(_) => {}
        }
        None
    }

    /// A pending subscription settled, unless it was unsubscribed while its hook ran (then the answer is moot).
    fn settled(&mut self, channel: &str, settled: Settled) {
        if self.take_pending(channel) {
            self.authorized(channel, settled);
        }
        if self.waiting.as_ref().is_some_and(|waiting| waiting.channels.is_empty() && waiting.answers.is_empty()) {
            self.waiting = None;
        }
    }

    /// This connection's id: its outbox's, which the hub knows it by.
    fn id(&self) -> ConnId {
        self.outbox.id
    }

    /// The id clients and hooks know this connection by. Made when needed (client publishes, hooks, demo
    /// presence) rather than kept: it would be one more allocation in every idle connection.
    fn socket_id(&self) -> String {
        self.hub.socket_id(self.id())
    }

    fn subscribed(&mut self, channel: &str) {
        // Most connections hold one or two channels: room for one at first, not the four a first push reserves.
        if self.subscriptions.capacity() == 0 {
            self.subscriptions.reserve_exact(1);
        }
        self.subscriptions.push(channel.into());
    }

    fn is_pending(&self, channel: &str) -> bool {
        self.waiting.as_ref().is_some_and(|waiting| waiting.channels.iter().any(|c| &**c == channel))
    }

    /// Stop waiting for `channel`; false if it was not pending.
    fn take_pending(&mut self, channel: &str) -> bool {
        let Some(waiting) = self.waiting.as_mut() else { return false };
        let Some(index) = waiting.channels.iter().position(|c| &**c == channel) else { return false };
        waiting.channels.swap_remove(index);
        true
    }

    /// Hold `channel` as pending until `answer` settles it.
    fn wait_for(&mut self, channel: &str, answer: AuthorizationFuture) {
        let waiting = self.waiting.get_or_insert_with(Box::default);
        waiting.channels.push(channel.into());
        waiting.answers.push(answer);
    }

    fn handle_text(&mut self, text: &str) {
        self.hub.stats.received(text.len());
        let command = protocol::decode(text);
        // Anything but a publication comes after the publications before it, as the client sent them.
        if !matches!(command, Ok(Command::Publish { .. })) {
            self.flush_publications();
        }
        match command {
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
        if self.is_pending(channel) {
            return; // the reply comes when the authorize hook (or the cluster) answers
        }
        let count = self.subscriptions.len() + self.waiting.as_ref().map_or(0, |waiting| waiting.channels.len());
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
            let member = MemberJoin { user_id: self.socket_id().into(), info };
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
                let auth = self.config.auth.clone();
                let name: Box<str> = channel.into();
                self.wait_for(
                    channel,
                    Box::pin(async move {
                        let decision = auth.authorize(&user, &name).await;
                        (name, Settled::Authorization(decision))
                    }),
                );
            }
        }
    }

    /// Settle a pending subscription: apply an authorize decision for a `private-`/`presence-` channel, or
    /// record the cluster's confirmation (the hub has queued `subscribed` already).
    fn authorized(&mut self, channel: &str, outcome: Settled) {
        let decision = match outcome {
            Settled::Authorization(decision) => decision,
            Settled::Joined(Ok(())) => return self.subscribed(channel),
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
                log::warn!("authorize for {channel} failed on connection {}: {error}", self.id());
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
            Joining::Done => self.subscribed(channel),
            Joining::Waiting(released) => {
                let name: Box<str> = channel.into();
                self.wait_for(channel, Box::pin(async move { (name, Settled::Joined(released.await)) }));
            }
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        if self.take_pending(channel) {
            self.hub.unsubscribe(channel, self.id()); // the hub may be holding it for the cluster
        }
        if let Some(index) = self.subscriptions.iter().position(|c| &**c == channel) {
            self.subscriptions.swap_remove(index);
            self.hub.unsubscribe(channel, self.id());
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
            Ok(frame) => self.queue_publication(channel, frame),
            Err(error) => self.refuse(&Refusal::new(ErrorCode::Malformed, Some(channel), error.to_string())),
        }
    }

    /// Hold a publication until the client's burst is read (or it goes to another channel, or sends something
    /// else); [`Session::flush_publications`] delivers the lot.
    fn queue_publication(&mut self, channel: &str, frame: Utf8Bytes) {
        match &mut self.publishing {
            Some(publishing) if &*publishing.channel == channel && publishing.frames.len() < MAX_PUBLISHING => {
                publishing.frames.push(frame);
            }
            _ => {
                self.flush_publications();
                self.publishing = Some(Box::new(Publishing { channel: channel.into(), frames: vec![frame] }));
            }
        }
    }

    fn flush_publications(&mut self) {
        if let Some(publishing) = self.publishing.take() {
            self.hub.broadcast_many(&publishing.channel, &publishing.frames, Some(&self.socket_id()), false);
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
        let id = self.id();
        let pending = self.waiting.as_mut().map(|waiting| std::mem::take(&mut waiting.channels)).unwrap_or_default();
        for channel in self.subscriptions.drain(..).chain(pending) {
            self.hub.unsubscribe(&channel, id);
        }
    }
}

impl Drop for Session {
    /// Also runs when the task panics or is aborted, so the hub never keeps a dead subscriber.
    fn drop(&mut self) {
        self.leave_all();
        if let Some(user) = &self.user {
            self.hub.remove_user_connection(&user.id, self.id());
        }
        self.hub.live.remove(self.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[test]
    fn a_connection_stays_small_enough_for_a_384_byte_task() {
        // tokio rounds a task's cell up to 128 bytes. With the wrappers of server::handle around it, a connection
        // of 200 bytes (32 of them tokio's TcpStream, in a release build) makes the cell 384 bytes; 8 more would
        // make it 512, for every connection (docs/benchmarks.md, idle). Measure with `-Zprint-type-sizes` (see
        // docs/benchmarks.md) before raising this. The stream is left out: a debug build's is 8 bytes larger.
        let size = std::mem::size_of::<Connection<TcpStream>>() - std::mem::size_of::<TcpStream>();
        assert!(size <= 168, "{size} bytes besides the stream");
    }
}
