//! Stage: connection task. One task per WebSocket connection: it reads client frames, applies them to the hub,
//! and drains the connection's [`Outbox`] to the socket, all in one `select!` so a connection costs one task.
//!
//! Everything the client is sent (replies and publications) goes through the outbox, in order. Socket writes are
//! raced against shutdown and the slow-consumer signal, so a peer that stops reading cannot pin the task.

pub mod outbox;

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use crate::auth::{Authorization, User};
use crate::config::ServerConfig;
use crate::error::{CloseCode, ErrorCode};
use crate::hub::{ChannelKind, Hub, MemberJoin};
use crate::protocol::{self, Command, Origin, Refusal, Reply};
use outbox::{ConnId, Outbox, OutboxReceiver};

/// Frames written per flush when the outbox holds a backlog: batching amortises the syscall.
const MAX_BATCH_FRAMES: usize = 64;
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Run a connection until it ends. The caller has completed the upgrade and counted the connection.
pub async fn run<S>(
    mut ws: WebSocketStream<S>,
    user: Option<Arc<User>>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = hub.new_conn_id();
    let (outbox, mut rx) = Outbox::new(id, config.send_queue_bytes);
    let outbox = Arc::new(outbox);
    if let Some(user) = &user {
        hub.add_user_connection(&user.id, &outbox);
    }
    let mut session = Session {
        id,
        outbox,
        user,
        subscriptions: Vec::new(),
        pending: Vec::new(),
        authorizations: FuturesUnordered::new(),
        hub,
        config,
    };
    session.reply(&Reply::Connected { socket_id: &session.hub.socket_id(id) });

    let close = session.serve(&mut ws, &mut rx, &shutdown).await;
    session.leave_all();
    if let Some(code) = close {
        let frame =
            CloseFrame { code: WireCloseCode::from(code as u16), reason: Utf8Bytes::from_static(code.reason()) };
        // Send our close, then wait briefly for the client's, so it sees a clean closing handshake.
        let _ = timeout(CLOSE_GRACE, async {
            if ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    } else {
        // The client closed (or the socket failed): flush tungstenite's automatic close reply, if any.
        let _ = timeout(CLOSE_GRACE, ws.close(None)).await;
    }
}

/// One connection's state, owned by its task.
struct Session {
    id: ConnId,
    outbox: Arc<Outbox>,
    /// Who this connection authenticated as; None in open mode.
    user: Option<Arc<User>>,
    /// Channels this connection is subscribed to; a short Vec beats a set at `max_channels_per_connection` ≈ 100.
    subscriptions: Vec<Box<str>>,
    /// Channels whose authorize hook has not answered yet (an unsubscribe meanwhile removes them).
    pending: Vec<Box<str>>,
    /// The authorize hooks in flight. They run off the connection task, which keeps serving meanwhile.
    authorizations: FuturesUnordered<AuthorizationFuture>,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
}

type AuthorizationFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (Box<str>, AuthorizationResult)> + Send>>;
type AuthorizationResult = Result<Authorization, String>;

/// Why a socket write stopped.
enum WriteStop {
    Failed,
    Close(CloseCode),
}

impl Session {
    /// The main loop. Returns the close code to send, or None when the client went away by itself.
    async fn serve<S>(
        &mut self,
        ws: &mut WebSocketStream<S>,
        rx: &mut OutboxReceiver,
        shutdown: &CancellationToken,
    ) -> Option<CloseCode>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let heartbeat = self.config.heartbeat_interval;
        let idle = self.config.idle_timeout;
        let mut last_heard = Instant::now();
        let mut pinged = false;
        let timer = sleep_until(next_check(last_heard, pinged, heartbeat, idle));
        tokio::pin!(timer);

        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Some(CloseCode::GoingAway),
                () = self.outbox.overflowed() => return Some(CloseCode::SlowConsumer),
                frame = rx.recv() => {
                    let frame = frame?;
                    let stall_limit = self.config.idle_timeout;
                    if let Err(stop) = write_batch(ws, rx, frame, &self.outbox, stall_limit, shutdown).await {
                        return match stop { WriteStop::Failed => None, WriteStop::Close(code) => Some(code) };
                    }
                }
                message = ws.next() => {
                    last_heard = Instant::now();
                    pinged = false;
                    match message {
                        Some(Ok(Message::Text(text))) => self.handle_text(&text),
                        Some(Ok(Message::Binary(data))) => {
                            self.hub.stats.received(data.len());
                            self.refuse(&Refusal::new(ErrorCode::Malformed, None, "binary frames are not supported: send JSON text frames"));
                        }
                        Some(Ok(Message::Close(_))) | None => return None,
                        // tungstenite answers pings itself; a pong only proves the client is alive.
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return close_code_for(&error),
                    }
                }
                Some((channel, decision)) = self.authorizations.next(), if !self.authorizations.is_empty() => {
                    // A channel no longer pending was unsubscribed while its hook ran: the answer is moot.
                    if let Some(index) = self.pending.iter().position(|c| *c == channel) {
                        self.pending.swap_remove(index);
                        self.authorized(&channel, decision);
                    }
                }
                () = &mut timer => {
                    let silent = last_heard.elapsed();
                    if !idle.is_zero() && silent >= idle {
                        return Some(CloseCode::IdleTimeout);
                    }
                    if !heartbeat.is_zero() && silent >= heartbeat && !pinged {
                        pinged = true;
                        if ws.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                            return None;
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
            Ok(Command::Subscribe { channel }) => self.subscribe(&channel),
            Ok(Command::Unsubscribe { channel }) => self.unsubscribe(&channel),
            Ok(Command::Publish { channel, payload }) => self.publish(&channel, payload.get()),
            Err(refusal) => self.refuse(&refusal),
        }
    }

    fn subscribe(&mut self, channel: &str) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        let kind = ChannelKind::of(channel);
        if self.is_subscribed(channel) {
            // Idempotent: the hub queues the reply again (with the members, on a presence channel).
            let member = self.member_join(kind, serde_json::Map::new());
            self.hub.subscribe(channel, &self.outbox, member);
            return;
        }
        if self.pending.iter().any(|c| &**c == channel) {
            return; // the reply comes when the authorize hook answers
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
        let Some(user) = self.user.clone() else {
            let why = if self.config.auth.required() {
                "private- and presence- channels need an authenticated user"
            } else {
                "private- and presence- channels need an authenticated user, and this server has no authentication \
                 configured (open mode)"
            };
            return self.refuse(&Refusal::new(ErrorCode::Forbidden, Some(channel), why));
        };
        match self.config.auth.authorize_now(&user.id, channel) {
            Some(decision) => self.authorized(channel, Ok(decision)),
            None => {
                self.pending.push(channel.into());
                let auth = self.config.auth.clone();
                let channel: Box<str> = channel.into();
                self.authorizations.push(Box::pin(async move {
                    let decision = auth.authorize(&user, &channel).await;
                    (channel, decision)
                }));
            }
        }
    }

    /// Apply an authorize decision for a `private-`/`presence-` subscription.
    fn authorized(&mut self, channel: &str, decision: AuthorizationResult) {
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
                log::warn!("fastws: authorize for {channel} failed on connection {}: {error}", self.id);
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

    /// Join the hub; it queues `subscribed` under its lock, so no publication can overtake the reply.
    fn join(&mut self, channel: &str, member: Option<MemberJoin>) {
        self.hub.subscribe(channel, &self.outbox, member);
        self.subscriptions.push(channel.into());
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Err(refusal) = protocol::validate_channel_name(channel) {
            return self.refuse(&refusal);
        }
        if let Some(index) = self.pending.iter().position(|c| &**c == channel) {
            self.pending.swap_remove(index);
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
        if !self.config.client_publish.matches(channel) {
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
                self.hub.publish(channel, &frame, Some(self.id));
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
        for channel in self.subscriptions.drain(..) {
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

/// Write `first` and whatever else is already queued, then flush once; raced against shutdown and overflow.
async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    rx: &mut OutboxReceiver,
    first: Utf8Bytes,
    outbox: &Outbox,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<(), WriteStop>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        let mut next = Some(first);
        let mut frames = 0;
        while let Some(frame) = next {
            let len = frame.len();
            ws.feed(Message::Text(frame)).await?;
            outbox.written(len);
            frames += 1;
            next = if frames < MAX_BATCH_FRAMES { rx.try_recv() } else { None };
        }
        ws.flush().await
    };
    // A write that cannot finish within the idle timeout means the peer stopped reading.
    let stall_limit = if idle_timeout.is_zero() { Duration::MAX } else { idle_timeout };
    tokio::select! {
        result = timeout(stall_limit, write) => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteStop::Failed),
            Err(_) => Err(WriteStop::Close(CloseCode::IdleTimeout)),
        },
        () = shutdown.cancelled() => Err(WriteStop::Close(CloseCode::GoingAway)),
        () = outbox.overflowed() => Err(WriteStop::Close(CloseCode::SlowConsumer)),
    }
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

/// The close code for a read error, or None when the socket is simply gone.
fn close_code_for(error: &tungstenite::Error) -> Option<CloseCode> {
    match error {
        tungstenite::Error::Capacity(_) => Some(CloseCode::TooBig),
        tungstenite::Error::Utf8(_) => Some(CloseCode::InvalidPayload),
        tungstenite::Error::Protocol(_) => Some(CloseCode::ProtocolError),
        _ => None,
    }
}
