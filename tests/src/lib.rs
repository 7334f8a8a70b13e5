//! Shared harness for Bearman's end-to-end tests: a real daemon on a loopback socket
//! (port 0) over a real store, and a small HTTP client to poke it.

use std::net::SocketAddr;
use std::sync::Arc;

use bearman::api::{AppState, ServiceConfig};
use bearman::core::boot::Stage1Config;
use bearman::core::model::{NodeRole, TokenRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::images::MemoryImages;
use bearman::runtime::system::SystemClock;
use bearman::store::Store;
use bearman_proto::http;
use serde_json::Value;

/// The public URL the test daemon advertises; fixed so golden scripts do not depend on
/// the port the OS picked.
pub const PUBLIC_URL: &str = "http://bearman.test:8080";

pub struct TestDaemon {
    pub address: SocketAddr,
    pub store: Arc<dyn Store>,
    pub images: Arc<MemoryImages>,
    /// Secrets of tokens created at start, one per role.
    pub admin_token: String,
    pub operator_token: String,
    pub viewer_token: String,
    _dir: Option<tempfile::TempDir>,
    /// Dropped after the server is told to stop (fields drop in declaration order).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _schema: Option<PostgresSchema>,
}

/// What a test daemon is built with.
pub struct Options {
    pub default_flavor: Option<String>,
    pub body_limit_bytes: usize,
    /// Accept everyone by default: most tests are about what happens after a machine
    /// is let in; the enrollment tests set the production default (closed).
    pub enrollment: bearman::core::enrollment::EnrollmentPolicy,
    /// Connection bounds and rate limits: the production defaults unless a test is
    /// about them.
    pub edge: bearman::edge::EdgeLimits,
    /// The daemon's wall clock: the system's, unless a test moves time ([`OffsetClock`]).
    pub clock: Arc<dyn bearman::runtime::Clock>,
    /// `GET /metrics` without a token (`[metrics] public`).
    pub metrics_public: bool,
    /// The firmware rollout's rules (`[firmware]`).
    pub firmware: bearman::core::firmware::RolloutPolicy,
}

/// The system clock plus an offset a test moves forward, so expiry is tested without
/// waiting (the daemon's clock seam; timers are unaffected).
#[derive(Default)]
pub struct OffsetClock {
    offset_ms: std::sync::atomic::AtomicI64,
}

impl OffsetClock {
    pub fn advance(&self, ms: i64) {
        self.offset_ms
            .fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl bearman::runtime::Clock for OffsetClock {
    fn now_ms(&self) -> bearman::core::model::TimestampMs {
        SystemClock.now_ms() + self.offset_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            default_flavor: None,
            body_limit_bytes: bearman::api::BODY_LIMIT_BYTES_DEFAULT,
            enrollment: bearman::core::enrollment::EnrollmentPolicy::accept_all(),
            edge: bearman::edge::EdgeLimits::default(),
            clock: Arc::new(SystemClock),
            metrics_public: false,
            firmware: Default::default(),
        }
    }
}

impl TestDaemon {
    /// A daemon over SQLite in a fresh temporary directory, the production default.
    pub async fn sqlite(options: Options) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bearman.db").display()
        );
        let store = bearman::server::open_sql_store(&url)
            .await
            .expect("open sqlite store");
        Self::start(store, Some(dir), options).await
    }

    /// A daemon over the real PostgreSQL server (`DATABASE_URL`, or this machine's local
    /// one), in a schema of its own that is dropped with the daemon.
    pub async fn postgres(options: Options) -> TestDaemon {
        let schema = PostgresSchema::create().await;
        let store = bearman::server::open_sql_store(&schema.url)
            .await
            .expect("open postgres store");
        let mut daemon = Self::start(store, None, options).await;
        daemon._schema = Some(schema);
        daemon
    }

    pub async fn start(
        store: Arc<dyn Store>,
        dir: Option<tempfile::TempDir>,
        options: Options,
    ) -> TestDaemon {
        let images = Arc::new(MemoryImages::default());
        let state = AppState::new(
            store.clone(),
            options.clock,
            images.clone(),
            ServiceConfig {
                public_url: PUBLIC_URL.into(),
                stage1: Stage1Config::default(),
                defaults: RegistrationDefaults {
                    role: NodeRole::Compute,
                    flavor: options.default_flavor,
                },
                enrollment: options.enrollment,
                body_limit_bytes: options.body_limit_bytes,
                edge: options.edge,
                heartbeat_fresh_ms: 30_000,
                firmware: options.firmware,
                dashboard: Default::default(),
                metrics_public: options.metrics_public,
            },
        );
        let mut tokens = Vec::new();
        for role in [TokenRole::Admin, TokenRole::Operator, TokenRole::Viewer] {
            let token = state
                .app
                .token_create("test", role.as_str(), role)
                .await
                .expect("create token");
            tokens.push(token.secret);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().unwrap();
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let stop = async move {
                let _ = signal.await;
            };
            bearman::server::serve(listener, state, stop)
                .await
                .expect("serve");
        });
        TestDaemon {
            address,
            store,
            images,
            admin_token: tokens[0].clone(),
            operator_token: tokens[1].clone(),
            viewer_token: tokens[2].clone(),
            _dir: dir,
            shutdown: Some(shutdown),
            _schema: None,
        }
    }

    /// The daemon's real base URL (what the boot client connects to).
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Sends one request; `token` goes into `Authorization: Bearer`.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> http::Response {
        let mut stream = tokio::net::TcpStream::connect(self.address)
            .await
            .expect("connect");
        let authorization = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(value) = &authorization {
            headers.push(("Authorization", value.as_str()));
        }
        let host = self.address.to_string();
        let response = http::send(&mut stream, method, &host, path, &headers, body);
        tokio::time::timeout(std::time::Duration::from_secs(30), response)
            .await
            .expect("response within 30 s")
            .expect("http exchange")
    }

    /// Sends JSON as the admin and returns (status, parsed body or Null).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let response = self
            .request(
                method,
                &format!("/api/v1{path}"),
                Some(&self.admin_token),
                bytes.as_deref(),
            )
            .await;
        (response.status, json_of(&response))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// PostgreSQL to test against: `DATABASE_URL`, or this machine's local server.
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema of its own on the test PostgreSQL server, so parallel and earlier runs stay
/// out of each other's way; dropped (with everything in it) when this is dropped.
pub struct PostgresSchema {
    /// The database URL with `search_path` set to this schema.
    pub url: String,
    base: String,
    name: String,
}

