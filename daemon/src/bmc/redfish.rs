//! The Redfish driver for the [`Bmc`] seam: power control and one-shot PXE boot of one
//! server through its BMC's Redfish service (DMTF DSP0266) over HTTPS.
//!
//! What it speaks: `GET /redfish/v1/Systems` to find the system (the first member, or the
//! configured `system_id`), `GET` of that system for `PowerState`, `POST` of its
//! `#ComputerSystem.Reset` action (the `target` the system advertises) with `ResetType`
//! `On`, `ForceOff`, `GracefulShutdown`, `ForceRestart` or `Nmi`, and `PATCH` of its `Boot`
//! object for a one-time PXE boot override. Authentication is HTTP Basic or a Redfish
//! session (`POST /redfish/v1/SessionService/Sessions`, then `X-Auth-Token`), chosen per
//! BMC; a session is logged out by [`RedfishBmc::close`], or best-effort on drop.
//!
//! Limits: every [`Bmc`] call (discovery, a re-login and the request itself together) is
//! bounded by [`RedfishConfig::timeout`]; answers larger than [`RESPONSE_BYTES_MAX`] are
//! refused; at most [`REDIRECTS_MAX`] redirects are followed, and only to the same
//! origin, so a session token never leaves for another host; a `401` in session mode
//! logs in again once, never more.
//!
//! TLS: certificates are verified by default against the built-in web roots, or against
//! the configured `ca_file` alone when one is given (BMCs usually carry certificates of a
//! private CA); `verify_tls = false` accepts any certificate, for lab BMCs with
//! self-signed ones. Plain `http://` is used only when the address says so explicitly.
//!
//! Secrets: the password and session tokens never appear in errors, `Debug` output or
//! logs; a BMC message that echoes one has it replaced by `[redacted]`.
//!
//! Architecture invariant: this driver knows nothing of fencing or remediation. It
//! reports what the BMC says; callers verify a power change with `power_state`.

use crate::runtime::http_client::error_chain;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, ETAG, IF_MATCH, LOCATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{Bmc, BmcError, PowerState};

/// Default bound on one [`Bmc`] call; BMCs are slow (a reset can take seconds to be
/// accepted) but fencing must not wait on a dead one for long.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(20);
/// Answers larger than this are refused; a Redfish system resource is a few KiB.
pub const RESPONSE_BYTES_MAX: usize = 1 << 20;
/// Redirects followed for one request (same origin only).
pub const REDIRECTS_MAX: usize = 3;
/// BMC messages quoted in errors are cut to this many characters.
const MESSAGE_CHARS_MAX: usize = 512;
/// Idle connections are dropped well before typical BMC keep-alive limits close them.
const POOL_IDLE: Duration = Duration::from_secs(10);
const SYSTEMS_PATH: &str = "/redfish/v1/Systems";
const SESSIONS_PATH: &str = "/redfish/v1/SessionService/Sessions";
const AUTH_TOKEN_HEADER: &str = "X-Auth-Token";
const USER_AGENT: &str = "bearman-redfish";
const REDACTED: &str = "[redacted]";

pub use crate::core::secret::Secret;

/// How the driver authenticates to one BMC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedfishAuth {
    /// HTTP Basic on every request: simplest, and stateless on the BMC.
    #[default]
    Basic,
    /// A Redfish session: one login, then `X-Auth-Token`. For BMCs that throttle or
    /// refuse Basic, or that are slow to check a password on every request.
    Session,
}

/// Where one BMC is and how to talk to it.
#[derive(Clone, Debug)]
pub struct RedfishConfig {
    /// `host`, `host:port`, `[v6]:port`, or a full `https://host[:port]` (or, explicitly,
    /// `http://…`) URL without a path. A bare host means HTTPS.
    pub address: String,
    pub username: String,
    pub password: Secret,
    /// The system's `Id` under `/redfish/v1/Systems`; `None` takes the first member.
    pub system_id: Option<String>,
    pub auth: RedfishAuth,
    /// Verify the BMC's certificate (the default); `false` is for lab BMCs only.
    pub verify_tls: bool,
    /// PEM file of the CA(s) that sign the BMC's certificate; when set, only these are
    /// trusted.
    pub ca_file: Option<PathBuf>,
    /// Bound on each [`Bmc`] call, every request it makes included.
    pub timeout: Duration,
}

