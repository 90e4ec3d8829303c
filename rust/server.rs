//! Stage: accept. Owns the listener, the tokio runtime and the shutdown signal; hands each TCP connection to the
//! handshake and then to its connection task.
//!
//! [`RunningServer`] is the Python-free handle the bridge wraps: start binds synchronously (so "address in use"
//! is an error of `start()`, and port 0 resolves to a real port), the runtime lives on its own thread, and
//! `stop()` sends 1001 to every client and waits until every connection task has ended. With `redis_url` the
//! start also connects to Redis (failing like a bind does) and runs the broker's task beside the accept loop.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::config::ServerConfig;
use crate::handshake::{self, HeadError, Route};
use crate::http::{self, Response};
use crate::hub::Hub;
use crate::stats::Handshake;

/// How long `stop()` waits for connection tasks to finish their closing handshakes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (EMFILE and friends) so the loop does not spin while the process is out of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub struct RunningServer {
    hub: Arc<Hub>,
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
    /// For callers outside the runtime (the Python bridge) that need an async answer, such as cluster reads.
    runtime: tokio::runtime::Handle,
}

/// Why a server could not start.
#[derive(Debug)]
pub enum StartError {
    /// Binding the address (or building the runtime) failed.
    Io(io::Error),
    /// `redis_url` is set and Redis could not be reached; the message is one line.
    Broker(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Io(error) => error.fmt(f),
            StartError::Broker(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(error: io::Error) -> Self {
        StartError::Io(error)
    }
}

/// Bind like std::net::TcpListener::bind (each resolved address in turn, SO_REUSEADDR as std sets it on Unix),
/// but with the configured listen backlog instead of std's 128.
fn listen(config: &ServerConfig) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let mut last_error = io::Error::new(io::ErrorKind::InvalidInput, "the host resolved to no address");
    for address in std::net::ToSocketAddrs::to_socket_addrs(&(config.host.as_str(), config.port))? {
        let bound = Socket::new(Domain::for_address(address), Type::STREAM, None).and_then(|socket| {
            socket.set_reuse_address(true)?;
            socket.bind(&address.into())?;
            socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
            socket.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(socket))
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// How long stop() gives the broker to leave the cluster (its members removed from Redis).
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(3);

impl RunningServer {
    /// Bind, build the runtime, connect to Redis when configured, and start accepting in the background.
    pub fn start(config: ServerConfig) -> Result<Self, StartError> {
        let listener = listen(&config)?;
        let local_addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers.max(1))
            .thread_name("fastws-worker")
            .enable_all()
            .build()?;
        let address = node_address(local_addr);
        let (hub, broker_runner) = match &config.redis {
            None => (Hub::with_broker(random_node_id(), Arc::new(MemoryBroker::new(address))), None),
            Some(settings) => {
                let connect = RedisBroker::connect(settings.clone(), address, random_node_id);
                // On a thread of its own, so start() also works when called from inside another runtime.
                let connected = std::thread::scope(|scope| scope.spawn(|| runtime.block_on(connect)).join());
                let connected = connected.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                let (broker, runner, node_id) = connected.map_err(StartError::Broker)?;
                (Hub::with_broker(node_id, Arc::new(broker)), Some(runner))
            }
        };
        let hub = Arc::new(hub);
        let shutdown = CancellationToken::new();
        let handle = runtime.handle().clone();
        let thread = std::thread::Builder::new().name("fastws-runtime".into()).spawn({
            let hub = Arc::clone(&hub);
            let shutdown = shutdown.clone();
            move || {
                runtime.block_on(async move {
                    let broker =
                        broker_runner.map(|runner| tokio::spawn(runner.run(Arc::clone(&hub), shutdown.clone())));
                    let sweeper = crate::conn::sweep::run(
                        Arc::clone(&hub.live),
                        config.heartbeat_interval,
                        config.idle_timeout,
                        shutdown.clone(),
                    );
                    tokio::spawn(sweeper);
                    match TcpListener::from_std(listener) {
                        // On a worker, not on this block_on thread: tasks spawned from a worker go to its own
                        // queue, while a spawn from outside is a hand-off (a futex wake and a context switch per
                        // connection) to a worker.
                        Ok(listener) => {
                            let accepting = accept_loop(listener, hub, Arc::new(config), shutdown.clone());
                            if let Err(error) = tokio::spawn(accepting).await {
                                log::error!("the accept loop failed: {error}");
                            }
                        }
                        Err(error) => log::error!("cannot register the listener: {error}"),
                    }
                    // The broker leaves the cluster once stopped: this node's members are removed from Redis.
                    shutdown.cancel();
                    if let Some(broker) = broker {
                        let _ = timeout(BROKER_STOP_TIMEOUT, broker).await;
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        })?;
        Ok(RunningServer { hub, local_addr, shutdown, thread: Some(thread), runtime: handle })
    }

    /// The server's runtime, for callers outside it (the Python bridge) that need an async answer, such as a
    /// cluster read: `runtime().block_on(...)` from a thread that is not one of its workers.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.clone()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Close every connection with 1001 and wait for the runtime thread to end. Idempotent.
    pub fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `host:port` other nodes and operators can use: the machine's host name when bound to every interface.
fn node_address(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_owned());
    match host {
        Ok(host) if !host.is_empty() => format!("{host}:{}", addr.port()),
        _ => addr.to_string(),
    }
}

fn random_node_id() -> u32 {
    // RandomState is seeded from the OS per process: enough to tell nodes' socket ids apart.
    (RandomState::new().hash_one(std::process::id()) % 1_000_000_000) as u32
}

async fn accept_loop(listener: TcpListener, hub: Arc<Hub>, config: Arc<ServerConfig>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote_addr)) => {
                    // Slowloris: a cap on connections still in their upgrade, each also bounded by handshake_timeout.
                    if pending.fetch_add(1, Ordering::Relaxed) >= config.max_pending_handshakes {
                        pending.fetch_sub(1, Ordering::Relaxed);
                        hub.stats.handshake(Handshake::Unavailable);
                        drop(stream);
                        continue;
                    }
                    let slot = PendingHandshake(Arc::clone(&pending));
                    let connection = handle(stream, remote_addr, slot, Arc::clone(&hub), Arc::clone(&config), shutdown.clone());
                    tracker.spawn(contain_panics(connection, remote_addr));
                }
                Err(error) => {
                    log::warn!("accept failed: {error}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    if timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_err() {
        log::warn!("{} connection tasks still running after {DRAIN_TIMEOUT:?}; stopping anyway", tracker.len());
    }
}

/// Counts a connection in its HTTP upgrade for `max_pending_handshakes`; uncounts it when dropped.
struct PendingHandshake(Arc<AtomicUsize>);

impl Drop for PendingHandshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run a connection's task so that a panic in it is logged and ends only that connection. Its guards (the
/// connection slot, the hub subscriptions) are released while unwinding. Not an `async fn`: that would keep the
/// task's future twice (as its argument and inside catch_unwind), doubling every connection's task.
fn contain_panics<F: std::future::Future<Output = ()>>(
    task: F,
    remote_addr: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    std::panic::AssertUnwindSafe(task).catch_unwind().map(move |result| {
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            log::error!("a connection task from {remote_addr} panicked and was closed: {message}");
        }
    })
}

/// Counts an open WebSocket connection for `max_connections` and stats; uncounts it however the task ends.
struct ConnectionSlot(Arc<Hub>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// A connection's whole task: the upgrade, then the connection itself.
///
/// Not an `async fn`: that would keep its arguments and the `Upgraded` parts beside the connection for the task's
/// whole life. Chained with `then`, the boxed handshake is freed before the connection starts, and the task is only
/// as large as the connection's own future.
fn handle(
    stream: TcpStream,
    remote_addr: SocketAddr,
    pending: PendingHandshake,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    // Boxed: the handshake's state (the request head, the auth hook's future) is several KiB and needed once.
    let upgrading = Box::pin(async move {
        let upgraded = upgrade(stream, remote_addr, pending, &hub, &config, &shutdown).await;
        upgraded.map(|upgraded| (upgraded, hub, config, shutdown))
    });
    upgrading.then(|upgraded| match upgraded {
        None => Either::Right(std::future::ready(())),
        Some((Upgraded { stream, leftover, user, request, slot }, hub, config, shutdown)) => {
            let direct = crate::conn::outbox::direct::Socket::new(&stream);
            let ws = crate::conn::wire::WsConn::new(stream, leftover, config.max_message_size);
            // The slot is released when the connection ends, however it ends.
            let task = crate::conn::run(ws, direct, user, request, hub, config, &shutdown);
            Either::Left(task.map(move |()| drop(slot)))
        }
    })
}

/// A connection that completed its upgrade, and what its connection task needs from the handshake.
struct Upgraded {
    stream: TcpStream,
    /// Bytes the client sent after its request head.
    leftover: Vec<u8>,
    user: Option<Arc<crate::auth::User>>,
    /// Kept only for lifecycle hooks that want to see it.
    request: Option<Box<handshake::ConnectRequest>>,
    slot: ConnectionSlot,
}

/// Read the request head and answer it: plain HTTP, a refusal, or 101 Switching Protocols (then Some).
async fn upgrade(
    mut stream: TcpStream,
    remote_addr: SocketAddr,
    pending: PendingHandshake,
    hub: &Arc<Hub>,
    config: &ServerConfig,
    shutdown: &CancellationToken,
) -> Option<Upgraded> {
    let _ = stream.set_nodelay(true);
    let head = tokio::select! {
        head = timeout(config.handshake_timeout, handshake::read_head(&mut stream, remote_addr)) => head,
        () = shutdown.cancelled() => return None,
    };
    let (request, leftover) = match head {
        Ok(Ok(head)) => head,
        Ok(Err(HeadError::Disconnected)) => return None,
        Err(_) => {
            hub.stats.handshake(Handshake::Timeout);
            return None;
        }
        Ok(Err(HeadError::BadRequest(message))) => {
            refuse_handshake(&mut stream, hub, remote_addr, 400, message).await;
            return None;
        }
        Ok(Err(HeadError::TooLarge)) => {
            let message = "the request head is too large (8 KiB and 48 headers at most)";
            refuse_handshake(&mut stream, hub, remote_addr, 431, message).await;
            return None;
        }
    };
    let accept_key = match handshake::route(&request) {
        Err(message) => {
            refuse_handshake(&mut stream, hub, remote_addr, 400, message).await;
            return None;
        }
        Ok(Route::Http) => {
            http::serve(&mut stream, &request, leftover, hub, config).await;
            return None;
        }
        Ok(Route::Upgrade { accept_key }) => accept_key,
    };
    if let Err(refusal) = config.auth.origins.check(&request) {
        refuse_handshake(&mut stream, hub, remote_addr, refusal.status, &refusal.message).await;
        return None;
    }
    // Authentication may wait for a Python hook: it runs off this task's thread and yields to shutdown.
    let user = tokio::select! {
        user = config.auth.authenticate(&request) => user,
        () = shutdown.cancelled() => return None,
    };
    let user = match user {
        Ok(user) => user,
        Err(refusal) => {
            refuse_handshake(&mut stream, hub, remote_addr, refusal.status, &refusal.message).await;
            return None;
        }
    };
    let slot = ConnectionSlot(Arc::clone(hub));
    if hub.connection_opened() > config.max_connections {
        // Uncount before answering: the client may see the 503 before this task would otherwise drop the slot.
        drop(slot);
        let message = "the server is at max_connections; try again later";
        refuse_handshake(&mut stream, hub, remote_addr, 503, message).await;
        return None;
    }
    if handshake::write_switching_protocols(&mut stream, &accept_key).await.is_err() {
        return None;
    }
    hub.stats.handshake(Handshake::Accepted);
    drop(pending);
    let request = config.auth.hooks.as_ref().filter(|hooks| hooks.has_lifecycle()).map(|_| Box::new(request));
    Some(Upgraded { stream, leftover, user, request, slot })
}

/// Answer a refused handshake, count it by result and log it (one line, no per-message logging).
async fn refuse_handshake(stream: &mut TcpStream, hub: &Hub, remote_addr: SocketAddr, status: u16, message: &str) {
    hub.stats.handshake(match status {
        401 => Handshake::Unauthorized,
        403 => Handshake::Forbidden,
        503 => Handshake::Unavailable,
        _ => Handshake::BadRequest,
    });
    log::info!("refused handshake from {remote_addr}: {status} {message}");
    refuse(stream, status, message).await;
}

async fn refuse(stream: &mut TcpStream, status: u16, message: &str) {
    let _ = Response::error(status, message).write(stream, false).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_connection_task_is_contained() {
        let guard_dropped = Arc::new(AtomicUsize::new(0));
        let guard = PendingHandshake(Arc::clone(&guard_dropped));
        guard_dropped.store(1, Ordering::Relaxed);
        let task = async move {
            let _guard = guard;
            panic!("boom");
        };
        contain_panics(task, "127.0.0.1:1".parse().unwrap()).await;
        assert_eq!(guard_dropped.load(Ordering::Relaxed), 0, "the guard was released while unwinding");
    }
}