impl PostgresSchema {
    pub async fn create() -> PostgresSchema {
        let base = postgres_url();
        let name = format!(
            "bearman_e2e_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&base).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is required for this test and was not reachable at {base}: {error}. \
                 Start it, or point DATABASE_URL at one."
            )
        });
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        PostgresSchema { url, base, name }
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        // Drop may run inside a runtime (which cannot block on another future) or during
        // a panic; a thread with a runtime of its own works in both.
        let (base, name) = (self.base.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let admin = sqlx::AnyPool::connect(&base).await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&admin)
                    .await?;
                admin.close().await;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}

pub fn json_of(response: &http::Response) -> Value {
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

/// A plausible registration body for node `index`, from the canned hardware fixture.
pub fn register_body(index: u32) -> bearman_proto::RegisterRequest {
    let text = include_str!("../../fixtures/hardware/r640.json");
    let mut request: bearman_proto::RegisterRequest =
        serde_json::from_str(text).expect("fixture parses");
    request.serial = format!("{}{index:04}", request.serial);
    for (nic_index, nic) in request.nics.iter_mut().enumerate() {
        nic.mac = format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (index >> 8) & 0xff,
            index & 0xff,
            nic_index
        );
    }
    request
}

/// A flavor every test can boot: artifacts served by the daemon itself.
pub fn flavor_json(name: &str) -> Value {
    serde_json::json!({
        "name": name,
        "kernel": {"url": "/images/hv/vmlinuz", "sha256": "1".repeat(64)},
        "initrds": [{"url": "/images/hv/initrd.img", "sha256": "2".repeat(64)}],
        "cmdline_template": "console=ttyS0 hostname={hostname} ip={ip} bearman.url={url} bearman.uuid={uuid}",
    })
}

pub fn node_pool_json() -> Value {
    serde_json::json!({
        "name": "rack-a", "purpose": "node", "vlan": 100, "cidr": "10.10.0.0/24",
        "range_start": "10.10.0.10", "range_end": "10.10.0.200", "gateway": "10.10.0.1",
        "dns": ["10.10.0.2"], "mtu": 9000,
    })
}

pub fn bmc_pool_json() -> Value {
    serde_json::json!({
        "name": "oob", "purpose": "bmc", "cidr": "10.20.0.0/24",
        "range_start": "10.20.0.10", "range_end": "10.20.0.200", "gateway": "10.20.0.1",
    })
}
