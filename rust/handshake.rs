//! Stage: handshake. Reads one HTTP request head from a new TCP connection and either completes the WebSocket
//! upgrade or hands the request to the plain-HTTP endpoints on the same port.
//!
//! The head is parsed with httparse (hyper's parser) rather than through tungstenite's `accept_hdr_async`, so that
//! every refusal (400, 404, 426, 431, 503, and the auth issue's 401/403) is an ordinary HTTP response with a JSON
//! body, and so the request (path, query, headers, peer address) is recorded for the auth step without running any
//! Python inside a synchronous callback.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head accepted (request line + headers); larger gets 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers accepted; more gets 431.
const MAX_HEADERS: usize = 48;
/// Paths on which the WebSocket upgrade is accepted (`/ws` for proxies that route by path).
const WEBSOCKET_PATHS: [&str; 2] = ["/", "/ws"];

/// The HTTP request that opened a connection, as the auth step and the HTTP endpoints see it.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, without the `?`.
    pub query: String,
    /// Header names lower-cased, values as sent (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub remote_addr: SocketAddr,
}

impl ConnectRequest {
    /// The first value of a header, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// True when the client asks for a WebSocket upgrade (whatever the path).
    pub fn wants_websocket(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
    }
}

/// What to do with a request once its head is read.
pub enum Route {
    /// A valid upgrade: send 101 with this `Sec-WebSocket-Accept` value.
    Upgrade { accept_key: String },
    /// A plain HTTP request, or an upgrade that must be refused.
    Http,
}

/// Why reading the head failed.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed or the socket failed before a full head arrived: nothing to answer.
    Disconnected,
    /// Not HTTP at all.
    BadRequest(&'static str),
    /// Head larger than [`MAX_HEAD_BYTES`] or with too many headers.
    TooLarge,
}

/// Read the request head. Returns it with any bytes that followed it (a client may send its first frame early).
pub async fn read_head(
    stream: &mut TcpStream,
    remote_addr: SocketAddr,
) -> Result<(ConnectRequest, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        // Read into the Vec's spare capacity: no buffer on the future's stack, which would stay part of every
        // connection task's size.
        buf.reserve(1024);
        let n = stream.read_buf(&mut buf).await.map_err(|_| HeadError::Disconnected)?;
        if n == 0 {
            return Err(HeadError::Disconnected);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) if head_len > MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Complete(head_len)) => {
                let target = request.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let connect = ConnectRequest {
                    method: request.method.unwrap_or("GET").to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect(),
                    remote_addr,
                };
                return Ok((connect, buf.split_off(head_len)));
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::BadRequest("the request is not valid HTTP/1.1")),
        }
    }
}

/// Decide between upgrade and plain HTTP; a malformed upgrade on a WebSocket path is an error message for a 400.
pub fn route(request: &ConnectRequest) -> Result<Route, &'static str> {
    if !request.wants_websocket() || !WEBSOCKET_PATHS.contains(&request.path.as_str()) {
        return Ok(Route::Http);
    }
    if request.method != "GET" {
        return Err("a WebSocket upgrade must be a GET request");
    }
    if !request.header_has_token("connection", "upgrade") {
        return Err("a WebSocket upgrade needs the header Connection: Upgrade");
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err("only WebSocket version 13 (Sec-WebSocket-Version: 13) is supported");
    }
    let key = request.header("sec-websocket-key").map(str::trim).unwrap_or_default();
    if key.len() != 24 {
        return Err("the Sec-WebSocket-Key header is missing or malformed");
    }
    Ok(Route::Upgrade { accept_key: tungstenite::handshake::derive_accept_key(key.as_bytes()) })
}

/// Complete the upgrade.
pub async fn write_switching_protocols(stream: &mut TcpStream, accept_key: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept_key}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> ConnectRequest {
        ConnectRequest {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            remote_addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    const UPGRADE: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn upgrade_on_root_and_ws_computes_the_rfc_accept_key() {
        for path in ["/", "/ws"] {
            match route(&request("GET", path, &UPGRADE)) {
                Ok(Route::Upgrade { accept_key }) => assert_eq!(accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                _ => panic!("expected an upgrade on {path}"),
            }
        }
    }

    #[test]
    fn other_paths_and_plain_requests_are_http() {
        assert!(matches!(route(&request("GET", "/other", &UPGRADE)), Ok(Route::Http)));
        assert!(matches!(route(&request("GET", "/", &[])), Ok(Route::Http)));
    }

    #[test]
    fn malformed_upgrades_are_refused_with_a_reason() {
        assert!(route(&request("POST", "/", &UPGRADE)).is_err());
        let mut old_version = UPGRADE;
        old_version[2] = ("sec-websocket-version", "8");
        assert!(route(&request("GET", "/", &old_version)).is_err());
        assert!(route(&request("GET", "/", &UPGRADE[..3])).is_err());
    }
}
