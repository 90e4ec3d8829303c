//! Plain HTTP on the WebSocket port: refusals of the handshake and the operational endpoints.
//!
//! `/healthz` is always open. `/stats`, `/metrics`, `/dashboard`, `POST /api/publish` and `GET /api/presence`
//! answer loopback clients only, unless an `api_key` is configured; then the key is required from anywhere.
//! `/stats`, `/api/presence` and `/api/publish` act on the whole cluster when the node has a Redis broker;
//! `/metrics` is this node's. A request that came through
//! a proxy (`X-Forwarded-For`/`Forwarded`) is not treated as loopback, since the proxy's address says nothing of
//! the client's. `/` serves the demo chat page when `demo` is on. Every answer closes the connection (no
//! keep-alive: these endpoints are polled by monitors and scripts, not used to load sites).

use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::broker::ClusterStats;
use crate::config::ServerConfig;
use crate::handshake::ConnectRequest;
use crate::hub::Hub;
use crate::protocol::{self, Origin};

/// The demo chat page and the live dashboard: plain HTML/JS shipped inside the extension, no build step.
const DEMO_PAGE: &str = include_str!("../python/fastws/static/demo.html");
const DASHBOARD_PAGE: &str = include_str!("../python/fastws/static/dashboard.html");

/// Largest `POST /api/publish` body accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn error(status: u16, message: &str) -> Self {
        Response::json(status, &json!({"error": message}))
    }

    pub fn json(status: u16, body: &Value) -> Self {
        Response { status, content_type: "application/json", body: body.to_string() }
    }

    fn html(page: &str) -> Self {
        Response { status: 200, content_type: "text/html; charset=utf-8", body: page.to_owned() }
    }

    /// Write the response and close; `head_only` (a HEAD request) sends the headers without the body.
    pub async fn write(&self, stream: &mut TcpStream, head_only: bool) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             Connection: close\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(self.body.as_bytes()).await?;
        }
        stream.shutdown().await
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Answer a request that is not a WebSocket upgrade. `leftover` holds body bytes read with the head.
pub async fn serve(
    stream: &mut TcpStream,
    request: &ConnectRequest,
    leftover: Vec<u8>,
    hub: &Hub,
    config: &ServerConfig,
) {
    let response = route(stream, request, leftover, hub, config).await;
    let _ = response.write(stream, request.method == "HEAD").await;
}

async fn route(
    stream: &mut TcpStream,
    request: &ConnectRequest,
    leftover: Vec<u8>,
    hub: &Hub,
    config: &ServerConfig,
) -> Response {
    let method = request.method.as_str();
    let get = matches!(method, "GET" | "HEAD");
    match request.path.as_str() {
        "/healthz" if get => Response::json(200, &json!({"status": "ok"})),
        "/" if get && config.demo => Response::html(DEMO_PAGE),
        "/" | "/ws" => Response::error(
            426,
            "this is a fastws WebSocket endpoint: connect with a WebSocket client (ws://host:port/)",
        ),
        "/stats" | "/metrics" | "/dashboard" | "/api/publish" | "/api/presence" => {
            if let Err(refusal) = ops_access(request, config) {
                return refusal;
            }
            match (request.path.as_str(), get) {
                ("/stats", true) => Response::json(200, &stats_json(hub).await),
                ("/api/presence", true) => presence(request, hub).await,
                ("/metrics", true) => Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: hub.stats.render_prometheus(hub.connection_count(), hub.channels().len()),
                },
                ("/dashboard", true) => Response::html(DASHBOARD_PAGE),
                ("/api/publish", _) if method == "POST" => publish(stream, request, leftover, hub, config).await,
                _ => Response::error(405, "method not allowed"),
            }
        }
        _ => Response::error(404, "not found"),
    }
}

/// The `/stats` document: the cluster's connections and channels (this node's alone when the broker can't
/// answer, with `broker_error` saying why), the nodes, and this node's message counters and uptime.
pub async fn stats_json(hub: &Hub) -> Value {
    let broker = hub.broker();
    let (cluster, error) = match broker.stats(hub).await {
        Ok(cluster) => (cluster, None),
        Err(error) => {
            let channels = hub.channels();
            let local = ClusterStats { connections: hub.connection_count(), channels, nodes: Vec::new() };
            (local, Some(error.to_string()))
        }
    };
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .map(|node| json!({"id": node.id, "address": node.address, "connections": node.connections}))
        .collect();
    let channels: Vec<Value> = cluster
        .channels
        .into_iter()
        .map(|info| {
            let mut channel = json!({"name": info.name, "type": info.kind.as_str(), "subscribers": info.subscribers});
            if let Some(members) = info.members {
                channel["members"] = json!(members);
            }
            channel
        })
        .collect();
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    let mut document = json!({
        "connections": cluster.connections,
        "channels": channels,
        "messages_in": load(&hub.stats.messages_in),
        "messages_out": load(&hub.stats.messages_out),
        "uptime_s": (hub.stats.uptime().as_secs_f64() * 10.0).round() / 10.0,
        "broker": broker.name(),
        "node": hub.node_id().to_string(),
        "nodes": nodes,
    });
    if let Some(error) = error {
        document["broker_error"] = json!(error);
    }
    document
}

