//! Stage: auth. Decides, from the recorded upgrade request, whether a handshake may proceed and who the user is.
//!
//! Three checks in order: the `Origin` rule (403), then identity (401): an application `authenticate` hook when
//! one is registered, else built-in JWT verification when a key is configured, else open mode (no user). JWTs are
//! verified here in Rust (jsonwebtoken), so the common case never waits for the GIL. Channel authorization for
//! `private-`/`presence-` subscriptions lives here too; the hooks themselves are behind the [`Hooks`] trait so this
//! module stays free of Python.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use globset::GlobSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::handshake::ConnectRequest;

/// An authenticated user. Ids are strings everywhere (the wire, presence, stats).
#[derive(Debug)]
pub struct User {
    pub id: Arc<str>,
    /// For JWT users every claim; for hook users the `info` the hook returned.
    pub info: Map<String, Value>,
    /// True when `info` holds JWT claims, whose registered names are not shown to other presence members.
    pub from_jwt: bool,
}

/// Registered JWT claims (RFC 7519), left out of a member's public presence info.
const REGISTERED_CLAIMS: [&str; 7] = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"];

impl User {
    /// The info other presence members see when authorization returned none of its own.
    pub fn presence_info(&self) -> Map<String, Value> {
        let mut info = self.info.clone();
        if self.from_jwt {
            info.retain(|key, _| !REGISTERED_CLAIMS.contains(&key.as_str()));
        }
        info
    }
}

/// What an authorize decision allows.
#[derive(Debug, PartialEq)]
pub enum Authorization {
    Denied,
    Allowed,
    /// Allowed, with the presence member info to show other members.
    AllowedWithInfo(Map<String, Value>),
}

/// A hook's outcome: its answer, or an error message (the hook raised or misbehaved; it has been logged).
pub type HookResult<T> = Result<T, String>;
pub type HookFuture<T> = Pin<Box<dyn Future<Output = HookResult<T>> + Send>>;

/// Application callbacks (Python ones, through the bridge). They never run on the threads that move frames.
pub trait Hooks: Send + Sync {
    fn has_authenticate(&self) -> bool;
    fn has_authorize(&self) -> bool;
    /// True when `connected`/`disconnected` are wanted.
    fn has_lifecycle(&self) -> bool;
    /// A connection opened (fire and forget: nothing waits for it).
    fn connected(&self, socket_id: &str, user: Option<&Arc<User>>, request: &ConnectRequest) -> HookFuture<()>;
    /// A connection ended with this close code (sent or received; 1006 when the socket just dropped).
    fn disconnected(&self, socket_id: &str, code: u16) -> HookFuture<()>;
    /// `Ok(None)` refuses the connection.
    fn authenticate(&self, request: &ConnectRequest) -> HookFuture<Option<User>>;
    fn authorize(&self, user: &Arc<User>, channel: &str) -> HookFuture<Authorization>;
}

/// A refused handshake: HTTP status and a plain-English message for the JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct HandshakeRefusal {
    pub status: u16,
    pub message: String,
}

impl HandshakeRefusal {
    fn unauthorized(message: impl Into<String>) -> Self {
        HandshakeRefusal { status: 401, message: message.into() }
    }
}

/// Which browser origins may open connections.
#[derive(Clone, Debug, Default)]
pub struct OriginRule {
    /// None: same origin only (the `Origin` host must be the `Host` header). Some: glob patterns.
    patterns: Option<GlobSet>,
}

impl OriginRule {
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, String> {
        crate::config::glob_set(patterns, "origin").map(|patterns| OriginRule { patterns })
    }

