//! The Nova driver against recorded Keystone and Nova exchanges (`fixtures/nova/*.json`),
//! replayed by a loopback server that checks every request the driver makes, in order.
//! Every recorded-exchange test runs twice: over plain HTTP and over HTTPS with a CA made
//! for the test (`over_http::…`, `over_https::…`); the TLS tests below check that a
//! certificate the configured CA did not sign is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman::cloud::nova::{NovaCloud, NovaConfig, NovaConfigError, TIMEOUT_DEFAULT};
use bearman::cloud::{Cloud, CloudError};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The password the fixtures' Keystone requests carry.
const PASSWORD: &str = "correct-horse-battery-staple";
const TOKENS: [&str; 2] = [
    "gAAAAABoFixtureTokenOne-k3xQ9wVbYl2mN8pR4sT6uW1yZ3aC5eG7iK9",
    "gAAAAABoFixtureTokenTwo-p7rT2vX4zB6dF8hJ0lN2pR4tV6xZ8bD0fH2",
];
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Bound on any one test's conversation, so a driver that ignores its timeout fails
/// rather than hangs.
const TEST_BOUND: Duration = Duration::from_secs(20);
/// Bound on the replay server's side of one TLS handshake.
const HANDSHAKE_BOUND: Duration = Duration::from_secs(5);

/// How the replay server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Http,
    Https,
}

/// A CA made for one test, its PEM file, and the server side of TLS with a certificate
/// for 127.0.0.1 it signed.
struct TestCa {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// `name` is the CA's common name: two CAs with one name would fail verification as
    /// a bad signature, not as the unknown issuer a real wrong CA is.
    fn new(name: &str) -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![server_cert.der().clone()], key)
            .unwrap();
        TestCa {
            _dir: dir,
            ca_file,
            server: Arc::new(server),
        }
    }
}

/// A byte stream from the driver: TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    #[allow(dead_code)]
    description: String,
    exchanges: Vec<Exchange>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Exchange {
    request: ExpectedRequest,
    response: RecordedResponse,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ExpectedRequest {
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RecordedResponse {
    #[serde(default)]
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    hang: bool,
}

struct ActualRequest {
    method: String,
    target: String,
    /// Lower-cased names.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

struct State {
    name: String,
    exchanges: Vec<Exchange>,
    next: usize,
    mismatches: Vec<String>,
}

/// A loopback server answering one fixture's recorded responses in order.
struct Replay {
    base: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
    /// The CA that signed the server's certificate, over HTTPS.
    ca: Option<TestCa>,
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/nova")
        .join(format!("{name}.json"))
}

impl Replay {
    async fn start(name: &str, transport: Transport) -> Replay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (scheme, ca) = match transport {
            Transport::Http => ("http", None),
            Transport::Https => ("https", Some(TestCa::new("bearman nova replay ca"))),
        };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let text = std::fs::read_to_string(fixture_path(name))
            .unwrap_or_else(|error| panic!("fixture {name}: {error}"));
        let fixture: Fixture = serde_json::from_str(&text.replace("{{base}}", &base))
            .unwrap_or_else(|error| panic!("fixture {name}: {error}"));
        let state = Arc::new(Mutex::new(State {
            name: name.to_string(),
            exchanges: fixture.exchanges,
            next: 0,
            mismatches: Vec::new(),
        }));
        let acceptor = ca.as_ref().map(|ca| TlsAcceptor::from(ca.server.clone()));
        let server = tokio::spawn(serve(listener, acceptor, state.clone()));
        Replay {
            base,
            state,
            server,
            ca,
        }
    }

    /// The test CA's PEM file, over HTTPS.
    fn ca_file(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|ca| ca.ca_file.clone())
    }

    /// Panics with every mismatch, or when the driver stopped before the fixture's end.
    fn verify(&self) {
        let total = self.state.lock().unwrap().exchanges.len();
        self.verify_consumed(total);
    }

    /// Panics with every mismatch, or unless exactly `count` exchanges were requested.
    fn verify_consumed(&self, count: usize) {
        let state = self.state.lock().unwrap();
        assert!(
            state.mismatches.is_empty(),
            "fixture {}: the driver's requests differ from the recording:\n{}",
            state.name,
            state.mismatches.join("\n")
        );
        if state.next != count {
            let next = state
                .exchanges
                .get(state.next)
                .map(|exchange| {
                    format!(
                        "; next expected: {} {}",
                        exchange.request.method, exchange.request.path
                    )
                })
                .unwrap_or_default();
            panic!(
                "fixture {}: {} exchanges requested, expected {count} of {}{next}",
                state.name,
                state.next,
                state.exchanges.len()
            );
        }
    }
}

async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<Mutex<State>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let mut stream: Box<dyn Stream> = match &acceptor {
            None => Box::new(tcp),
            Some(acceptor) => {
                match tokio::time::timeout(HANDSHAKE_BOUND, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    // The driver refused the certificate, or hung up.
                    _ => continue,
                }
            }
        };
        let request = read_request(&mut stream).await;
        let answer = state.lock().unwrap().answer(request);
        match answer {
            Answer::Hang => {
                // Keep the connection open and silent until the test ends.
                tokio::spawn(async move {
                    let _held = stream;
                    std::future::pending::<()>().await;
                });
            }
            Answer::Bytes(bytes) => {
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
            }
        }
    }
}

