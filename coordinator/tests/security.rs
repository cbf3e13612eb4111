//! A coordinator with `[security]`: the bearer token on RPCs and mutating HTTP calls, TLS with
//! client certificates, and messages too large or malformed to decode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use braid_coordinator::config::JobConfig;
use braid_coordinator::security::{AuthToken, ClientSecurity};
use braid_coordinator::{CoordinatorClient, CoordinatorHandle};
use braid_proto::{Header, JoinRequest, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const JOB: &str = "secure-job";
const TOKEN: &str = "tok-3f9c2a7e51b84d06";

/// A job of 2 workers over a hand-written 1-shard manifest, checkpointing under `dir`, with
/// `security` as its `[security]` table.
fn job(dir: &Path, security: &str) -> JobConfig {
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"version": 1, "shards": [{"url": "shard-000000.tar", "size": 2048, "samples": [{"key": "a", "members": {"jpg": [0, 100], "txt": [100, 10]}}]}]}"#,
    )
    .unwrap();
    let text = format!(
        "[job]\nname = \"{JOB}\"\n[data]\ntrain = {:?}\n[train]\nglobal_batch = 2\nsteps = 4\n\
         [cluster]\nmin_workers = 2\nmax_workers = 2\n[checkpoint]\nurl = {:?}\n[security]\n{security}",
        manifest.display().to_string(),
        dir.join("ckpt").display().to_string()
    );
    let c = JobConfig::parse(&text, "test").unwrap();
    c.validate("test").unwrap();
    c
}

async fn start(config: JobConfig) -> CoordinatorHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    braid_coordinator::start(config, listener, CancellationToken::new()).await.unwrap()
}

fn join_request() -> JoinRequest {
    JoinRequest {
        header: Some(Header { job_id: JOB.into(), protocol_version: PROTOCOL_VERSION, worker_id: String::new() }),
        hostname: "h".into(),
        device: "cpu".into(),
        pid: 1,
    }
}

/// The coordinator's state as its journal would write it, to show a refused call changed nothing.
fn state_of(handle: &CoordinatorHandle) -> String {
    serde_json::to_string(&handle.service().snapshot()).unwrap()
}

/// Status code and body of a plain HTTP/1.1 request; `None` when no HTTP response came back.
async fn http(address: &str, method: &str, path: &str, authorization: Option<&str>) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let auth = authorization.map(|a| format!("authorization: {a}\r\n")).unwrap_or_default();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\ncontent-length: 0\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

async fn health(address: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);
    let reply = client.check(HealthCheckRequest { service: "braid.v1.Coordinator".into() }).await.unwrap();
    ServingStatus::try_from(reply.into_inner().status).unwrap()
}

fn with_token(token: &str) -> ClientSecurity {
    ClientSecurity { token: Some(AuthToken::new(token, "test").unwrap()), tls: None }
}

#[tokio::test]
async fn the_token_is_required_on_every_rpc_and_mutating_http_call() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let handle = start(job(dir.path(), &format!("auth_token_file = {:?}\n", token_file.display().to_string()))).await;
    let address = handle.local_addr().to_string();
    let before = state_of(&handle);

    // gRPC without a token, and with a wrong one: UNAUTHENTICATED, nothing registered.
    let mut raw = braid_proto::coordinator_client::CoordinatorClient::connect(format!("http://{address}")).await.unwrap();
    let status = raw.join(join_request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no bearer token"), "{}", status.message());
    let wrong = CoordinatorClient::connect_secured(&address, JOB, Duration::from_secs(5), &with_token("tok-wrong")).await.unwrap();
    let err = wrong.join("h", "cpu", 1).await.unwrap_err().to_string();
    assert!(err.contains("Unauthenticated") && err.contains("the bearer token is wrong"), "{err}");
    assert!(!err.contains(TOKEN) && !err.contains("tok-wrong"), "an error shows a token: {err}");

    // Reads and health checks stay open; a mutating HTTP call is refused with 401.
    assert_eq!(health(&address).await, ServingStatus::Serving);
    let (code, body) = http(&address, "GET", "/status", None).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(http(&address, "GET", "/metrics", None).await.unwrap().0, 200);
    for auth in [None, Some("Bearer tok-wrong"), Some(TOKEN)] {
        let (code, body) = http(&address, "POST", "/checkpoint", auth).await.unwrap();
        assert_eq!(code, 401, "POST /checkpoint with {auth:?}: {body}");
    }
    assert_eq!(state_of(&handle), before, "a refused call changed the coordinator's state");

    // The right token is let through, on gRPC and HTTP.
    let client = CoordinatorClient::connect_secured(&address, JOB, Duration::from_secs(5), &with_token(TOKEN)).await.unwrap();
    client.join("h", "cpu", 1).await.unwrap();
    assert_eq!(handle.progress().members.len(), 1);
    let (code, body) = http(&address, "POST", "/checkpoint", Some(&format!("Bearer {TOKEN}"))).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"requested\":true"), "{body}");
}

