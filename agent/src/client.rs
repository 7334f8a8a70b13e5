//! The boot-protocol client: every call the original `register.sh` and `kexec.sh` made,
//! typed, bounded in time, and with errors that say what went wrong; and the firmware
//! report stage 1 sends after applying an update.

use std::future::Future;
use std::time::Duration;

use bearman_proto::http::{self, HttpUrl};
use bearman_proto::ipxe::{self, BootScript};
use bearman_proto::uuid::NodeUuid;
use bearman_proto::{
    BootProfile, ErrorBody, FirmwareOrder, FirmwareReport, FirmwareReportAnswer, Heartbeat,
    InstalledReport, NetworkDetail, RegisterRequest, RegisterResponse,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::firmware::{self, Instruction};

/// Opens byte streams to the daemon: TCP in production, turmoil in the simulator.
pub trait Connector: Send + Sync {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;
    fn connect(
        &self,
        authority: &str,
    ) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

/// Default bound on one request, connect included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach bearman at {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("{method} {path}: no answer within {timeout:?}")]
    Timeout {
        method: &'static str,
        path: String,
        timeout: Duration,
    },
    #[error("{method} {path}: {source}")]
    Transport {
        method: &'static str,
        path: String,
        source: http::HttpError,
    },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        /// The daemon's error code (`no_flavor`, `identity_mismatch`, …) when it sent one.
        code: Option<String>,
        message: String,
    },
    #[error("{path}: unexpected response: {detail}")]
    Decode { path: String, detail: String },
    #[error("{path}: bad iPXE script: {source}")]
    Script {
        path: String,
        source: ipxe::ScriptError,
    },
    #[error("boot script and profile disagree: {0}")]
    Inconsistent(String),
    /// Bearman recorded this machine but nobody accepted it into the fleet yet.
    #[error("bearman recorded this machine ({uuid}) but it is not accepted yet: an operator runs `bearman node accept {uuid}` (or lists it in [enrollment]); waiting")]
    AwaitingAcceptance { uuid: String },
    /// Bearman wants a firmware update on this machine first, and it must wait for it
    /// (a rollout slot, a paused rollout, too many failures).
    #[error("firmware: waiting: {reason}")]
    FirmwareHold { reason: String },
    /// Bearman ordered a firmware update before anything boots; only stage 1 applies it
    /// ([`BootClient::prepare`]).
    #[error("bearman ordered firmware bundle {bundle} for {component} before booting")]
    FirmwareUpdateOrdered { bundle: String, component: String },
}

impl ClientError {
    /// HTTP status, when the daemon answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What a registration leads to in stage 1.
#[derive(Clone, Debug, PartialEq)]
pub enum Prepared {
    /// Boot stage 2 with this plan.
    Boot(Box<BootPlan>),
    /// Apply this firmware update first. Script, profile and detail were not fetched;
    /// the order was taken out of the registration.
    UpdateFirmware {
        registration: RegisterResponse,
        order: Box<FirmwareOrder>,
    },
    /// Wait (register again after the backoff) for this reason; nothing was fetched.
    HoldFirmware {
        registration: RegisterResponse,
        reason: String,
    },
}

impl Prepared {
    /// What the daemon answered to the registration.
    pub fn registration(&self) -> &RegisterResponse {
        match self {
            Prepared::Boot(plan) => &plan.registration,
            Prepared::UpdateFirmware { registration, .. }
            | Prepared::HoldFirmware { registration, .. } => registration,
        }
    }

    /// What the registration said about firmware (its order taken out of the
    /// registration and held here).
    pub fn firmware_instruction(&self) -> Instruction<'_> {
        match self {
            Prepared::Boot(_) => Instruction::Boot,
            Prepared::UpdateFirmware { order, .. } => Instruction::Update(order),
            Prepared::HoldFirmware { reason, .. } => Instruction::Hold(reason),
        }
    }
}

/// What stage 1 needs to kexec into stage 2.
#[derive(Clone, Debug, PartialEq)]
pub struct BootPlan {
    pub registration: RegisterResponse,
    pub script: BootScript,
    pub profile: BootProfile,
    pub detail: NetworkDetail,
}