enum Answer {
    Hang,
    Bytes(Vec<u8>),
}

impl State {
    fn answer(&mut self, request: Result<ActualRequest, String>) -> Answer {
        let total = self.exchanges.len();
        let position = format!(
            "fixture {}, exchange {} of {total}",
            self.name,
            self.next + 1
        );
        let request = match request {
            Ok(request) => request,
            Err(error) => return self.refuse(format!("{position}: unreadable request: {error}")),
        };
        let Some(exchange) = self.exchanges.get(self.next).cloned() else {
            return self.refuse(format!(
                "fixture {}: unexpected request {} {} after all {total} recorded exchanges",
                self.name, request.method, request.target
            ));
        };
        let differences = compare(&exchange.request, &request);
        if !differences.is_empty() {
            return self.refuse(format!(
                "{position}: request does not match\n{}",
                differences.join("\n")
            ));
        }
        self.next += 1;
        if exchange.response.hang {
            return Answer::Hang;
        }
        Answer::Bytes(render(&exchange.response))
    }

    fn refuse(&mut self, mismatch: String) -> Answer {
        let body = mismatch.clone();
        self.mismatches.push(mismatch);
        Answer::Bytes(
            format!(
                "HTTP/1.1 599 Replay Mismatch\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    }
}

/// `- expected` / `+ actual` lines for every difference.
fn compare(expected: &ExpectedRequest, actual: &ActualRequest) -> Vec<String> {
    let mut lines = Vec::new();
    let (expected_path, expected_query) = split_target(&expected.path);
    let (actual_path, actual_query) = split_target(&actual.target);
    if expected.method != actual.method
        || expected_path != actual_path
        || expected_query != actual_query
    {
        lines.push(format!(
            "  - expected: {} {}",
            expected.method, expected.path
        ));
        lines.push(format!("  + actual:   {} {}", actual.method, actual.target));
    }
    for (name, value) in &expected.headers {
        let found = actual.headers.get(&name.to_ascii_lowercase());
        if found != Some(value) {
            lines.push(format!("  - expected header {name}: {value}"));
            lines.push(format!(
                "  + actual header {name}: {}",
                found.map(String::as_str).unwrap_or("(absent)")
            ));
        }
    }
    let actual_body = if actual.body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(&actual.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&actual.body).into())),
        )
    };
    if expected.body != actual_body {
        let show = |body: &Option<Value>| {
            body.as_ref()
                .map(Value::to_string)
                .unwrap_or_else(|| "(none)".into())
        };
        lines.push(format!("  - expected body: {}", show(&expected.body)));
        lines.push(format!("  + actual body:   {}", show(&actual_body)));
    }
    lines
}

/// Path and the query's pairs in sorted order: their order carries no meaning.
fn split_target(target: &str) -> (String, Vec<String>) {
    match target.split_once('?') {
        Some((path, query)) => {
            let mut pairs: Vec<String> = query.split('&').map(str::to_string).collect();
            pairs.sort();
            (path.to_string(), pairs)
        }
        None => (target.to_string(), Vec::new()),
    }
}

