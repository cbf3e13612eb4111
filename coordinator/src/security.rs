//! Who may talk to the coordinator: a bearer token on every RPC and every mutating HTTP call,
//! and TLS (with optional client certificates) on the port that serves both.
//!
//! Reads (`GET /status`, `/metrics`, the status page) and gRPC health checks stay open, so
//! Prometheus and Kubernetes probes need no secret. Tokens are compared in constant time and
//! never printed: [`AuthToken`]'s `Debug` is redacted.

use std::path::Path;

use axum::http;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::SecuritySection;
use crate::error::{Error, Result};

/// The environment variable a token is read from when no token file is configured.
pub const TOKEN_ENV: &str = "BRAID_AUTH_TOKEN";

/// The gRPC health service's path prefix: probes call it without credentials.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// A bearer token. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl AuthToken {
    /// A token from its text (surrounding whitespace, such as a file's final newline, is
    /// dropped). `origin` names where it came from for the error when it is empty or not
    /// printable ASCII (it must fit in an HTTP header).
    pub fn new(text: &str, origin: &str) -> Result<Self> {
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::Security(format!("{origin}: the auth token is empty")));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Security(format!(
                "{origin}: the auth token must be printable ASCII without spaces (it is sent in an HTTP header)"
            )));
        }
        Ok(Self(token.to_string()))
    }

    /// Reads a token from `file`.
    pub fn from_file(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::Security(format!("reading the auth token file {}: {e}", file.display())))?;
        Self::new(&text, &file.display().to_string())
    }

    /// The token from `file` when given, else from [`TOKEN_ENV`] when that is set; `None`
    /// when neither is.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>> {
        if let Some(file) = file {
            return Self::from_file(file).map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(text) => Self::new(&text, TOKEN_ENV).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The `authorization` header value that carries it.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// True when `header` (an `authorization` header's value) carries this token.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else { return false };
        constant_time_eq(presented, self.0.as_bytes())
    }
}

/// Compares without returning early on the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a request needs the token: every gRPC call but health checks, and every HTTP call
/// that is not a read.
pub fn needs_token(method: &http::Method, path: &str) -> bool {
    if path.starts_with(HEALTH_PREFIX) {
        return false;
    }
    !(method == http::Method::GET || method == http::Method::HEAD)
}

/// What the coordinator enforces, loaded from `[security]`.
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    /// The token calls must carry, when one is configured.
    pub token: Option<AuthToken>,
    /// TLS for the port, when configured.
    pub tls: Option<ServerTlsConfig>,
}

impl ServerSecurity {
    /// Loads the token and certificates `section` names (a job's `[security]`).
    pub fn load(section: &SecuritySection) -> Result<Self> {
        let token = AuthToken::load(section.auth_token_file.as_deref().map(Path::new))?;
        let tls = match (&section.tls_cert, &section.tls_key) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read_pem(cert, "security.tls_cert")?, read_pem(key, "security.tls_key")?);
                let mut tls = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &section.tls_client_ca {
                    tls = tls.client_ca_root(Certificate::from_pem(read_pem(ca, "security.tls_client_ca")?));
                }
                Some(tls)
            }
            _ => None,
        };
        Ok(Self { token, tls })
    }
}

/// How a client reaches a secured coordinator: the token it sends and the TLS it speaks.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<AuthToken>,
    /// TLS to the coordinator (its address then uses `https://`).
    pub tls: Option<ClientTlsConfig>,
}

impl ClientSecurity {
    /// A client's settings: the token from `token_file` or [`TOKEN_ENV`]; TLS when `ca` (the
    /// PEM CA that signed the coordinator's certificate) is given, presenting the client
    /// certificate `cert`/`key` when given and checking the coordinator's name as `domain`
    /// (default: the host of the address).
    pub fn load(
        token_file: Option<&Path>,
        ca: Option<&Path>,
        cert_and_key: Option<(&Path, &Path)>,
        domain: Option<&str>,
    ) -> Result<Self> {
        let token = AuthToken::load(token_file)?;
        let tls = match ca {
            Some(ca) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem_path(ca, "--tls-ca")?));
                if let Some((cert, key)) = cert_and_key {
                    tls = tls.identity(Identity::from_pem(read_pem_path(cert, "--tls-cert")?, read_pem_path(key, "--tls-key")?));
                }
                if let Some(domain) = domain {
                    tls = tls.domain_name(domain);
                }
                Some(tls)
            }
            None if cert_and_key.is_some() => {
                return Err(Error::Security("a client certificate needs --tls-ca (the coordinator's CA) too".into()))
            }
            None => None,
        };
        Ok(Self { token, tls })
    }
}

fn read_pem(path: &str, key: &str) -> Result<Vec<u8>> {
    read_pem_path(Path::new(path), key)
}

/// Reads a PEM file, checking it holds at least one PEM block; `key` names the setting.
fn read_pem_path(path: &Path, key: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Security(format!("{key} = {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::Security(format!("{key} = {}: not a PEM file (no -----BEGIN line)", path.display())));
    }
    Ok(bytes)
}

/// Adds the bearer token to every outgoing call.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Sends `token`, or nothing when `None`.
    pub fn new(token: Option<&AuthToken>) -> Self {
        Self(token.map(|t| t.header_value().parse().expect("tokens are printable ASCII")))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Axum middleware refusing calls that need the token (see [`needs_token`]) and do not carry
/// it: gRPC calls get `UNAUTHENTICATED`, HTTP calls 401. Nothing behind it runs.
pub async fn require_token(
    token: AuthToken,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !needs_token(request.method(), request.uri().path())
        || token.admits(request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes()))
    {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let presented = request.headers().contains_key(http::header::AUTHORIZATION);
    let reason = if presented { "the bearer token is wrong" } else { "no bearer token (authorization: Bearer <token>)" };
    tracing::warn!("refused {} {path}: {reason}", request.method());
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let (parts, body) = tonic::Status::unauthenticated(format!("{path}: {reason}")).into_http::<tonic::body::Body>().into_parts();
        return axum::response::Response::from_parts(parts, axum::body::Body::new(body));
    }
    let mut response = axum::response::Response::new(axum::body::Body::from(format!("401 Unauthorized: {path}: {reason}\n")));
    *response.status_mut() = http::StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_exactly_and_never_shown() {
        let token = AuthToken::new("s3cret-token\n", "test").unwrap();
        assert!(token.admits(Some(b"Bearer s3cret-token")));
        for wrong in [&b"Bearer s3cret-tokeN"[..], b"Bearer s3cret-token ", b"bearer s3cret-token", b"s3cret-token", b"Bearer "] {
            assert!(!token.admits(Some(wrong)), "{}", String::from_utf8_lossy(wrong));
        }
        assert!(!token.admits(None));
        assert_eq!(format!("{token:?}"), "AuthToken(<redacted>)");
        assert!(AuthToken::new(" \n", "f").unwrap_err().to_string().contains("empty"));
        assert!(AuthToken::new("two words", "f").unwrap_err().to_string().contains("printable ASCII"));
    }

    #[test]
    fn reads_and_health_checks_are_open_everything_else_needs_the_token() {
        use http::Method;
        assert!(!needs_token(&Method::GET, "/status"));
        assert!(!needs_token(&Method::GET, "/metrics"));
        assert!(!needs_token(&Method::HEAD, "/"));
        assert!(!needs_token(&Method::POST, "/grpc.health.v1.Health/Check"));
        assert!(needs_token(&Method::POST, "/braid.v1.Coordinator/Join"));
        assert!(needs_token(&Method::POST, "/checkpoint"));
        assert!(needs_token(&Method::DELETE, "/status"));
    }
}
