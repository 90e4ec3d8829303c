//! Plain HTTP on the WebSocket port: refusals of the handshake and the small operational endpoints.
//!
//! Every answer is one JSON response followed by closing the connection (no keep-alive: these endpoints are
//! polled by monitors and scripts, not browsers loading pages). The operations issue adds /stats, /metrics,
//! /api/publish and the demo page here.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::handshake::ConnectRequest;

/// A status with a JSON body `{"error": message}` (or a custom body for successes).
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn error(status: u16, message: &str) -> Self {
        Response { status, body: serde_json::json!({"error": message}).to_string() }
    }

    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Response { status, body: body.to_string() }
    }

    /// Write the response and close; `head_only` (a HEAD request) sends the headers without the body.
    pub async fn write(&self, stream: &mut TcpStream, head_only: bool) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            reason(self.status),
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
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Answer a request that is not a WebSocket upgrade.
pub fn respond(request: &ConnectRequest) -> Response {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET" | "HEAD", "/healthz") => Response::json(200, &serde_json::json!({"status": "ok"})),
        (_, "/" | "/ws") => Response::error(
            426,
            "this is a fastws WebSocket endpoint: connect with a WebSocket client (ws://host:port/)",
        ),
        _ => Response::error(404, "not found"),
    }
}