    /// Clients that send no `Origin` (non-browser clients) are always allowed: the check protects browsers'
    /// users from cross-site WebSocket hijacking, which needs a browser and therefore an `Origin`.
    pub fn check(&self, request: &ConnectRequest) -> Result<(), HandshakeRefusal> {
        let Some(origin) = request.header("origin") else { return Ok(()) };
        let allowed = match &self.patterns {
            Some(set) => set.is_match(origin),
            None => {
                let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
                request.header("host").is_some_and(|host| host.eq_ignore_ascii_case(origin_host))
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(HandshakeRefusal {
                status: 403,
                message: format!(
                    "origin {origin:?} is not allowed to connect; add it to the allowed_origins setting \
                     (glob patterns such as https://*.example.com, or * for any)"
                ),
            })
        }
    }
}

/// Built-in JWT verification with PyJWT's semantics: an explicit algorithm list, one key per family (so an HMAC
/// token can never be checked against an RSA public key), `exp`/`nbf` checked with leeway when present, and
/// `aud`/`iss` required when configured.
pub struct JwtVerifier {
    algorithms: Vec<Algorithm>,
    secret: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    ed: Option<DecodingKey>,
    validation: Validation,
    user_claim: String,
}

/// JWT settings as resolved by Python.
#[derive(Clone, Debug, Default)]
pub struct JwtSettings {
    pub secret: Option<String>,
    pub public_key_pem: Option<String>,
    pub algorithms: Vec<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway_seconds: u64,
    pub user_claim: String,
}

impl JwtVerifier {
    /// None when no key is configured. Algorithms whose key family is not configured are left out (the automatic
    /// list for a public key names both RS256 and ES256); it is an error when none is left.
    pub fn new(settings: &JwtSettings) -> Result<Option<Self>, String> {
        if settings.secret.is_none() && settings.public_key_pem.is_none() {
            return Ok(None);
        }
        let secret = settings.secret.as_ref().map(|s| DecodingKey::from_secret(s.as_bytes()));
        let pem = settings.public_key_pem.as_deref().map(str::as_bytes);
        let rsa = pem.and_then(|p| DecodingKey::from_rsa_pem(p).ok());
        let ec = pem.and_then(|p| DecodingKey::from_ec_pem(p).ok());
        let ed = pem.and_then(|p| DecodingKey::from_ed_pem(p).ok());
        if pem.is_some() && rsa.is_none() && ec.is_none() && ed.is_none() {
            return Err("jwt_public_key is not an RSA, EC or Ed25519 public key in PEM format".into());
        }
        let mut algorithms = Vec::new();
        for name in &settings.algorithms {
            let algorithm: Algorithm = name.parse().map_err(|_| format!("jwt_algorithms: {name} is not supported"))?;
            let has_key = match algorithm.family() {
                jsonwebtoken::AlgorithmFamily::Hmac => secret.is_some(),
                jsonwebtoken::AlgorithmFamily::Rsa => rsa.is_some(),
                jsonwebtoken::AlgorithmFamily::Ec => ec.is_some(),
                jsonwebtoken::AlgorithmFamily::Ed => ed.is_some(),
            };
            if has_key {
                algorithms.push(algorithm);
            }
        }
        if algorithms.is_empty() {
            return Err(format!(
                "jwt_algorithms {:?}: none of them matches the configured key (jwt_secret for HS*, an RSA public key \
                 for RS*/PS*, an EC key for ES*, an Ed25519 key for EdDSA)",
                settings.algorithms
            ));
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.required_spec_claims = HashSet::new();
        validation.leeway = settings.leeway_seconds;
        validation.validate_nbf = true;
        if let Some(audience) = &settings.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Some(JwtVerifier { algorithms, secret, rsa, ec, ed, validation, user_claim: settings.user_claim.clone() }))
    }

    /// The algorithms actually accepted, for the start-up line.
    pub fn algorithm_names(&self) -> Vec<String> {
        self.algorithms.iter().map(|a| format!("{a:?}")).collect()
    }

    pub fn verify(&self, token: &str) -> Result<User, HandshakeRefusal> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| match unsupported_algorithm(token) {
            Some(alg) => HandshakeRefusal::unauthorized(format!("the token's algorithm {alg:?} is not accepted")),
            None => HandshakeRefusal::unauthorized("the token is not a well-formed JWT"),
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err(HandshakeRefusal::unauthorized(format!(
                "the token's algorithm {:?} is not accepted (jwt_algorithms)",
                header.alg
            )));
        }
        let key = match header.alg.family() {
            jsonwebtoken::AlgorithmFamily::Hmac => self.secret.as_ref(),
            jsonwebtoken::AlgorithmFamily::Rsa => self.rsa.as_ref(),
            jsonwebtoken::AlgorithmFamily::Ec => self.ec.as_ref(),
            jsonwebtoken::AlgorithmFamily::Ed => self.ed.as_ref(),
        }
        .ok_or_else(|| HandshakeRefusal::unauthorized("no key is configured for the token's algorithm"))?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
            .map_err(|error| {
                HandshakeRefusal::unauthorized(match error.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
                    ErrorKind::InvalidAudience => "the token is for another audience (aud)".to_owned(),
                    ErrorKind::InvalidIssuer => "the token is from another issuer (iss)".to_owned(),
                    ErrorKind::InvalidSignature => "the token's signature is not valid".to_owned(),
                    ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim:?} claim"),
                    _ => "the token is not valid".to_owned(),
                })
            })?
            .claims;
        let id = match claims.get(&self.user_claim) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            Some(Value::Number(id)) => id.to_string(),
            _ => {
                return Err(HandshakeRefusal::unauthorized(format!(
                    "the token has no usable {:?} claim to identify the user (jwt_user_claim)",
                    self.user_claim
                )));
            }
        };
        Ok(User { id: id.into(), info: claims, from_jwt: true })
    }
}