fn render(response: &RecordedResponse) -> Vec<u8> {
    let body = response
        .body
        .as_ref()
        .map(|body| serde_json::to_vec_pretty(body).unwrap())
        .unwrap_or_default();
    let mut head = format!("HTTP/1.1 {} Recorded\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

async fn read_request(stream: &mut (impl AsyncRead + Unpin)) -> Result<ActualRequest, String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        if buffer.len() > REQUEST_BYTES_MAX {
            return Err("headers too large".into());
        }
        let read = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("connection closed before the headers ended".into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8(buffer[..header_end].to_vec()).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .map(|value| value.parse().map_err(|_| "bad content-length".to_string()))
        .transpose()?
        .unwrap_or(0);
    if length > REQUEST_BYTES_MAX {
        return Err("body too large".into());
    }
    let mut body = buffer[header_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("connection closed before the body ended".into());
        }
        body.extend_from_slice(&chunk[..read]);
    }
    body.truncate(length);
    Ok(ActualRequest {
        method,
        target,
        headers,
        body,
    })
}

fn config(replay: &Replay) -> NovaConfig {
    NovaConfig {
        auth_url: format!("{}/identity", replay.base),
        username: "bearman".into(),
        user_domain: "Default".into(),
        password: PASSWORD.into(),
        project: "admin".into(),
        project_domain: "Default".into(),
        region: Some("RegionOne".into()),
        interface: "public".into(),
        compute_url: None,
        timeout: Duration::from_secs(5),
        verify_tls: true,
        ca_file: replay.ca_file(),
    }
}

fn nova(config: NovaConfig) -> NovaCloud {
    NovaCloud::new(config).unwrap()
}

async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, call)
        .await
        .expect("the driver's call outlived the test bound")
}

fn api_message(error: CloudError) -> String {
    match error {
        CloudError::Api(message) => message,
        other => panic!("expected CloudError::Api, got {other:?}"),
    }
}

/// Asserts that no secret the fixtures use shows in `text`.
fn assert_no_secrets(text: &str) {
    assert!(!text.contains(PASSWORD), "password leaked: {text}");
    for token in TOKENS {
        assert!(!text.contains(token), "token leaked: {text}");
    }
}

async fn vms_on_host_follows_pagination_links_to_the_last_page(transport: Transport) {
    let replay = Replay::start("servers_paginated", transport).await;
    let cloud = nova(config(&replay)).with_page_limit(2);
    let vms = bounded(cloud.vms_on_host("compute-1")).await;
    replay.verify();
    assert_eq!(
        vms.unwrap(),
        [
            "764e369e-a874-4401-b7ce-43e4760888da",
            "1b7d5b2e-6f0c-4a83-9c0e-2d8f3b9a1c4e",
            "c2f6a1d8-3e5b-4f7a-8d9c-0b1e2f3a4b5c"
        ]
    );
}

async fn vms_on_host_stops_when_a_next_link_repeats_its_marker(transport: Transport) {
    let replay = Replay::start("servers_pagination_loop", transport).await;
    let cloud = nova(config(&replay)).with_page_limit(2);
    let error = bounded(cloud.vms_on_host("compute-1")).await.unwrap_err();
    replay.verify();
    let message = api_message(error);
    assert!(message.contains("nova vms_on_host compute-1"), "{message}");
    assert!(message.contains("did not advance"), "{message}");
}

async fn vms_on_host_refuses_a_list_where_nova_ignored_the_host_filter(transport: Transport) {
    let replay = Replay::start("servers_host_filter_ignored", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.vms_on_host("compute-1")).await.unwrap_err();
    replay.verify();
    let message = api_message(error);
    assert!(message.contains("on host compute-7"), "{message}");
    assert!(message.contains("admin role"), "{message}");
}