impl RedfishConfig {
    /// Basic auth, first system, verified TLS, [`TIMEOUT_DEFAULT`].
    pub fn new(
        address: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Self {
        RedfishConfig {
            address: address.into(),
            username: username.into(),
            password: password.into(),
            system_id: None,
            auth: RedfishAuth::Basic,
            verify_tls: true,
            ca_file: None,
            timeout: TIMEOUT_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedfishConfigError {
    #[error("invalid bmc address: {reason}")]
    Address { reason: String },
    #[error("invalid system id {system_id:?}: must be non-empty, without '/', '?', '#' or spaces")]
    SystemId { system_id: String },
    #[error("timeout must be greater than zero")]
    Timeout,
    #[error("cannot read ca file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot build the https client: {reason}")]
    Client { reason: String },
}

/// The `ResetType`s the driver sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetType {
    On,
    ForceOff,
    GracefulShutdown,
    ForceRestart,
    /// A non-maskable interrupt to the host: a chaos drill's `kernel_panic`.
    Nmi,
}

impl ResetType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetType::On => "On",
            ResetType::ForceOff => "ForceOff",
            ResetType::GracefulShutdown => "GracefulShutdown",
            ResetType::ForceRestart => "ForceRestart",
            ResetType::Nmi => "Nmi",
        }
    }

    /// The operation name errors carry.
    fn operation(self) -> &'static str {
        match self {
            ResetType::On => "power_on",
            ResetType::ForceOff => "power_off",
            ResetType::GracefulShutdown => "power_off_graceful",
            ResetType::ForceRestart => "power_restart",
            ResetType::Nmi => "inject_nmi",
        }
    }

    /// The state the reset leads to, when asking for it in that state is a no-op.
    fn settled_state(self) -> Option<PowerState> {
        match self {
            ResetType::On => Some(PowerState::On),
            ResetType::ForceOff | ResetType::GracefulShutdown => Some(PowerState::Off),
            ResetType::ForceRestart | ResetType::Nmi => None,
        }
    }
}

/// The system's boot source override, as the BMC reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootOverride {
    /// `BootSourceOverrideTarget`: `Pxe`, `Hdd`, `None`, …
    pub target: Option<String>,
    /// `BootSourceOverrideEnabled`: `Once`, `Continuous` or `Disabled`.
    pub enabled: Option<String>,
}

/// A Redfish BMC. Cheap to share behind an `Arc`; calls may run concurrently (in session
/// mode they take turns on the one session).
#[derive(Debug)]
pub struct RedfishBmc {
    /// The address as configured: what errors name.
    bmc: String,
    base: Url,
    username: String,
    password: Secret,
    auth: RedfishAuth,
    system_id: Option<String>,
    verify_tls: bool,
    timeout: Duration,
    client: reqwest::Client,
    /// Found on first use; forgotten on any 404 so a renumbered BMC is found again.
    system: Mutex<Option<SystemLinks>>,
    session: Mutex<Option<Session>>,
}

#[derive(Clone, Debug)]
struct SystemLinks {
    path: String,
    reset_target: String,
    reset_types: Option<Vec<String>>,
}

#[derive(Debug)]
struct Session {
    token: Secret,
    /// The session's own URI, for logout; `None` when the BMC did not say.
    path: Option<String>,
}

/// Why one call failed, before it is named for the caller.
enum Fault {
    Timeout,
    Failed(String),
}