/// The `alg` of a token whose header jsonwebtoken rejects, such as `none`, for a precise refusal message.
fn unsupported_algorithm(token: &str) -> Option<String> {
    use base64::Engine;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').next()?).ok()?;
    let header: Value = serde_json::from_slice(&header).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

/// Everything the handshake needs to authenticate.
#[derive(Clone, Default)]
pub struct AuthConfig {
    pub origins: OriginRule,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub hooks: Option<Arc<dyn Hooks>>,
    pub hook_timeout: Duration,
}

impl AuthConfig {
    /// True when connections must carry an identity (a JWT key or an authenticate hook is configured).
    pub fn required(&self) -> bool {
        self.jwt.is_some() || self.hooks.as_ref().is_some_and(|h| h.has_authenticate())
    }

    /// Decide identity for an upgrade request: `Ok(None)` is open mode.
    pub async fn authenticate(&self, request: &ConnectRequest) -> Result<Option<Arc<User>>, HandshakeRefusal> {
        if let Some(hooks) = self.hooks.as_ref().filter(|h| h.has_authenticate()) {
            return match tokio::time::timeout(self.hook_timeout, hooks.authenticate(request)).await {
                Ok(Ok(Some(user))) => Ok(Some(Arc::new(user))),
                Ok(Ok(None)) => Err(HandshakeRefusal::unauthorized("the authenticate hook refused this connection")),
                Ok(Err(_)) => {
                    Err(HandshakeRefusal::unauthorized("authentication failed (the authenticate hook raised)"))
                }
                Err(_) => Err(HandshakeRefusal::unauthorized("authentication timed out (hook_timeout)")),
            };
        }
        let Some(jwt) = &self.jwt else { return Ok(None) };
        let token = token_of(request).ok_or_else(|| {
            HandshakeRefusal::unauthorized(
                "a token is required: connect with ?token=<JWT> or an Authorization: Bearer <JWT> header",
            )
        })?;
        jwt.verify(&token).map(|user| Some(Arc::new(user)))
    }

    /// The decision for a `private-`/`presence-` subscription when it needs no hook: without an authorize hook
    /// the rule is deny-by-default: `private-user.<id>` only for user `<id>`, other `private-` channels refused,
    /// `presence-` for any user. None means "ask the hook" ([`AuthConfig::authorize`]).
    pub fn authorize_now(&self, user_id: &str, channel: &str) -> Option<Authorization> {
        match &self.hooks {
            Some(hooks) if hooks.has_authorize() => None,
            _ => Some(default_authorization(user_id, channel)),
        }
    }

    /// Ask the authorize hook, bounded by `hook_timeout`.
    pub async fn authorize(&self, user: &Arc<User>, channel: &str) -> Result<Authorization, String> {
        let Some(hooks) = &self.hooks else { return Ok(default_authorization(&user.id, channel)) };
        match tokio::time::timeout(self.hook_timeout, hooks.authorize(user, channel)).await {
            Ok(result) => result,
            Err(_) => Err("the authorize hook timed out (hook_timeout)".into()),
        }
    }
}

fn default_authorization(user_id: &str, channel: &str) -> Authorization {
    if channel.starts_with("presence-") {
        return Authorization::Allowed;
    }
    match channel.strip_prefix("private-user.") {
        Some(owner) if owner == user_id => Authorization::Allowed,
        _ => Authorization::Denied,
    }
}

/// The token from `?token=` (the last one, as `Request.query` sees it) or `Authorization: Bearer`.
fn token_of(request: &ConnectRequest) -> Option<String> {
    let from_query = request.query.rsplit('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "token" && !value.is_empty()).then(|| percent_decode(value))
    });
    from_query.or_else(|| {
        let header = request.header("authorization")?.trim();
        let (scheme, token) = header.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    })
}