#[tokio::test]
async fn a_token_file_that_is_missing_or_empty_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = job(dir.path(), &format!("auth_token_file = {:?}\n", missing.display().to_string()));
    let err = braid_coordinator::start(config, listener, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("no-such-token"), "{err}");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = job(dir.path(), &format!("auth_token_file = {:?}\n", empty.display().to_string()));
    let err = braid_coordinator::start(config, listener, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("empty-token") && err.contains("empty"), "{err}");
}

/// Certificates made with the `openssl` command: two CAs, a server certificate for localhost
/// and 127.0.0.1, and client certificates signed by each CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let pki = Self { dir: dir.to_path_buf() };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&format!(
                "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN={ca}"
            ));
        }
        pki.sign("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth");
        pki.sign("client", "ca", "extendedKeyUsage=clientAuth");
        pki.sign("stranger", "other-ca", "extendedKeyUsage=clientAuth");
        pki
    }

    fn openssl(&self, args: &str) {
        let out = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(&self.dir)
            .output()
            .expect("the openssl command (Debian package openssl) makes the test certificates");
        assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn sign(&self, name: &str, ca: &str, extensions: &str) {
        std::fs::write(self.dir.join(format!("{name}.ext")), format!("{extensions}\n")).unwrap();
        self.openssl(&format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -out {name}.pem -days 2 -extfile {name}.ext"
        ));
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn client(&self, identity: Option<&str>) -> ClientSecurity {
        let cert = identity.map(|n| (self.path(&format!("{n}.pem")), self.path(&format!("{n}.key"))));
        ClientSecurity::load(
            None,
            Some(&self.path("ca.pem")),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            Some("localhost"),
        )
        .unwrap()
    }
}

/// The error of a connection attempt, or of a join over the connection when it was made.
async fn join_refused(connected: braid_coordinator::Result<CoordinatorClient>) -> String {
    match connected {
        Err(e) => e.to_string(),
        Ok(client) => client.join("h", "cpu", 1).await.expect_err("the join went through").to_string(),
    }
}

#[tokio::test]
async fn tls_refuses_plaintext_and_clients_without_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let security = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
        pki.path("server.pem").display().to_string(),
        pki.path("server.key").display().to_string(),
        pki.path("ca.pem").display().to_string()
    );
    let handle = start(job(dir.path(), &security)).await;
    let address = handle.local_addr().to_string();
    let before = state_of(&handle);
    let short = Duration::from_millis(500);

    // Plaintext gRPC and HTTP get no answer.
    let plain = join_refused(CoordinatorClient::connect(&address, JOB, short).await).await;
    println!("plaintext gRPC: {plain}");
    assert!(plain.contains("transport error"), "{plain}");
    assert_eq!(http(&address, "GET", "/status", None).await, None, "plaintext HTTP was answered");
    // TLS without a client certificate, or with one another CA signed, is refused.
    for (identity, alert) in [(None, "CertificateRequired"), (Some("stranger"), "UnknownCA")] {
        let err = join_refused(CoordinatorClient::connect_secured(&address, JOB, short, &pki.client(identity)).await).await;
        println!("client certificate {identity:?}: {err}");
        assert!(err.contains(alert), "{err}");
    }
    assert_eq!(state_of(&handle), before, "a refused client changed the coordinator's state");
    assert!(handle.progress().members.is_empty());

    // A client certificate from the trusted CA gets through.
    let client = CoordinatorClient::connect_secured(&address, JOB, Duration::from_secs(5), &pki.client(Some("client"))).await.unwrap();
    client.join("h", "cpu", 1).await.unwrap();
    assert_eq!(handle.progress().members.len(), 1);
    // `braid status` reads the job over the same TLS connection.
    let status: serde_json::Value = serde_json::from_str(&client.status_json().await.unwrap()).unwrap();
    assert_eq!((status["job"].as_str(), status["members"].as_array().map(Vec::len)), (Some(JOB), Some(1)));
}

#[tokio::test]
async fn pem_files_that_are_not_pem_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let security = format!("tls_cert = {:?}\ntls_key = {:?}\n", cert.display().to_string(), cert.display().to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = braid_coordinator::start(job(dir.path(), &security), listener, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("security.tls_cert") && err.contains("server.pem") && err.contains("not a PEM file"), "{err}");
}

/// A message whose field 1 (a JoinRequest's `header`, a nested message) is a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAJoinRequest {
    #[prost(uint64, tag = "1")]
    header: u64,
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_refused_with_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let handle = start(job(dir.path(), "")).await;
    let address = handle.local_addr().to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/braid.v1.Coordinator/Join");
    let codec = tonic_prost::ProstCodec::<NotAJoinRequest, NotAJoinRequest>::default();
    let status = grpc.unary(tonic::Request::new(NotAJoinRequest { header: 7 }), path, codec).await.unwrap_err();
    println!("{status:?}");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("failed to decode") && status.message().contains("JoinRequest"), "{}", status.message());
    assert!(handle.progress().members.is_empty(), "the malformed join registered a worker");

    let mut raw = braid_proto::coordinator_client::CoordinatorClient::connect(format!("http://{address}")).await.unwrap();
    let huge = JoinRequest { hostname: "h".repeat(braid_coordinator::server::MAX_MESSAGE_BYTES + 1), ..join_request() };
    let status = raw.join(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(handle.progress().members.is_empty(), "the oversized join registered a worker");
}