#[derive(Clone, Copy)]
enum Credential<'a> {
    None,
    Basic,
    Token(&'a Secret),
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl RedfishBmc {
    pub fn new(config: RedfishConfig) -> Result<Self, RedfishConfigError> {
        let base = parse_address(&config.address)?;
        if let Some(system_id) = &config.system_id {
            let bad = |c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace();
            if system_id.is_empty() || system_id.contains(bad) {
                return Err(RedfishConfigError::SystemId {
                    system_id: system_id.clone(),
                });
            }
        }
        if config.timeout.is_zero() {
            return Err(RedfishConfigError::Timeout);
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(1)
            .redirect(same_origin_redirects());
        if !config.verify_tls {
            tracing::warn!(bmc = %config.address, "redfish: tls certificate verification is off");
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(path) = &config.ca_file {
            builder = crate::runtime::http_client::trust_only_ca_file(builder, path).map_err(
                |reason| RedfishConfigError::CaFile {
                    path: path.clone(),
                    reason,
                },
            )?;
        }
        let client = builder
            .build()
            .map_err(|error| RedfishConfigError::Client {
                reason: error_chain(&error),
            })?;
        Ok(RedfishBmc {
            bmc: config.address.trim().to_string(),
            base,
            username: config.username,
            password: config.password,
            auth: config.auth,
            system_id: config.system_id,
            verify_tls: config.verify_tls,
            timeout: config.timeout,
            client,
            system: Mutex::new(None),
            session: Mutex::new(None),
        })
    }

    /// Finds the system (once) and returns its path, e.g. `/redfish/v1/Systems/1`.
    pub async fn discover(&self) -> Result<String, BmcError> {
        self.run("discover", async { Ok(self.system().await?.path) })
            .await
    }

    /// Asks the operating system to shut down (ACPI). Not for fencing: use `power_off`.
    pub async fn power_off_graceful(&self) -> Result<(), BmcError> {
        self.reset(ResetType::GracefulShutdown).await
    }

    /// Hard reset (`ForceRestart`).
    pub async fn power_restart(&self) -> Result<(), BmcError> {
        self.reset(ResetType::ForceRestart).await
    }

    /// Posts `ComputerSystem.Reset` with `kind`. Asking for the state the system is
    /// already in succeeds even on BMCs that answer that with a 4xx.
    pub async fn reset(&self, kind: ResetType) -> Result<(), BmcError> {
        self.run(kind.operation(), self.reset_system(kind)).await
    }

    /// The boot source override the BMC reports now.
    pub async fn boot_override(&self) -> Result<BootOverride, BmcError> {
        self.run("boot_override", async {
            let links = self.system().await?;
            let resource = self.get_json(&links.path).await?;
            let field = |name: &str| {
                resource
                    .pointer(&format!("/Boot/{name}"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            Ok(BootOverride {
                target: field("BootSourceOverrideTarget"),
                enabled: field("BootSourceOverrideEnabled"),
            })
        })
        .await
    }

    /// Logs the session out, if there is one. Without it the BMC keeps the session until
    /// its own timeout, and BMCs allow only a few.
    pub async fn close(&self) -> Result<(), BmcError> {
        self.run("close", async {
            let session = self.session.lock().await.take();
            let Some(Session {
                token,
                path: Some(path),
            }) = session
            else {
                return Ok(());
            };
            let reply = self
                .send(Method::DELETE, &path, None, Credential::Token(&token), None)
                .await?;
            // 404: the session had expired or been deleted already; closed all the same.
            if reply.status.is_success() || reply.status == StatusCode::NOT_FOUND {
                tracing::debug!(bmc = %self.bmc, "redfish: session closed");
                Ok(())
            } else {
                Err(failure(&Method::DELETE, &path, &reply, &[token.expose()]))
            }
        })
        .await
    }

    /// Runs one operation within the timeout and names its failure.
    async fn run<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, Fault>>,
    ) -> Result<T, BmcError> {
        let outcome = tokio::time::timeout(self.timeout, work).await;
        let fault = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(fault)) => fault,
            Err(_elapsed) => Fault::Timeout,
        };
        let error = match fault {
            Fault::Timeout => BmcError::Timeout {
                bmc: self.bmc.clone(),
                operation,
            },
            Fault::Failed(detail) => BmcError::Failed {
                bmc: self.bmc.clone(),
                operation,
                detail: redact(&detail, &[self.password.expose()]),
            },
        };
        tracing::debug!(error = %error, "redfish: call failed");
        Err(error)
    }

    async fn read_power_state(&self) -> Result<PowerState, Fault> {
        let links = self.system().await?;
        let resource = self.get_json(&links.path).await?;
        power_state_of(&resource)
            .map_err(|reason| Fault::Failed(format!("GET {}: {reason}", links.path)))
    }

    async fn reset_system(&self, kind: ResetType) -> Result<(), Fault> {
        let links = self.system().await?;
        if let Some(offered) = &links.reset_types {
            if !offered.iter().any(|offer| offer == kind.as_str()) {
                return Err(Fault::Failed(format!(
                    "the bmc does not offer ResetType {} for {} (it offers {})",
                    kind.as_str(),
                    links.path,
                    if offered.is_empty() {
                        "none".to_string()
                    } else {
                        offered.join(", ")
                    }
                )));
            }
        }
        let body = json!({ "ResetType": kind.as_str() });
        let reply = self
            .request(Method::POST, &links.reset_target, Some(&body), None)
            .await?;
        if reply.status.is_success() {
            return Ok(());
        }
        let refused = failure(&Method::POST, &links.reset_target, &reply, &[]);
        // Some BMCs refuse `On` when on and `ForceOff` when off; that is done, not failed.
        let state_conflict = reply.status.is_client_error()
            && !matches!(
                reply.status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
            );
        if let (true, Some(wanted)) = (state_conflict, kind.settled_state()) {
            let resource = self.get_json(&links.path).await?;
            if power_state_of(&resource).ok() == Some(wanted) {
                return Ok(());
            }
        }
        Err(refused)
    }

    async fn set_boot_pxe_once(&self) -> Result<(), Fault> {
        let links = self.system().await?;
        let body = json!({
            "Boot": { "BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once" }
        });
        let reply = self
            .request(Method::PATCH, &links.path, Some(&body), None)
            .await?;
        if reply.status.is_success() {
            return Ok(());
        }
        if reply.status != StatusCode::PRECONDITION_REQUIRED {
            return Err(failure(&Method::PATCH, &links.path, &reply, &[]));
        }
        // 428: this BMC wants the resource's current ETag in If-Match.
        let current = self.request(Method::GET, &links.path, None, None).await?;
        if !current.status.is_success() {
            return Err(failure(&Method::GET, &links.path, &current, &[]));
        }
        let etag = match current.headers.get(ETAG).and_then(|v| v.to_str().ok()) {
            Some(etag) => etag.to_string(),
            None => parse_json(&Method::GET, &links.path, &current)?
                .get("@odata.etag")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    Fault::Failed(format!(
                        "PATCH {}: http 428 Precondition Required, and the system has no ETag",
                        links.path
                    ))
                })?,
        };
        let reply = self
            .request(Method::PATCH, &links.path, Some(&body), Some(&etag))
            .await?;
        if reply.status.is_success() {
            Ok(())
        } else {
            Err(failure(&Method::PATCH, &links.path, &reply, &[]))
        }
    }

    /// The system's links, found on first use.
    async fn system(&self) -> Result<SystemLinks, Fault> {
        if let Some(links) = self.system.lock().await.as_ref() {
            return Ok(links.clone());
        }
        // Not holding the lock across I/O: two concurrent first calls both discover, and
        // find the same thing.
        let path = match &self.system_id {
            Some(system_id) => format!("{SYSTEMS_PATH}/{system_id}"),
            None => self.first_system().await?,
        };
        let resource = self.get_json(&path).await?;
        let path = resource
            .get("@odata.id")
            .and_then(Value::as_str)
            .and_then(|reference| self.local_path(reference))
            .unwrap_or(path);
        let reset = resource.pointer("/Actions/#ComputerSystem.Reset");
        let reset_target = reset
            .and_then(|action| action.get("target"))
            .and_then(Value::as_str)
            .and_then(|reference| self.local_path(reference))
            .unwrap_or_else(|| format!("{path}/Actions/ComputerSystem.Reset"));
        let reset_types = reset
            .and_then(|action| action.get("ResetType@Redfish.AllowableValues"))
            .and_then(Value::as_array)
            .map(|values| {
                values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            });
        let links = SystemLinks {
            path,
            reset_target,
            reset_types,
        };
        *self.system.lock().await = Some(links.clone());
        Ok(links)
    }

    async fn first_system(&self) -> Result<String, Fault> {
        let collection = self.get_json(SYSTEMS_PATH).await?;
        let members = collection
            .get("Members")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Fault::Failed(format!(
                    "GET {SYSTEMS_PATH}: the answer has no Members list"
                ))
            })?;
        let first = members.first().ok_or_else(|| {
            Fault::Failed(format!("GET {SYSTEMS_PATH}: the bmc lists no systems"))
        })?;
        let path = first
            .get("@odata.id")
            .and_then(Value::as_str)
            .and_then(|reference| self.local_path(reference))
            .ok_or_else(|| {
                Fault::Failed(format!(
                    "GET {SYSTEMS_PATH}: the first member has no usable @odata.id"
                ))
            })?;
        if members.len() > 1 {
            tracing::warn!(
                bmc = %self.bmc,
                systems = members.len(),
                chosen = %path,
                "redfish: the bmc lists several systems; using the first (set system_id to choose)"
            );
        }
        Ok(path)
    }

    /// The path of `reference` (a path or URL) when it is on this BMC; `None` otherwise.
    fn local_path(&self, reference: &str) -> Option<String> {
        let url = self.base.join(reference).ok()?;
        if url.origin() != self.base.origin() {
            return None;
        }
        Some(match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        })
    }

    async fn get_json(&self, path: &str) -> Result<Value, Fault> {
        let reply = self.request(Method::GET, path, None, None).await?;
        if !reply.status.is_success() {
            return Err(failure(&Method::GET, path, &reply, &[]));
        }
        parse_json(&Method::GET, path, &reply)
    }

    /// One authenticated request; in session mode a 401 logs in again, once.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Reply, Fault> {
        let reply = match self.auth {
            RedfishAuth::Basic => {
                self.send(method, path, body, Credential::Basic, if_match)
                    .await?
            }
            RedfishAuth::Session => {
                let mut session = self.session.lock().await;
                let reply = self
                    .send_in_session(&mut session, method.clone(), path, body, if_match)
                    .await?;
                if reply.status == StatusCode::UNAUTHORIZED {
                    // Expired or revoked: forget it (nothing to log out) and log in again.
                    tracing::debug!(bmc = %self.bmc, "redfish: session refused; logging in again");
                    *session = None;
                    self.send_in_session(&mut session, method, path, body, if_match)
                        .await?
                } else {
                    reply
                }
            }
        };
        if reply.status == StatusCode::NOT_FOUND {
            self.system.lock().await.take();
        }
        Ok(reply)
    }

    async fn send_in_session(
        &self,
        session: &mut Option<Session>,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Reply, Fault> {
        let session = match session {
            Some(session) => session,
            None => session.insert(self.login().await?),
        };
        let reply = self
            .send(
                method,
                path,
                body,
                Credential::Token(&session.token),
                if_match,
            )
            .await?;
        if !reply.status.is_success() {
            // Redact the token here, the only place that knows it, should the BMC echo it
            // in an error that ends up quoted.
            let token = session.token.expose();
            if String::from_utf8_lossy(&reply.body).contains(token) {
                let body = redact(&String::from_utf8_lossy(&reply.body), &[token]);
                return Ok(Reply {
                    body: body.into_bytes(),
                    ..reply
                });
            }
        }
        Ok(reply)
    }

    async fn login(&self) -> Result<Session, Fault> {
        let body = json!({ "UserName": self.username, "Password": self.password.expose() });
        let reply = self
            .send(
                Method::POST,
                SESSIONS_PATH,
                Some(&body),
                Credential::None,
                None,
            )
            .await?;
        if !reply.status.is_success() {
            let detail = failure_detail(&Method::POST, SESSIONS_PATH, &reply, &[]);
            return Err(Fault::Failed(format!("session login refused: {detail}")));
        }
        let token = reply
            .headers
            .get(AUTH_TOKEN_HEADER)
            .and_then(|value| value.to_str().ok())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                Fault::Failed(format!(
                    "POST {SESSIONS_PATH}: session login answered without an {AUTH_TOKEN_HEADER} header"
                ))
            })?;
        let path = reply
            .headers
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                serde_json::from_slice::<Value>(&reply.body)
                    .ok()?
                    .get("@odata.id")?
                    .as_str()
                    .map(str::to_string)
            })
            .and_then(|reference| self.local_path(&reference));
        tracing::debug!(bmc = %self.bmc, "redfish: session opened");
        Ok(Session {
            token: Secret::new(token),
            path,
        })
    }

    /// One HTTP exchange, body read to the end within [`RESPONSE_BYTES_MAX`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        credential: Credential<'_>,
        if_match: Option<&str>,
    ) -> Result<Reply, Fault> {
        let url = self
            .base
            .join(path)
            .map_err(|error| Fault::Failed(format!("{method} {path}: bad path: {error}")))?;
        let mut request = self
            .client
            .request(method.clone(), url)
            .header(ACCEPT, "application/json");
        request = match credential {
            Credential::None => request,
            Credential::Basic => request.basic_auth(&self.username, Some(self.password.expose())),
            Credential::Token(token) => request.header(AUTH_TOKEN_HEADER, token.expose()),
        };
        if let Some(etag) = if_match {
            request = request.header(IF_MATCH, etag);
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let mut response = request
            .send()
            .await
            .map_err(|error| self.transport_fault(&method, path, error))?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.transport_fault(&method, path, error))?
        {
            if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                return Err(Fault::Failed(format!(
                    "{method} {path}: answer exceeds {RESPONSE_BYTES_MAX} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn transport_fault(&self, method: &Method, path: &str, error: reqwest::Error) -> Fault {
        if error.is_timeout() {
            return Fault::Timeout;
        }
        let chain = error_chain(&error.without_url());
        let hint = if self.verify_tls && chain.contains("certificate") {
            " (give the bmc's CA as ca_file, or turn verify_tls off for a lab bmc)"
        } else {
            ""
        };
        Fault::Failed(format!("{method} {path}: {chain}{hint}"))
    }
}

#[async_trait]
impl Bmc for RedfishBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.run("power_state", self.read_power_state()).await
    }

    async fn power_on(&self) -> Result<(), BmcError> {
        self.reset(ResetType::On).await
    }

    /// `ForceOff`: fencing cannot wait for an operating system that may be hung.
    async fn power_off(&self) -> Result<(), BmcError> {
        self.reset(ResetType::ForceOff).await
    }

    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.power_off_graceful().await
    }

    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.run("set_next_boot_pxe", self.set_boot_pxe_once())
            .await
    }

    /// True for every Redfish BMC: whether this one offers `Nmi` is in its system's
    /// `ResetType@Redfish.AllowableValues`, read when the NMI is sent (and refused then,
    /// before anything is posted, when it is not offered).
    fn supports_nmi(&self) -> bool {
        true
    }

    async fn inject_nmi(&self) -> Result<(), BmcError> {
        self.reset(ResetType::Nmi).await
    }
}