/// Decode `%XX` and `+` in a query value (JWTs are URL-safe, but clients may still encode them).
pub fn percent_decode(value: &str) -> String {
    fn hex(byte: u8) -> Option<u8> {
        (byte as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])).map(|(high, low)| high * 16 + low),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], query: &str) -> ConnectRequest {
        ConnectRequest {
            method: "GET".into(),
            path: "/".into(),
            query: query.into(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            remote_addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn same_origin_by_default_and_no_origin_is_allowed() {
        let rule = OriginRule::default();
        assert!(rule.check(&request(&[("host", "ws.example.com")], "")).is_ok());
        assert!(rule.check(&request(&[("host", "ws.example.com"), ("origin", "https://ws.example.com")], "")).is_ok());
        let refused = rule.check(&request(&[("host", "ws.example.com"), ("origin", "https://evil.com")], ""));
        let refusal = refused.unwrap_err();
        assert_eq!(refusal.status, 403);
        assert!(refusal.message.contains("allowed_origins"));
    }

    #[test]
    fn origin_patterns() {
        let rule = OriginRule::new(&["https://*.example.com"]).unwrap();
        assert!(rule.check(&request(&[("origin", "https://app.example.com")], "")).is_ok());
        assert!(rule.check(&request(&[("origin", "http://app.example.com")], "")).is_err());
        assert!(OriginRule::new(&["*"]).unwrap().check(&request(&[("origin", "null")], "")).is_ok());
    }

    #[test]
    fn token_from_query_or_bearer_header() {
        assert_eq!(token_of(&request(&[], "a=1&token=abc.def")), Some("abc.def".into()));
        assert_eq!(token_of(&request(&[], "token=first&token=last")), Some("last".into()));
        assert_eq!(token_of(&request(&[("authorization", "Bearer xyz")], "")), Some("xyz".into()));
        assert_eq!(token_of(&request(&[("authorization", "Basic xyz")], "")), None);
        assert_eq!(token_of(&request(&[], "token=")), None);
        assert_eq!(percent_decode("a%2Eb+c%zz%4"), "a.b c%zz%4");
    }

    #[test]
    fn default_authorization_is_deny_by_default() {
        assert_eq!(default_authorization("123", "private-user.123"), Authorization::Allowed);
        assert_eq!(default_authorization("123", "private-user.1234"), Authorization::Denied);
        assert_eq!(default_authorization("123", "private-orders"), Authorization::Denied);
        assert_eq!(default_authorization("123", "presence-room"), Authorization::Allowed);
    }

    fn verifier(secret: &str, algorithms: &[&str]) -> JwtVerifier {
        JwtVerifier::new(&JwtSettings {
            secret: Some(secret.into()),
            algorithms: algorithms.iter().map(|a| (*a).to_owned()).collect(),
            user_claim: "sub".into(),
            ..JwtSettings::default()
        })
        .unwrap()
        .unwrap()
    }

    fn sign(secret: &str, claims: &Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn hs256_token_gives_the_user_and_claims() {
        let v = verifier("s3cret", &["HS256"]);
        let user = v.verify(&sign("s3cret", &serde_json::json!({"sub": 123, "name": "Ana"}))).unwrap();
        assert_eq!(&*user.id, "123");
        assert_eq!(user.presence_info(), serde_json::json!({"name": "Ana"}).as_object().unwrap().clone());
        assert!(v.verify(&sign("other", &serde_json::json!({"sub": "1"}))).is_err());
        let expired = sign("s3cret", &serde_json::json!({"sub": "1", "exp": 1}));
        assert_eq!(v.verify(&expired).unwrap_err().message, "the token has expired");
        assert!(v.verify(&sign("s3cret", &serde_json::json!({"name": "no sub"}))).is_err());
    }

    #[test]
    fn alg_none_and_unlisted_algorithms_are_refused() {
        let v = verifier("s3cret", &["HS256"]);
        // {"alg":"none"} . {"sub":"1"} . (no signature)
        assert!(v.verify("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.").is_err());
        let hs512 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "1"}),
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(v.verify(&hs512).unwrap_err().message.contains("not accepted"));
    }

    #[test]
    fn algorithms_without_a_key_are_dropped_and_none_left_is_an_error() {
        let settings = JwtSettings {
            secret: Some("s".into()),
            algorithms: vec!["RS256".into()],
            user_claim: "sub".into(),
            ..JwtSettings::default()
        };
        assert!(JwtVerifier::new(&settings).is_err());
    }
}
