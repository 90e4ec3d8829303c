//! End-to-end tests of the Rust core: a real `RunningServer` on 127.0.0.1:0 and real clients over TCP.
//!
//! Every assertion is about what a client sees on the wire (frames, close codes, HTTP answers) or what the hub
//! reports. Each test starts its own server; every wait is bounded so a regression fails instead of hanging.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use _fastws::config::ServerConfig;
use _fastws::protocol::{encode_publication, Origin};
use _fastws::server::RunningServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Upper bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------------
// Server helpers
// ---------------------------------------------------------------------------------------------------------------

fn config() -> ServerConfig {
    ServerConfig { host: "127.0.0.1".into(), port: 0, workers: 2, ..ServerConfig::default() }
}

fn start(config: ServerConfig) -> RunningServer {
    RunningServer::start(config).expect("the server starts on 127.0.0.1:0")
}

/// `stop()` joins the server's runtime thread, so it runs on the blocking pool, never on a test worker.
async fn stop(server: RunningServer) {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.stop();
    })
    .await
    .expect("stop() does not panic");
}

/// Poll `condition` until it holds or `WAIT` passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn subscribers(server: &RunningServer, channel: &str) -> usize {
    server.hub().channel_info(channel).map_or(0, |info| info.subscribers)
}

// ---------------------------------------------------------------------------------------------------------------
// WebSocket client helpers (tokio-tungstenite)
// ---------------------------------------------------------------------------------------------------------------

/// Connect, read the `connected` frame and return the client with its socket id.
async fn connect_path(addr: SocketAddr, path: &str) -> (Ws, String) {
    let url = format!("ws://{addr}{path}");
    let (mut ws, response) = timeout(WAIT, connect_async(url.as_str()))
        .await
        .expect("the handshake completes in time")
        .expect("the upgrade is accepted");
    assert_eq!(response.status(), 101);
    let first = recv_json(&mut ws).await;
    assert_eq!(first["event"], "connected", "first frame: {first}");
    let socket_id = first["data"]["socket_id"]
        .as_str()
        .unwrap_or_else(|| panic!("connected carries a string socket_id: {first}"))
        .to_owned();
    (ws, socket_id)
}

async fn connect(addr: SocketAddr) -> (Ws, String) {
    connect_path(addr, "/").await
}

/// The next text frame as JSON, skipping pings and pongs. Panics on close, error or after `WAIT`.
async fn recv_json(ws: &mut Ws) -> Value {
    loop {
        let message = timeout(WAIT, ws.next())
            .await
            .expect("a frame arrives in time")
            .expect("the connection is still open")
            .expect("the frame is read without error");
        match message {
            Message::Text(text) => {
                return serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn send_json(ws: &mut Ws, value: Value) {
    timeout(WAIT, ws.send(Message::text(value.to_string())))
        .await
        .expect("the send completes in time")
        .expect("the frame is sent");
}

async fn subscribe(ws: &mut Ws, channel: &str) {
    send_json(ws, json!({"event": "subscribe", "data": {"channel": channel}})).await;
    assert_eq!(recv_json(ws).await, json!({"event": "subscribed", "channel": channel}));
}

/// Read until the server's close frame and return it (text frames before it are skipped).
async fn recv_close(ws: &mut Ws) -> CloseFrame {
    loop {
        let message = timeout(WAIT, ws.next()).await.expect("the server closes in time");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Close(None))) => panic!("the server closed without a status code"),
            Some(Ok(_)) => {}
            Some(Err(error)) => panic!("the connection failed before a close frame: {error}"),
            None => panic!("the connection ended before a close frame"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Raw TCP helpers: plain HTTP, a hand-made handshake and hand-made frames
// ---------------------------------------------------------------------------------------------------------------

/// Send `request` as-is and read the whole answer (the server closes after every plain-HTTP response).
async fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
    stream.write_all(request).await.expect("the request is written");
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("the server answers and closes in time")
        .expect("the response is read");
    parse_http_response(&response)
}

fn parse_http_response(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    assert_eq!(body.len(), length, "the body matches Content-Length");
    (status, body.to_owned())
}

fn upgrade_request(addr: SocketAddr, path: &str, version: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
}

/// A WebSocket client made by hand, for what tokio-tungstenite will not do: stay silent, or never read.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A server frame as it came off the wire.
#[derive(Debug)]
struct RawFrame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawFrame {
    /// Status code and reason of a close frame.
    fn close_code(&self) -> (u16, String) {
        assert_eq!(self.opcode, 0x8, "not a close frame: {self:?}");
        assert!(self.payload.len() >= 2, "close frame without a status code");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (code, String::from_utf8_lossy(&self.payload[2..]).into_owned())
    }
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        Self::handshake(TcpStream::connect(addr).await.expect("TCP connect"), addr).await
    }

    /// Complete the upgrade on `stream`; bytes after the 101 head stay buffered for `read_frame`.
    async fn handshake(mut stream: TcpStream, addr: SocketAddr) -> Self {
        stream.write_all(upgrade_request(addr, "/", "13").as_bytes()).await.expect("the upgrade request is written");
        let mut client = RawClient { stream, buf: Vec::new() };
        let head_end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            client.fill().await;
        };
        let head = String::from_utf8_lossy(&client.buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "expected 101, got {head:?}");
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455 accept key: {head:?}");
        client.buf.drain(..head_end);
        client
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server sends something in time")
            .expect("the socket is readable");
        assert!(n > 0, "the server closed the TCP connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Read one unfragmented, unmasked server frame.
    async fn read_frame(&mut self) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill().await;
        }
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.stream.write_all(&masked_frame(opcode, payload)).await.expect("the frame is written");
    }
}

/// A final client frame with a mask, as RFC 6455 requires of clients.
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Parse one server frame from the front of `buf`; None when it is not complete yet.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[0] & 0x80, 0x80, "the server sends final frames only");
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    let opcode = buf[0] & 0x0f;
    let (len, header) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        len => (len as usize, 2),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    Some((RawFrame { opcode, payload }, header + len))
}