impl Drop for RedfishBmc {
    /// Logs the session out in the background, best-effort: without a runtime, or if it
    /// fails, the BMC expires the session on its own.
    fn drop(&mut self) {
        let Some(Session {
            token,
            path: Some(path),
        }) = self.session.get_mut().take()
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(url) = self.base.join(&path) else {
            return;
        };
        let request = self
            .client
            .delete(url)
            .header(AUTH_TOKEN_HEADER, token.expose())
            .timeout(self.timeout);
        runtime.spawn(async move {
            let _ = request.send().await;
        });
    }
}

/// `host[:port]` → `https://host[:port]/`; a full `http(s)://` URL is kept.
fn parse_address(address: &str) -> Result<Url, RedfishConfigError> {
    let invalid = |reason: String| RedfishConfigError::Address { reason };
    let address = address.trim();
    if address.is_empty() {
        return Err(invalid("empty".into()));
    }
    let url_text = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let url = Url::parse(&url_text).map_err(|error| {
        // The text may hold credentials someone put there by mistake: name it only when
        // it cannot.
        if address.contains('@') {
            invalid(error.to_string())
        } else {
            invalid(format!("{address:?}: {error}"))
        }
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials belong in username and password, not in the address".into(),
        ));
    }
    if !matches!(url.scheme(), "https" | "http") {
        return Err(invalid(format!(
            "{address:?}: scheme {:?} is neither https nor http",
            url.scheme()
        )));
    }
    if url.host_str().unwrap_or_default().is_empty() {
        return Err(invalid(format!("{address:?}: no host")));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "{address:?}: expected host[:port] or https://host[:port], without a path"
        )));
    }
    Ok(url)
}