/// The part of a boot-protocol answer the agent reads: the node's state as the daemon
/// sees it (read into this and not a whole JSON tree, other fields skipped).
#[derive(serde::Deserialize)]
struct StateReply {
    #[serde(default)]
    state: String,
}

pub struct BootClient<C> {
    connector: C,
    /// `host:port` of the daemon, and its URL's path without a trailing slash: worked
    /// out once, not for every request.
    authority: String,
    base_path: String,
    uuid: NodeUuid,
    timeout: Duration,
}

impl<C: Connector> BootClient<C> {
    /// `base_url` is the daemon's public URL, as passed on the kernel command line
    /// (`bearman.url=`).
    pub fn new(connector: C, base_url: &str, uuid: NodeUuid) -> Result<Self, http::HttpError> {
        let base = HttpUrl::parse(base_url)?;
        Ok(BootClient {
            connector,
            authority: base.authority(),
            base_path: base.path.trim_end_matches('/').to_string(),
            uuid,
            timeout: REQUEST_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn uuid(&self) -> &NodeUuid {
        &self.uuid
    }

    async fn request(
        &self,
        method: &'static str,
        suffix: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response, ClientError> {
        let path = [self.base_path.as_str(), suffix].concat();
        let authority = &self.authority;
        let attempt =
            async {
                let mut stream = self.connector.connect(authority).await.map_err(|source| {
                    ClientError::Connect {
                        authority: authority.clone(),
                        source,
                    }
                })?;
                let headers: &[(&str, &str)] = if body.is_some() {
                    &[("Content-Type", "application/json")]
                } else {
                    &[]
                };
                http::send(
                    &mut stream,
                    method,
                    authority,
                    &path,
                    headers,
                    body.as_deref(),
                )
                .await
                .map_err(|source| ClientError::Transport {
                    method,
                    path: path.clone(),
                    source,
                })
            };
        let response = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ClientError::Timeout {
                method,
                path: path.clone(),
                timeout: self.timeout,
            })??;
        if !response.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&response.body) {
                Ok(error) => (Some(error.error), error.message),
                Err(_) => (None, response.text().chars().take(200).collect()),
            };
            return Err(ClientError::Status {
                method,
                path,
                status: response.status,
                code,
                message,
            });
        }
        Ok(response)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &'static str,
        suffix: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let response = self.request(method, suffix, body).await?;
        serde_json::from_slice(&response.body).map_err(|error| ClientError::Decode {
            path: suffix.to_string(),
            detail: error.to_string(),
        })
    }

    /// `GET /ipxe`: the script every machine chains to.
    pub async fn stage1_script(&self) -> Result<BootScript, ClientError> {
        let response = self.request("GET", "/ipxe", None).await?;
        ipxe::parse(&response.text()).map_err(|source| ClientError::Script {
            path: "/ipxe".into(),
            source,
        })
    }

    /// `POST /ipxe/{uuid}/register`.
    pub async fn register(
        &self,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Decode {
            path: "register".into(),
            detail: e.to_string(),
        })?;
        self.json("POST", &format!("/ipxe/{}/register", self.uuid), Some(body))
            .await
    }

    /// `GET /ipxe/{uuid}`: the target OS script, parsed.
    pub async fn target_script(&self) -> Result<BootScript, ClientError> {
        let path = format!("/ipxe/{}", self.uuid);
        let response = self.request("GET", &path, None).await?;
        ipxe::parse(&response.text()).map_err(|source| ClientError::Script { path, source })
    }

    pub async fn profile(&self) -> Result<BootProfile, ClientError> {
        self.json("GET", &format!("/ipxe/{}/profile", self.uuid), None)
            .await
    }

    pub async fn detail(&self) -> Result<NetworkDetail, ClientError> {
        self.json("GET", &format!("/ipxe/{}/detail", self.uuid), None)
            .await
    }