async fn force_down_finds_the_compute_service_and_puts_forced_down_by_uuid(transport: Transport) {
    let replay = Replay::start("force_down", transport).await;
    let cloud = nova(config(&replay));
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

async fn force_down_of_an_already_forced_down_service_succeeds_without_a_write(
    transport: Transport,
) {
    let replay = Replay::start("force_down_already_forced", transport).await;
    let cloud = nova(config(&replay));
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

async fn force_down_of_a_host_nova_does_not_know_is_a_clear_error(transport: Transport) {
    let replay = Replay::start("force_down_unknown_host", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.force_down("compute-404")).await.unwrap_err();
    replay.verify();
    let message = api_message(error);
    assert_eq!(
        message,
        "nova force_down compute-404: nova knows no nova-compute service on host \"compute-404\"; is that the host name nova uses?"
    );
}

async fn empty_host_is_refused_before_anything_is_sent(transport: Transport) {
    let replay = Replay::start("force_down", transport).await;
    let cloud = nova(config(&replay));
    let message = api_message(bounded(cloud.force_down("")).await.unwrap_err());
    assert!(message.contains("host must not be empty"), "{message}");
    let message = api_message(bounded(cloud.vms_on_host("")).await.unwrap_err());
    assert!(message.contains("host must not be empty"), "{message}");
    replay.verify_consumed(0);
}

async fn evacuate_accepted_by_nova_succeeds(transport: Transport) {
    let replay = Replay::start("evacuate_accepted", transport).await;
    let cloud = nova(config(&replay));
    let result = bounded(cloud.evacuate("764e369e-a874-4401-b7ce-43e4760888da")).await;
    replay.verify();
    result.unwrap();
}

async fn vm_status_reads_the_host_and_status_nova_reports(transport: Transport) {
    let replay = Replay::start("server_status_rebuilding", transport).await;
    let cloud = nova(config(&replay));
    let status = bounded(cloud.vm_status("764e369e-a874-4401-b7ce-43e4760888da"))
        .await
        .unwrap();
    replay.verify();
    assert_eq!(status.host.as_deref(), Some("compute-2"));
    assert_eq!(status.status, "REBUILD");
    let error = bounded(cloud.vm_status("")).await.unwrap_err().to_string();
    assert!(error.contains("vm_status"), "{error}");
}

async fn evacuate_refused_with_409_compute_service_in_use_is_service_in_use(transport: Transport) {
    let replay = Replay::start("evacuate_service_in_use_409", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.evacuate("764e369e-a874-4401-b7ce-43e4760888da"))
        .await
        .unwrap_err();
    replay.verify();
    match error {
        CloudError::ServiceInUse { host } => assert_eq!(host, "compute-1"),
        other => panic!("expected ServiceInUse, got {other:?}"),
    }
}

async fn evacuate_refused_with_400_compute_service_in_use_is_service_in_use(transport: Transport) {
    let replay = Replay::start("evacuate_service_in_use_400", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.evacuate("764e369e-a874-4401-b7ce-43e4760888da"))
        .await
        .unwrap_err();
    replay.verify();
    match error {
        CloudError::ServiceInUse { host } => assert_eq!(host, "compute-1"),
        other => panic!("expected ServiceInUse, got {other:?}"),
    }
}

async fn evacuate_failure_names_operation_status_and_nova_message(transport: Transport) {
    let replay = Replay::start("evacuate_unknown_server", transport).await;
    let cloud = nova(config(&replay));
    let server = "9f2c4e6a-0b1d-4f3a-8c5e-7d9b1a3c5e7f";
    let error = bounded(cloud.evacuate(server)).await.unwrap_err();
    replay.verify();
    assert_eq!(
        api_message(error),
        format!(
            "nova evacuate {server}: POST /servers/{server}/action: HTTP 404 itemNotFound: \
             Instance {server} could not be found. (request req-7e8f9a0b-1c2d-3e4f-5a6b-7c8d9e0f1a2b)"
        )
    );
}

async fn expired_token_triggers_exactly_one_reauthentication_and_the_retry_succeeds(
    transport: Transport,
) {
    // The fixture holds two authentications, the second only after Nova's 401, and the
    // retried PUT must carry the new token: an extra or missing authentication, or a retry
    // with the old token, is a mismatch.
    let replay = Replay::start("token_expired", transport).await;
    let cloud = nova(config(&replay));
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

async fn token_refused_again_after_reauthentication_is_an_error_not_a_loop(transport: Transport) {
    let replay = Replay::start("token_rejected_twice", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.evacuate("764e369e-a874-4401-b7ce-43e4760888da"))
        .await
        .unwrap_err();
    replay.verify();
    let message = api_message(error);
    assert!(message.contains("freshly issued token"), "{message}");
    assert!(message.contains("HTTP 401"), "{message}");
    assert_no_secrets(&message);
}

async fn keystone_refusing_the_credentials_is_a_clear_error(transport: Transport) {
    let replay = Replay::start("keystone_rejects_password", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.vms_on_host("compute-1")).await.unwrap_err();
    replay.verify();
    assert_eq!(
        api_message(error),
        "nova vms_on_host compute-1: keystone authentication as bearman in project admin: \
         HTTP 401 Unauthorized: The request you have made requires authentication."
    );
}

async fn hung_nova_hits_the_timeout(transport: Transport) {
    let replay = Replay::start("compute_hangs", transport).await;
    let timeout = Duration::from_millis(300);
    let cloud = nova(NovaConfig {
        timeout,
        ..config(&replay)
    });
    let started = tokio::time::Instant::now();
    let error = bounded(cloud.vms_on_host("compute-1")).await.unwrap_err();
    replay.verify();
    assert!(started.elapsed() >= timeout);
    let message = api_message(error);
    assert!(message.contains("no answer within 300ms"), "{message}");
    assert!(
        message.contains("GET /compute/v2.1/servers/detail"),
        "{message}"
    );
}

async fn password_and_tokens_never_appear_in_errors_or_debug_output(transport: Transport) {
    let mut messages = Vec::new();

    // Keystone quotes the submitted password back in its message.
    let replay = Replay::start("keystone_echoes_password", transport).await;
    let cloud = nova(config(&replay));
    let error = bounded(cloud.force_down("compute-1")).await.unwrap_err();
    replay.verify();
    let message = error.to_string();
    assert!(message.contains("[redacted]"), "{message}");
    assert!(message.contains("HTTP 400 Bad Request"), "{message}");
    messages.push(message);
    messages.push(format!("{cloud:?}"));
    messages.push(format!("{:?}", config(&replay)));

    for (fixture, host) in [
        ("token_rejected_twice", None),
        ("force_down_unknown_host", Some("compute-404")),
        ("evacuate_unknown_server", None),
        ("keystone_rejects_password", Some("compute-1")),
    ] {
        let replay = Replay::start(fixture, transport).await;
        let cloud = nova(config(&replay));
        let error = match host {
            Some(host) => bounded(cloud.force_down(host)).await.unwrap_err(),
            None => bounded(cloud.evacuate(if fixture == "evacuate_unknown_server" {
                "9f2c4e6a-0b1d-4f3a-8c5e-7d9b1a3c5e7f"
            } else {
                "764e369e-a874-4401-b7ce-43e4760888da"
            }))
            .await
            .unwrap_err(),
        };
        replay.verify();
        messages.push(error.to_string());
        messages.push(format!("{error:?}"));
        messages.push(format!("{cloud:?}"));
    }
    for message in &messages {
        assert_no_secrets(message);
    }
}

async fn compute_endpoint_is_chosen_from_the_catalog_by_interface_and_region(transport: Transport) {
    let replay = Replay::start("catalog_two_regions", transport).await;
    let cloud = nova(NovaConfig {
        region: Some("RegionTwo".into()),
        interface: "internal".into(),
        ..config(&replay)
    });
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

async fn catalog_with_several_compute_endpoints_and_no_region_is_a_clear_error(
    transport: Transport,
) {
    let replay = Replay::start("catalog_two_regions", transport).await;
    let cloud = nova(NovaConfig {
        region: None,
        interface: "internal".into(),
        ..config(&replay)
    });
    let error = bounded(cloud.force_down("compute-1")).await.unwrap_err();
    replay.verify_consumed(1);
    let message = api_message(error);
    assert!(
        message.contains("2 compute endpoints with interface internal (regions RegionOne, RegionTwo); set region"),
        "{message}"
    );
}

async fn configured_compute_url_is_used_instead_of_the_catalog(transport: Transport) {
    let replay = Replay::start("compute_url_configured", transport).await;
    let cloud = nova(NovaConfig {
        compute_url: Some(format!("{}/nova-direct/v2.1/", replay.base)),
        ..config(&replay)
    });
    let result = bounded(cloud.evacuate("764e369e-a874-4401-b7ce-43e4760888da")).await;
    replay.verify();
    result.unwrap();
}

async fn auth_url_may_carry_the_v3_suffix(transport: Transport) {
    let replay = Replay::start("force_down_already_forced", transport).await;
    let cloud = nova(NovaConfig {
        auth_url: format!("{}/identity/v3/", replay.base),
        ..config(&replay)
    });
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

async fn password_env_reference_is_resolved_at_construction(transport: Transport) {
    let replay = Replay::start("force_down_already_forced", transport).await;
    let env = |name: &str| (name == "BEARMAN_NOVA_PASSWORD").then(|| PASSWORD.to_string());
    let referenced = NovaConfig {
        password: "env:BEARMAN_NOVA_PASSWORD".into(),
        ..config(&replay)
    };
    assert!(format!("{referenced:?}").contains("env:BEARMAN_NOVA_PASSWORD"));
    let cloud = NovaCloud::with_env(referenced.clone(), env).unwrap();
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();

    let missing = NovaCloud::with_env(referenced, |_| None).unwrap_err();
    assert_eq!(
        missing,
        NovaConfigError::PasswordEnv("BEARMAN_NOVA_PASSWORD".into())
    );
    assert_eq!(
        missing.to_string(),
        "nova config: password refers to environment variable BEARMAN_NOVA_PASSWORD which is not set or empty"
    );
}

fn base_config() -> NovaConfig {
    NovaConfig {
        auth_url: "https://keystone:5000".into(),
        username: "bearman".into(),
        user_domain: "Default".into(),
        password: PASSWORD.into(),
        project: "admin".into(),
        project_domain: "Default".into(),
        region: None,
        interface: "public".into(),
        compute_url: None,
        timeout: TIMEOUT_DEFAULT,
        verify_tls: true,
        ca_file: None,
    }
}

#[test]
fn https_and_http_urls_are_accepted_and_malformed_ones_refused_at_construction() {
    let base = base_config();
    NovaCloud::new(NovaConfig {
        auth_url: "https://keystone:5000/v3".into(),
        compute_url: Some("HTTPS://nova:8774/v2.1".into()),
        ..base.clone()
    })
    .unwrap();
    NovaCloud::new(NovaConfig {
        auth_url: "http://keystone:5000".into(),
        ..base.clone()
    })
    .unwrap();
    for (auth_url, compute_url, field) in [
        ("keystone:5000", None, "auth_url"),
        ("ftp://keystone/v3", None, "auth_url"),
        ("https://keystone:5000/v3?x=1", None, "auth_url"),
        ("https://keystone:5000", Some("nova:8774"), "compute_url"),
    ] {
        let error = NovaCloud::new(NovaConfig {
            auth_url: auth_url.into(),
            compute_url: compute_url.map(str::to_string),
            ..base.clone()
        })
        .unwrap_err();
        assert!(
            matches!(error, NovaConfigError::InvalidUrl { field: f, .. } if f == field),
            "{auth_url} {compute_url:?}: {error:?}"
        );
    }
    let error = NovaCloud::new(NovaConfig {
        auth_url: format!("https://bearman:{PASSWORD}@keystone:5000"),
        ..base.clone()
    })
    .unwrap_err();
    assert_eq!(error, NovaConfigError::UrlCredentials { field: "auth_url" });
    assert!(!error.to_string().contains(PASSWORD), "{error}");
    let error = NovaCloud::new(NovaConfig {
        interface: "private".into(),
        ..base.clone()
    })
    .unwrap_err();
    assert_eq!(error, NovaConfigError::Interface("private".into()));
    let error = NovaCloud::new(NovaConfig {
        password: String::new(),
        ..base
    })
    .unwrap_err();
    assert_eq!(error, NovaConfigError::Empty { field: "password" });
}

#[test]
fn an_unreadable_or_empty_ca_file_is_refused_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let error = NovaCloud::new(NovaConfig {
        ca_file: Some(missing.clone()),
        ..base_config()
    })
    .unwrap_err();
    assert!(
        matches!(&error, NovaConfigError::CaFile { path, .. } if *path == missing),
        "{error:?}"
    );
    assert!(error.to_string().contains("cannot read ca_file"), "{error}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let error = NovaCloud::new(NovaConfig {
        ca_file: Some(empty),
        ..base_config()
    })
    .unwrap_err();
    assert!(error.to_string().contains("no pem certificate"), "{error}");
}

/// Log lines written while a [`capture_logs`] guard is held (this thread only).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// Every event at every level, the HTTP and TLS libraries' included, into `Logs`.
fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn a_certificate_another_ca_signed_is_refused_naming_the_endpoint() {
    let replay = Replay::start("force_down", Transport::Https).await;
    let other = TestCa::new("some other ca");
    let cloud = nova(NovaConfig {
        ca_file: Some(other.ca_file.clone()),
        ..config(&replay)
    });
    let error = bounded(cloud.force_down("compute-1")).await.unwrap_err();
    replay.verify_consumed(0);
    let message = api_message(error);
    assert!(
        message.contains(&format!("tls certificate problem with {}", replay.base)),
        "{message}"
    );
    assert!(
        message.contains("POST /identity/v3/auth/tokens"),
        "{message}"
    );
    assert!(message.contains("ca_file"), "{message}");
    assert_no_secrets(&message);
}

#[tokio::test]
async fn without_a_ca_file_a_private_ca_is_not_trusted() {
    let replay = Replay::start("force_down", Transport::Https).await;
    let cloud = nova(NovaConfig {
        ca_file: None,
        ..config(&replay)
    });
    let error = bounded(cloud.force_down("compute-1")).await.unwrap_err();
    replay.verify_consumed(0);
    let message = api_message(error);
    assert!(
        message.contains(&format!("tls certificate problem with {}", replay.base)),
        "{message}"
    );
}

#[tokio::test]
async fn verify_tls_false_accepts_any_certificate_and_warns_at_start() {
    let replay = Replay::start("force_down", Transport::Https).await;
    let (logs, guard) = capture_logs();
    let cloud = nova(NovaConfig {
        ca_file: None,
        verify_tls: false,
        ..config(&replay)
    });
    drop(guard);
    let warning = logs.text();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("tls certificate verification is off"),
        "{warning}"
    );
    let result = bounded(cloud.force_down("compute-1")).await;
    replay.verify();
    result.unwrap();
}

#[tokio::test]
async fn plain_http_auth_url_warns_that_the_password_travels_in_clear_text() {
    let replay = Replay::start("force_down", Transport::Http).await;
    let (logs, guard) = capture_logs();
    let _cloud = nova(config(&replay));
    drop(guard);
    assert!(logs.text().contains("clear text"), "{}", logs.text());
    let replay = Replay::start("force_down", Transport::Https).await;
    let (logs, guard) = capture_logs();
    let _cloud = nova(config(&replay));
    drop(guard);
    assert!(!logs.text().contains("WARN"), "{}", logs.text());
}

#[tokio::test]
async fn password_and_tokens_never_appear_in_logs_over_https() {
    // Every level of every library, through a whole conversation with a re-authentication,
    // a Keystone that quotes the password back, and a refused certificate.
    let (logs, _guard) = capture_logs();
    let replay = Replay::start("token_expired", Transport::Https).await;
    bounded(nova(config(&replay)).force_down("compute-1"))
        .await
        .unwrap();
    replay.verify();
    let replay = Replay::start("keystone_echoes_password", Transport::Https).await;
    let error = bounded(nova(config(&replay)).force_down("compute-1"))
        .await
        .unwrap_err();
    tracing::warn!("force_down failed: {error}");
    let replay = Replay::start("force_down", Transport::Https).await;
    let error = bounded(
        nova(NovaConfig {
            ca_file: Some(TestCa::new("some other ca").ca_file),
            ..config(&replay)
        })
        .force_down("compute-1"),
    )
    .await
    .unwrap_err();
    tracing::warn!("force_down failed: {error}");
    let text = logs.text();
    assert!(text.contains("authenticating again"), "{text}");
    assert_no_secrets(&text);
}

#[test]
fn config_file_form_takes_defaults_and_rejects_unknown_fields() {
    let config: NovaConfig = toml::from_str(
        r#"
        auth_url = "http://keystone:5000/v3"
        username = "bearman"
        password = "env:BEARMAN_NOVA_PASSWORD"
        project = "admin"
        "#,
    )
    .unwrap();
    assert_eq!(config.user_domain, "Default");
    assert_eq!(config.project_domain, "Default");
    assert_eq!(config.interface, "public");
    assert_eq!(config.region, None);
    assert_eq!(config.compute_url, None);
    assert_eq!(config.timeout, TIMEOUT_DEFAULT);
    assert_eq!(TIMEOUT_DEFAULT, Duration::from_secs(30));
    assert!(
        config.verify_tls,
        "certificates are verified unless said otherwise"
    );
    assert_eq!(config.ca_file, None);

    let config: NovaConfig = toml::from_str(
        r#"
        auth_url = "http://keystone:5000"
        username = "bearman"
        user_domain = "ops"
        password = "hunter2"
        project = "infra"
        project_domain = "ops"
        region = "RegionTwo"
        interface = "internal"
        compute_url = "http://nova:8774/v2.1"
        timeout_s = 2.5
        verify_tls = false
        ca_file = "/etc/bearman/openstack-ca.pem"
        "#,
    )
    .unwrap();
    assert_eq!(config.timeout, Duration::from_millis(2500));
    assert!(!config.verify_tls);
    assert_eq!(
        config.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/bearman/openstack-ca.pem"))
    );
    assert!(!format!("{config:?}").contains("hunter2"));

    let error = toml::from_str::<NovaConfig>(
        r#"
        auth_url = "http://keystone:5000"
        username = "bearman"
        password = "x"
        project = "admin"
        tenant = "admin"
        "#,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("unknown field `tenant`"),
        "{error}"
    );

    let error = toml::from_str::<NovaConfig>(
        r#"
        auth_url = "http://keystone:5000"
        username = "bearman"
        password = "x"
        project = "admin"
        timeout_s = 0
        "#,
    )
    .unwrap_err();
    assert!(error.to_string().contains("positive"), "{error}");
}

/// Each recorded-exchange test over plain HTTP and over HTTPS with the test's own CA.
macro_rules! over_http_and_https {
    ($($name:ident),* $(,)?) => {
        mod over_http {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Transport::Http).await
            })*
        }
        mod over_https {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Transport::Https).await
            })*
        }
    };
}