/// Follows at most [`REDIRECTS_MAX`] redirects, and only within the BMC's origin: the
/// session token header is not one reqwest strips on a cross-origin redirect.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > REDIRECTS_MAX {
            return attempt.error("too many redirects");
        }
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if same_origin {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Why a system resource's `PowerState` says nothing usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum PowerStateError {
    #[error("unknown PowerState {0:?}")]
    Unknown(String),
    #[error("the system reports no PowerState")]
    Missing,
    /// The JSON value as it was sent.
    #[error("PowerState is not a string: {0}")]
    NotAString(String),
}

/// Only `Off` is off: a system powering off (or paused) is not fenced yet.
fn power_state_of(resource: &Value) -> Result<PowerState, PowerStateError> {
    match resource.get("PowerState") {
        Some(Value::String(state)) => match state.as_str() {
            "Off" => Ok(PowerState::Off),
            "On" | "PoweringOn" | "PoweringOff" | "Paused" => Ok(PowerState::On),
            other => Err(PowerStateError::Unknown(other.to_string())),
        },
        Some(Value::Null) | None => Err(PowerStateError::Missing),
        Some(other) => Err(PowerStateError::NotAString(other.to_string())),
    }
}

fn parse_json(method: &Method, path: &str, reply: &Reply) -> Result<Value, Fault> {
    let value: Value = serde_json::from_slice(&reply.body).map_err(|error| {
        Fault::Failed(format!(
            "{method} {path}: invalid json in the answer (http {}): {error}",
            reply.status
        ))
    })?;
    if !value.is_object() {
        return Err(Fault::Failed(format!(
            "{method} {path}: the answer is json but not an object"
        )));
    }
    Ok(value)
}

