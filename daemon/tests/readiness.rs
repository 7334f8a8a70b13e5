//! Health that tells the truth, against real PostgreSQL behind a TCP proxy this test
//! controls: when the proxy is cut (it stops accepting, and existing connections are
//! blackholed — held open, nothing forwarded, as when the database host drops off the
//! network), a database-backed request answers 503 with `Retry-After` within seconds
//! (not after sqlx's 30 s, not 500), `/readyz` answers 503, `/healthz` stays 200
//! (the process and its controller live); once the proxy is restored all recover.

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bearman::api::{AppState, ServiceConfig};
use bearman::core::model::{NodeRole, TokenRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::images::MemoryImages;
use bearman::runtime::system::SystemClock;
use bearman::store::sql::SqlStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to PostgreSQL that can be cut and restored.
struct Proxy {
    addr: std::net::SocketAddr,
    /// `true` while cut: no accepts, no bytes forwarded either way.
    cut: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                wait_open(&mut cut_rx.clone()).await;
                // While cut, connections wait in the listen backlog: the TCP handshake
                // completes (the kernel does it) but nothing answers.
                let accept = listener.accept();
                let mut watch_cut = cut_rx.clone();
                let accepted = tokio::select! {
                    biased;
                    _ = watch_cut.wait_for(|cut| *cut) => continue,
                    accepted = accept => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, cut_rx.clone()));
                tokio::spawn(pipe(server_read, client_write, cut_rx.clone()));
            }
        });
        Proxy { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

async fn wait_open(cut: &mut watch::Receiver<bool>) {
    let _ = cut.wait_for(|cut| !*cut).await;
}

/// Copies one direction, holding everything (reading nothing) while cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        wait_open(&mut cut).await;
        let read = tokio::select! {
            biased;
            _ = cut.wait_for(|cut| *cut) => continue,
            read = from.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a cut are held until it is restored.
        wait_open(&mut cut).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The schema URL with its host and port replaced by the proxy's.
fn through(url: &str, proxy: std::net::SocketAddr) -> (String, std::net::SocketAddr) {
    let after_scheme = url.find("://").unwrap() + 3;
    let rest = &url[after_scheme..];
    let host_start = rest.find('@').map_or(0, |at| at + 1);
    let host_end = rest[host_start..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| host_start + i);
    let host_port = &rest[host_start..host_end];
    let upstream: std::net::SocketAddr = match host_port.parse() {
        Ok(addr) => addr,
        Err(_) => {
            use std::net::ToSocketAddrs;
            let with_port = if host_port.contains(':') {
                host_port.to_string()
            } else {
                format!("{host_port}:5432")
            };
            with_port.to_socket_addrs().unwrap().next().unwrap()
        }
    };
    let proxied = format!(
        "{}{}{proxy}{}",
        &url[..after_scheme],
        &rest[..host_start],
        &rest[host_end..]
    );
    (proxied, upstream)
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    took: Duration,
}

async fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> Answer {
    let started = Instant::now();
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the daemon answers");
    Answer {
        status: response.status().as_u16(),
        retry_after: response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string()),
        took: started.elapsed(),
    }
}

/// Generous: the point is "seconds, not sqlx's 30 s", on a loaded CI machine.
const ANSWER_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_quickly_and_recovers() {
    postgres::with_schema("readiness", |schema_url| async move {
        let (_, upstream) = through(&schema_url, "127.0.0.1:1".parse().unwrap());
        let proxy = Proxy::start(upstream).await;
        let (url, _) = through(&schema_url, proxy.addr);
        let store: Arc<dyn bearman::store::Store> = Arc::new(SqlStore::connect(&url).await.unwrap());
        let state = AppState::new(
            store,
            Arc::new(SystemClock),
            Arc::new(MemoryImages::default()),
            ServiceConfig {
                public_url: "http://127.0.0.1".into(),
                stage1: Default::default(),
                defaults: RegistrationDefaults {
                    role: NodeRole::Compute,
                    flavor: None,
                },
                enrollment: bearman::core::enrollment::EnrollmentPolicy::default(),
                body_limit_bytes: bearman::api::BODY_LIMIT_BYTES_DEFAULT,
                edge: bearman::edge::EdgeLimits::default(),
                heartbeat_fresh_ms: 30_000,
                firmware: Default::default(),
                dashboard: Default::default(),
                metrics_public: false,
            },
        );
        let token = state
            .app
            .token_create("test", "readiness", TokenRole::Viewer)
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = bearman::api::router(state);
        tokio::spawn(async move { axum::serve(listener, router).await });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let nodes = format!("{base}/api/v1/nodes");
        let secret = Some(token.secret.as_str());

        // Healthy.
        assert_eq!(get(&client, &nodes, secret).await.status, 200);
        assert_eq!(get(&client, &format!("{base}/readyz"), None).await.status, 200);
        assert_eq!(get(&client, &format!("{base}/healthz"), None).await.status, 200);

        proxy.set_cut(true);
        for _ in 0..3 {
            let answer = get(&client, &nodes, secret).await;
            assert_eq!(answer.status, 503, "a database-backed request during the outage");
            assert!(
                answer.took < ANSWER_BOUND,
                "answered after {:?}, not within {ANSWER_BOUND:?}",
                answer.took
            );
            let retry_after: u32 = answer
                .retry_after
                .expect("a 503 for the outage carries Retry-After")
                .parse()
                .unwrap();
            assert!(retry_after > 0);
        }
        let ready = get(&client, &format!("{base}/readyz"), None).await;
        assert_eq!(ready.status, 503, "not ready without a database");
        assert!(ready.took < ANSWER_BOUND, "readyz took {:?}", ready.took);
        assert!(ready.retry_after.is_some());
        let health = get(&client, &format!("{base}/healthz"), None).await;
        assert_eq!(health.status, 200, "the process and its controller still live");

        proxy.set_cut(false);
        // Recovery within a bound (the held connections resume; new ones are accepted).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes_status = get(&client, &nodes, secret).await.status;
            let ready_status = get(&client, &format!("{base}/readyz"), None).await.status;
            if nodes_status == 200 && ready_status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no recovery after the proxy was restored: nodes {nodes_status}, readyz {ready_status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}