// ---------------------------------------------------------------------------------------------------------------
// The protocol over a real socket
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn connect_subscribe_publish_unsubscribe() {
    let server = start(config());
    let (mut ws, socket_id) = connect(server.local_addr()).await;
    let (node, conn) = socket_id.split_once('.').expect("socket_id is <node>.<conn>");
    assert!(node.parse::<u32>().is_ok() && conn.parse::<u64>().is_ok(), "{socket_id}");
    assert_eq!(server.hub().connection_count(), 1);

    subscribe(&mut ws, "news").await;
    assert_eq!(subscribers(&server, "news"), 1);

    // A payload without "event" is wrapped as a "message"…
    let frame = encode_publication("news", r#"{"title":"hello","n":1}"#, Origin::Server).unwrap();
    assert_eq!(server.hub().publish("news", &frame, None, false), 1);
    assert_eq!(
        recv_json(&mut ws).await,
        json!({"event": "message", "channel": "news", "data": {"title": "hello", "n": 1}})
    );
    // …an object with "event" keeps its shape, keys in the written order, and gains the channel.
    let frame = encode_publication("news", r#"{"event":"breaking","data":[1,2]}"#, Origin::Server).unwrap();
    assert_eq!(server.hub().publish("news", &frame, None, false), 1);
    let Some(Ok(Message::Text(text))) = timeout(WAIT, ws.next()).await.expect("publication arrives") else {
        panic!("expected a text frame");
    };
    assert_eq!(text.as_str(), r#"{"event":"breaking","data":[1,2],"channel":"news"}"#);
    // Another channel's publications do not reach this client.
    let other = encode_publication("sport", "42", Origin::Server).unwrap();
    assert_eq!(server.hub().publish("sport", &other, None, false), 0);

    send_json(&mut ws, json!({"event": "unsubscribe", "data": {"channel": "news"}})).await;
    assert_eq!(recv_json(&mut ws).await, json!({"event": "unsubscribed", "channel": "news"}));
    assert!(server.hub().channel_info("news").is_none(), "the empty channel is removed");
    let late = encode_publication("news", r#""too late""#, Origin::Server).unwrap();
    assert_eq!(server.hub().publish("news", &late, None, false), 0);
    // Replies keep their order, so a pong right after proves no publication slipped in.
    send_json(&mut ws, json!({"event": "ping"})).await;
    assert_eq!(recv_json(&mut ws).await, json!({"event": "pong"}));

    ws.close(None).await.ok();
    drop(ws);
    eventually("the connection is uncounted", || server.hub().connection_count() == 0).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_on_ws_path_with_a_query_string() {
    let server = start(config());
    let (mut ws, _) = connect_path(server.local_addr(), "/ws?token=abc&v=1").await;
    subscribe(&mut ws, "chat.room.1").await;
    drop(ws);
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Plain HTTP on the WebSocket port
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn healthz_is_200() {
    let server = start(config());
    let (status, body) = http(server.local_addr(), b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"status":"ok"}"#);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_get_on_the_websocket_path_is_426() {
    let server = start(config());
    let (status, body) = http(server.local_addr(), b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 426);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("WebSocket")), "{body}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_version_8_is_400() {
    let server = start(config());
    let addr = server.local_addr();
    let (status, body) = http(addr, upgrade_request(addr, "/", "8").as_bytes()).await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("13")), "{body}");
    assert_eq!(server.hub().connection_count(), 0);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn head_healthz_has_no_body() {
    let server = start(config());
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8(response).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "a HEAD answer ends with its headers: {text:?}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_head_over_8_kib_is_431() {
    let server = start(config());
    // Just over the limit (the head may arrive in one read) and well over it.
    for padding in [8 * 1024 + 100, 9 * 1024] {
        let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Padding: {}\r\n\r\n", "a".repeat(padding));
        let (status, _) = http(server.local_addr(), request.as_bytes()).await;
        assert_eq!(status, 431, "padding {padding}");
    }
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_refuses_the_second_upgrade_with_503() {
    let server = start(ServerConfig { max_connections: 1, ..config() });
    let addr = server.local_addr();
    let (mut first, _) = connect(addr).await;

    // What a WebSocket client sees…
    match timeout(WAIT, connect_async(format!("ws://{addr}/"))).await.expect("answer in time") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(other) => panic!("expected an HTTP 503, got {other}"),
        Ok(_) => panic!("the second connection was accepted past max_connections = 1"),
    }
    // …and the body on the wire.
    let (status, body) = http(addr, upgrade_request(addr, "/", "13").as_bytes()).await;
    assert_eq!(status, 503);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["error"].as_str().is_some_and(|e| e.contains("max_connections")), "{body}");

    // The first client is unaffected.
    assert_eq!(server.hub().connection_count(), 1);
    subscribe(&mut first, "still.here").await;
    send_json(&mut first, json!({"event": "ping"})).await;
    assert_eq!(recv_json(&mut first).await, json!({"event": "pong"}));

    // Refusals did not leak slots: once the first leaves, a new client gets in.
    first.close(None).await.ok();
    drop(first);
    eventually("the first connection is uncounted", || server.hub().connection_count() == 0).await;
    let (again, _) = connect(addr).await;
    drop(again);
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Frames the server refuses with a close code
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn message_over_max_message_size_closes_with_1009() {
    let server = start(ServerConfig { max_message_size: 1024, ..config() });
    let (mut ws, _) = connect(server.local_addr()).await;
    // Just under the limit is fine.
    let near = json!({"event": "ping", "pad": "x".repeat(900)}).to_string();
    assert!(near.len() < 1024);
    ws.send(Message::text(near)).await.unwrap();
    assert_eq!(recv_json(&mut ws).await, json!({"event": "pong"}));

    ws.send(Message::text("x".repeat(2000))).await.unwrap();
    let close = recv_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    assert_eq!(u16::from(close.code), 1009);
    eventually("the connection is uncounted", || server.hub().connection_count() == 0).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn text_frame_with_invalid_utf8_closes_with_1007() {
    let server = start(config());
    let (mut ws, _) = connect(server.local_addr()).await;
    // A raw frame: tungstenite sends Message::Frame as given, so the payload need not be UTF-8.
    let frame = Frame::message(vec![0xff, 0xfe], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.unwrap();
    let close = recv_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 1007, "{close:?}");
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_text_frame_with_invalid_utf8_closes_with_1007() {
    let server = start(config());
    let mut raw = RawClient::connect(server.local_addr()).await;
    let connected = raw.read_frame().await;
    assert_eq!(connected.opcode, 0x1);
    raw.send(0x1, &[0xff, 0xfe]).await;
    let (code, reason) = raw.read_frame().await.close_code();
    assert_eq!(code, 1007, "{reason}");
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn stop_closes_every_client_with_1001() {
    let server = start(config());
    let addr = server.local_addr();
    let (mut a, _) = connect(addr).await;
    let (mut b, _) = connect(addr).await;
    subscribe(&mut b, "news").await;
    assert_eq!(server.hub().connection_count(), 2);
    let hub = Arc::clone(server.hub());

    let stopping = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.stop();
    });
    // Read while stop() runs: it waits for each client's closing handshake.
    let (close_a, close_b) = tokio::join!(recv_close(&mut a), recv_close(&mut b));
    for close in [close_a, close_b] {
        assert_eq!(close.code, CloseCode::Away, "{close:?}");
        assert_eq!(close.reason.as_str(), "going away");
    }
    timeout(WAIT, stopping).await.expect("stop() returns in time").expect("stop() does not panic");
    assert_eq!(hub.connection_count(), 0);
    assert!(hub.channels().is_empty());
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed after stop()");
}

// ---------------------------------------------------------------------------------------------------------------
// Heartbeat and idle timeout
// ---------------------------------------------------------------------------------------------------------------

fn heartbeat_config() -> ServerConfig {
    ServerConfig {
        heartbeat_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        ..config()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_answers_pings_stays_open_past_the_idle_timeout() {
    let server = start(heartbeat_config());
    let (mut ws, _) = connect(server.local_addr()).await;
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    let mut pings = 0;
    // Polling the client is what makes tokio-tungstenite send its automatic pongs.
    while let Ok(message) = tokio::time::timeout_at(until, ws.next()).await {
        match message {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(pings >= 2, "the server pings a silent client (got {pings} pings in 1.2 s)");
    send_json(&mut ws, json!({"event": "ping"})).await;
    assert_eq!(recv_json(&mut ws).await, json!({"event": "pong"}));
    assert_eq!(server.hub().connection_count(), 1);
    drop(ws);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_is_closed_with_4201() {
    let server = start(heartbeat_config());
    let mut raw = RawClient::connect(server.local_addr()).await;
    let started = Instant::now();
    let connected = raw.read_frame().await;
    assert_eq!(connected.opcode, 0x1);
    let mut pings = 0;
    let close = loop {
        let frame = raw.read_frame().await;
        match frame.opcode {
            0x9 => pings += 1,
            0x8 => break frame,
            _ => panic!("unexpected frame {frame:?}"),
        }
    };
    let elapsed = started.elapsed();
    let (code, reason) = close.close_code();
    assert_eq!((code, reason.as_str()), (4201, "idle timeout"));
    assert!(pings >= 1, "a ping came before the idle close");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}, idle_timeout is 300 ms"
    );
    eventually("the connection is uncounted", || server.hub().connection_count() == 0).await;
    stop(server).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Slow consumer
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_consumer_is_dropped_without_delaying_the_others() {
    const FRAMES: usize = 5000;
    /// Publications the good client may have outstanding: ~36 KB, well inside its 64 KiB queue.
    const WINDOW: usize = 32;
    let server = start(ServerConfig { send_queue_bytes: 64 * 1024, ..config() });
    let addr = server.local_addr();

    // The slow client: a small receive buffer, subscribes, then never reads again.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.expect("TCP connect");
    let mut slow = RawClient::handshake(stream, addr).await;
    slow.send(0x1, json!({"event": "subscribe", "data": {"channel": "feed"}}).to_string().as_bytes()).await;
    eventually("the slow client is subscribed", || subscribers(&server, "feed") == 1).await;

    let (mut good, _) = connect(addr).await;
    subscribe(&mut good, "feed").await;
    assert_eq!(subscribers(&server, "feed"), 2);

    let received = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let received = Arc::clone(&received);
        async move {
            for seq in 0..FRAMES {
                let frame = recv_json(&mut good).await;
                assert_eq!(frame["event"], "message", "{frame}");
                assert_eq!(frame["data"]["seq"], seq, "publications arrive in order");
                received.store(seq + 1, Ordering::Release);
            }
            good
        }
    });

    let pad = "p".repeat(1000);
    let mut queued_for_both = 0;
    for seq in 0..FRAMES {
        // Pace to the good client only: the slow one gets no say in how fast the server publishes.
        let deadline = Instant::now() + WAIT;
        while seq - received.load(Ordering::Acquire) >= WINDOW {
            assert!(Instant::now() < deadline, "the good client stalled at {seq}");
            tokio::task::yield_now().await;
        }
        let payload = json!({"seq": seq, "pad": pad}).to_string();
        let frame = encode_publication("feed", &payload, Origin::Server).unwrap();
        let queued = server.hub().publish("feed", &frame, None, false);
        assert!(queued >= 1, "publication {seq} reached nobody");
        if queued == 2 {
            queued_for_both += 1;
        }
    }
    let mut good = timeout(WAIT, reader)
        .await
        .expect("the good client receives every publication in time")
        .expect("the good client saw every publication in order");
    assert!(queued_for_both < FRAMES, "the slow client was never marked slow: every publication was queued for it");

    eventually("the slow client leaves the channel", || subscribers(&server, "feed") == 1).await;
    eventually("the slow connection is uncounted", || server.hub().connection_count() == 1).await;
    // The good client is still fully usable.
    send_json(&mut good, json!({"event": "ping"})).await;
    assert_eq!(recv_json(&mut good).await, json!({"event": "pong"}));
    drop(slow);
    drop(good);
    stop(server).await;
}