/// A refused request: its status and what the BMC said about it.
fn failure(method: &Method, path: &str, reply: &Reply, secrets: &[&str]) -> Fault {
    Fault::Failed(failure_detail(method, path, reply, secrets))
}

fn failure_detail(method: &Method, path: &str, reply: &Reply, secrets: &[&str]) -> String {
    let mut detail = format!("{method} {path}: http {}", reply.status);
    if let Some(message) = bmc_message(&reply.body) {
        detail.push_str(": ");
        detail.push_str(&message);
    }
    redact(&detail, secrets)
}

/// The BMC's own words from an error body: Redfish `error.message` and the messages of
/// `@Message.ExtendedInfo`, or else the body as text; cut to [`MESSAGE_CHARS_MAX`].
fn bmc_message(body: &[u8]) -> Option<String> {
    fn add(parts: &mut Vec<String>, text: &str) {
        let text = text.trim();
        if !text.is_empty() && !parts.iter().any(|part| part == text) {
            parts.push(text.to_string());
        }
    }
    let mut parts: Vec<String> = Vec::new();
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => {
            let error = value.get("error");
            if let Some(message) = error.and_then(|e| e.get("message")).and_then(Value::as_str) {
                add(&mut parts, message);
            }
            let infos = [error, Some(&value)]
                .into_iter()
                .flatten()
                .filter_map(|holder| holder.get("@Message.ExtendedInfo"))
                .filter_map(Value::as_array)
                .flatten();
            // A MessageId says less than a Message: quoted only when nothing else is.
            let mut message_ids = Vec::new();
            for info in infos {
                match info.get("Message").and_then(Value::as_str) {
                    Some(message) => add(&mut parts, message),
                    None => {
                        if let Some(id) = info.get("MessageId").and_then(Value::as_str) {
                            message_ids.push(id);
                        }
                    }
                }
            }
            if parts.is_empty() {
                for id in message_ids {
                    add(&mut parts, id);
                }
            }
            if parts.is_empty() {
                if let Some(code) = error.and_then(|e| e.get("code")).and_then(Value::as_str) {
                    add(&mut parts, code);
                }
            }
        }
        Err(_) => add(&mut parts, &String::from_utf8_lossy(body)),
    }
    if parts.is_empty() {
        return None;
    }
    let flat: String = parts
        .join("; ")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(if flat.chars().count() > MESSAGE_CHARS_MAX {
        let cut: String = flat.chars().take(MESSAGE_CHARS_MAX).collect();
        format!("{cut}…")
    } else {
        flat
    })
}