/// `GET /api/presence?channel=NAME` → `{"channel", "members": [{"id","info","connected_at"}]}`, cluster-wide.
async fn presence(request: &ConnectRequest, hub: &Hub) -> Response {
    let Some(channel) = query_value(&request.query, "channel") else {
        return Response::error(400, "give the channel: /api/presence?channel=NAME");
    };
    if let Err(refusal) = protocol::validate_channel_name(&channel) {
        return Response::error(400, &refusal.message);
    }
    match hub.broker().presence(hub, &channel).await {
        Ok(members) => Response::json(200, &json!({"channel": channel, "members": members})),
        Err(error) => Response::error(503, &error.to_string()),
    }
}

/// The access rule of the operational endpoints.
fn ops_access(request: &ConnectRequest, config: &ServerConfig) -> Result<(), Response> {
    match &config.api_key {
        Some(key) => {
            let bearer = request
                .header("authorization")
                .and_then(|value| value.trim().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_owned());
            // A browser cannot set a header when it loads /dashboard, so a GET (only) may carry ?api_key= instead.
            let from_query = (request.method == "GET" || request.method == "HEAD")
                .then(|| query_value(&request.query, "api_key"))
                .flatten();
            let given = bearer.or(from_query);
            if given.is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes())) {
                Ok(())
            } else {
                Err(Response::error(401, "a valid API key is required: send Authorization: Bearer <api_key>"))
            }
        }
        None => {
            let proxied = request.header("x-forwarded-for").is_some() || request.header("forwarded").is_some();
            // A browser on this machine reaches loopback too: a page of another site posting here (request
            // forgery) sends its own Origin, and a DNS-rebinding page names its own host in Host. Local tools
            // (curl, fastws push, Prometheus) send neither.
            let host_is_local = request.header("host").is_none_or(is_loopback_host);
            let foreign_origin = request.header("origin").is_some_and(|origin| {
                let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
                request.header("host").is_none_or(|host| !host.eq_ignore_ascii_case(origin_host))
            });
            if request.remote_addr.ip().is_loopback() && !proxied && host_is_local && !foreign_origin {
                Ok(())
            } else {
                Err(Response::error(
                    403,
                    "this endpoint answers only local clients; configure api_key to reach it from elsewhere",
                ))
            }
        }
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| crate::auth::percent_decode(value))
    })
}

/// Compare secrets without an early exit, so response timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct PublishRequest<'a> {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    exclude: Option<String>,
}

/// `POST /api/publish`: `{"channel", "payload", "exclude"?}` or `{"user", "payload"}` → `{"delivered": N}`.
async fn publish(
    stream: &mut TcpStream,
    request: &ConnectRequest,
    mut body: Vec<u8>,
    hub: &Hub,
    config: &ServerConfig,
) -> Response {
    let Some(length) = request.header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) else {
        return Response::error(411, "a Content-Length header is required");
    };
    if length > MAX_BODY_BYTES {
        return Response::error(413, "the body is larger than 1 MiB");
    }
    let deadline = if config.handshake_timeout.is_zero() { Duration::from_secs(10) } else { config.handshake_timeout };
    while body.len() < length {
        let mut chunk = vec![0; (length - body.len()).min(64 * 1024)];
        match timeout(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Response::error(400, "the body ended before Content-Length bytes"),
            Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
            Err(_) => return Response::error(408, "the body did not arrive in time"),
        }
    }
    body.truncate(length);
    let parsed: PublishRequest<'_> = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(e) => return Response::error(400, &format!("the body must be a JSON object: {e}")),
    };
    let Some(payload) = parsed.payload else {
        return Response::error(400, "\"payload\" is required");
    };
    let delivered = match (parsed.channel, parsed.user) {
        (Some(channel), None) => {
            if let Err(refusal) = protocol::validate_channel_name(&channel) {
                return Response::error(400, &refusal.message);
            }
            let Ok(frame) = protocol::encode_publication(&channel, payload.get(), Origin::Server) else {
                return Response::error(400, "\"payload\" must be JSON");
            };
            hub.broadcast(&channel, &frame, parsed.exclude.as_deref(), false)
        }
        (None, Some(user)) => {
            let user_id = match user {
                Value::String(id) if !id.is_empty() => id,
                Value::Number(id) => id.to_string(),
                _ => return Response::error(400, "\"user\" must be a non-empty string or a number"),
            };
            let Ok(frame) = protocol::encode_user_push(payload.get()) else {
                return Response::error(400, "\"payload\" must be JSON");
            };
            hub.broadcast_to_user(&user_id, &frame)
        }
        _ => return Response::error(400, "give exactly one of \"channel\" and \"user\""),
    };
    Response::json(200, &json!({"delivered": delivered}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "localhost:9501", "127.0.0.1", "127.0.0.2:80", "[::1]:9501", "[::1]"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["evil.example", "evil.example:9501", "10.0.0.1:9501", "localhost.evil.example"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value("a=1&api_key=k%2By", "api_key"), Some("k+y".into()));
        assert_eq!(query_value("a=1", "api_key"), None);
    }
}