over_http_and_https!(
    vms_on_host_follows_pagination_links_to_the_last_page,
    vms_on_host_stops_when_a_next_link_repeats_its_marker,
    vms_on_host_refuses_a_list_where_nova_ignored_the_host_filter,
    force_down_finds_the_compute_service_and_puts_forced_down_by_uuid,
    force_down_of_an_already_forced_down_service_succeeds_without_a_write,
    force_down_of_a_host_nova_does_not_know_is_a_clear_error,
    empty_host_is_refused_before_anything_is_sent,
    evacuate_accepted_by_nova_succeeds,
    vm_status_reads_the_host_and_status_nova_reports,
    evacuate_refused_with_409_compute_service_in_use_is_service_in_use,
    evacuate_refused_with_400_compute_service_in_use_is_service_in_use,
    evacuate_failure_names_operation_status_and_nova_message,
    expired_token_triggers_exactly_one_reauthentication_and_the_retry_succeeds,
    token_refused_again_after_reauthentication_is_an_error_not_a_loop,
    keystone_refusing_the_credentials_is_a_clear_error,
    hung_nova_hits_the_timeout,
    password_and_tokens_never_appear_in_errors_or_debug_output,
    compute_endpoint_is_chosen_from_the_catalog_by_interface_and_region,
    catalog_with_several_compute_endpoints_and_no_region_is_a_clear_error,
    configured_compute_url_is_used_instead_of_the_catalog,
    auth_url_may_carry_the_v3_suffix,
    password_env_reference_is_resolved_at_construction,
);