fn redact(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_string(), |text, secret| {
            text.replace(secret, REDACTED)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_address(address: &str, expected: Result<&str, &str>) {
        match (parse_address(address), expected) {
            (Ok(url), Ok(want)) => assert_eq!(url.as_str(), want, "{address}"),
            (Err(error), Err(want)) => {
                let text = error.to_string();
                assert!(text.contains(want), "{address}: {text:?} lacks {want:?}");
            }
            (got, want) => panic!("{address}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn addresses_default_to_https_and_refuse_paths_and_credentials() {
        check_address("10.0.0.5", Ok("https://10.0.0.5/"));
        check_address("bmc-r1-07:8443", Ok("https://bmc-r1-07:8443/"));
        check_address("[fd00::5]:443", Ok("https://[fd00::5]/"));
        check_address("https://10.0.0.5/", Ok("https://10.0.0.5/"));
        check_address("http://127.0.0.1:8000", Ok("http://127.0.0.1:8000/"));
        check_address("", Err("empty"));
        check_address("ftp://10.0.0.5", Err("neither https nor http"));
        check_address("https://10.0.0.5/redfish/v1", Err("without a path"));
        check_address("https://root:calvin@10.0.0.5", Err("credentials belong"));
        check_address("10.0.0.5:notaport", Err("invalid port"));
    }

    #[test]
    fn config_debug_hides_the_password() {
        let config = RedfishConfig::new("10.0.0.5", "root", "calvin-Hx7");
        let text = format!("{config:?}");
        assert!(
            text.contains("***") && !text.contains("calvin-Hx7"),
            "{text}"
        );
    }

    #[test]
    fn bad_system_ids_and_zero_timeouts_are_refused() {
        let mut config = RedfishConfig::new("10.0.0.5", "root", "pw");
        config.system_id = Some("../Managers/1".into());
        assert!(matches!(
            RedfishBmc::new(config.clone()),
            Err(RedfishConfigError::SystemId { .. })
        ));
        config.system_id = None;
        config.timeout = Duration::ZERO;
        assert!(matches!(
            RedfishBmc::new(config),
            Err(RedfishConfigError::Timeout)
        ));
    }

    fn check_message(body: &str, expected: Option<&str>) {
        assert_eq!(bmc_message(body.as_bytes()).as_deref(), expected, "{body}");
    }

    #[test]
    fn bmc_messages_come_from_redfish_error_bodies() {
        check_message(
            r#"{"error":{"code":"Base.1.0.GeneralError","message":"See ExtendedInfo",
               "@Message.ExtendedInfo":[{"MessageId":"Base.1.8.PropertyValueNotInList",
               "Message":"The value Pxe for BootSourceOverrideTarget is not allowed."}]}}"#,
            Some("See ExtendedInfo; The value Pxe for BootSourceOverrideTarget is not allowed."),
        );
        check_message(
            r#"{"@Message.ExtendedInfo":[{"MessageId":"Base.1.0.Conflict"}]}"#,
            Some("Base.1.0.Conflict"),
        );
        check_message(
            r#"{"error":{"code":"Base.1.0.GeneralError"}}"#,
            Some("Base.1.0.GeneralError"),
        );
        check_message(
            "<html>\n<b>Unauthorized</b>\n</html>",
            Some("<html> <b>Unauthorized</b> </html>"),
        );
        check_message("", None);
        let long = "x".repeat(MESSAGE_CHARS_MAX * 2);
        let cut = bmc_message(long.as_bytes()).unwrap();
        assert_eq!(cut.chars().count(), MESSAGE_CHARS_MAX + 1);
    }

    #[test]
    fn failures_redact_secrets_the_bmc_echoes() {
        let reply = Reply {
            status: StatusCode::UNAUTHORIZED,
            headers: HeaderMap::new(),
            body: br#"{"error":{"message":"bad password hunter2 for root"}}"#.to_vec(),
        };
        let detail = failure_detail(&Method::GET, "/redfish/v1/Systems", &reply, &["hunter2"]);
        assert_eq!(
            detail,
            "GET /redfish/v1/Systems: http 401 Unauthorized: bad password [redacted] for root"
        );
    }

    #[test]
    fn only_off_counts_as_off() {
        let check = |state: Value, expected: Result<PowerState, &str>| {
            let got = power_state_of(&json!({ "PowerState": state }));
            match expected {
                Ok(want) => assert_eq!(got, Ok(want)),
                Err(want) => assert!(got.unwrap_err().to_string().contains(want)),
            }
        };
        check(json!("Off"), Ok(PowerState::Off));
        check(json!("On"), Ok(PowerState::On));
        check(json!("PoweringOff"), Ok(PowerState::On));
        check(json!("PoweringOn"), Ok(PowerState::On));
        check(json!(null), Err("no PowerState"));
        check(json!("Sideways"), Err("unknown PowerState"));
        assert!(power_state_of(&json!({})).is_err());
    }
}