    /// `POST /ipxe/{uuid}/installed`; returns the state the daemon moved the node to.
    pub async fn installed(&self, report: &InstalledReport) -> Result<String, ClientError> {
        let body = serde_json::to_vec(report).unwrap_or_default();
        let reply: StateReply = self
            .json(
                "POST",
                &format!("/ipxe/{}/installed", self.uuid),
                Some(body),
            )
            .await?;
        Ok(reply.state)
    }

    /// `POST /ipxe/{uuid}/progress`: a boot milestone only the node sees (`stage1`).
    pub async fn progress(&self, phase: &str) -> Result<String, ClientError> {
        let body = serde_json::to_vec(&bearman_proto::BootProgressReport {
            phase: phase.to_string(),
        })
        .unwrap_or_default();
        let reply: StateReply = self
            .json("POST", &format!("/ipxe/{}/progress", self.uuid), Some(body))
            .await?;
        Ok(reply.state)
    }

    /// `POST /ipxe/{uuid}/heartbeat`; returns the node's state as the daemon sees it.
    pub async fn heartbeat(&self, beat: &Heartbeat) -> Result<String, ClientError> {
        let body = serde_json::to_vec(beat).unwrap_or_default();
        let reply: StateReply = self
            .json(
                "POST",
                &format!("/ipxe/{}/heartbeat", self.uuid),
                Some(body),
            )
            .await?;
        Ok(reply.state)
    }

    /// `POST /ipxe/{uuid}/firmware`: what came of a firmware update; the daemon answers
    /// what stage 1 does next (409 when it has no update of that bundle in flight).
    pub async fn report_firmware(
        &self,
        report: &FirmwareReport,
    ) -> Result<FirmwareReportAnswer, ClientError> {
        let body = serde_json::to_vec(report).map_err(|e| ClientError::Decode {
            path: "firmware".into(),
            detail: e.to_string(),
        })?;
        self.json("POST", &format!("/ipxe/{}/firmware", self.uuid), Some(body))
            .await
    }

    /// Stage 1's whole conversation when the machine is to boot: [`BootClient::prepare`],
    /// with a firmware order or hold as an error (only stage 1 applies updates).
    pub async fn prepare_boot(&self, request: &RegisterRequest) -> Result<BootPlan, ClientError> {
        match self.prepare(request).await? {
            Prepared::Boot(plan) => Ok(*plan),
            Prepared::UpdateFirmware { order, .. } => Err(ClientError::FirmwareUpdateOrdered {
                bundle: order.bundle,
                component: order.component,
            }),
            Prepared::HoldFirmware { reason, .. } => Err(ClientError::FirmwareHold { reason }),
        }
    }

    /// Stage 1's conversation, in the original's order: register, then (unless the
    /// registration orders a firmware update or a wait) the target script, profile and
    /// detail. The script and profile must name the same kernel.
    pub async fn prepare(&self, request: &RegisterRequest) -> Result<Prepared, ClientError> {
        let mut registration = self.register(request).await?;
        if registration.awaiting_acceptance {
            return Err(ClientError::AwaitingAcceptance {
                uuid: registration.uuid,
            });
        }
        match firmware::instruction(&registration) {
            Instruction::Boot => {}
            Instruction::Hold(reason) => {
                let reason = reason.to_string();
                return Ok(Prepared::HoldFirmware {
                    registration,
                    reason,
                });
            }
            Instruction::Update(order) => {
                let order = Box::new(order.clone());
                registration.firmware_update = None;
                return Ok(Prepared::UpdateFirmware {
                    registration,
                    order,
                });
            }
        }
        let script = self.target_script().await?;
        let profile = self.profile().await?;
        let detail = self.detail().await?;
        let kernel = script.kernel.as_ref().ok_or_else(|| {
            ClientError::Inconsistent("the target script does not boot a kernel".into())
        })?;
        if kernel.url != profile.kernel.url {
            return Err(ClientError::Inconsistent(format!(
                "script kernel {} but profile kernel {}",
                kernel.url, profile.kernel.url
            )));
        }
        Ok(Prepared::Boot(Box::new(BootPlan {
            registration,
            script,
            profile,
            detail,
        })))
    }
}
