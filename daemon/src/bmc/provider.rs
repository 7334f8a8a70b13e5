//! The production `BmcProvider`: maps a node's `BmcConfig` (driver, address,
//! credentials_ref) to a guarded driver — IPMI (`ipmitool`) or Redfish; QMP (QEMU VMs)
//! only when `bmc.qmp_socket_dir` names the directory its sockets must live in (smoke
//! boots, labs); the simulator's BMC is always refused.
//!
//! Architecture invariant: every driver handed out is wrapped in `bmc::guard`, so the
//! per-BMC lock, the fleet-wide limit and the call bound hold whoever asks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::credentials::CredentialError;
use super::credentials::{CredentialSource, Credentials};
use super::guard::{GuardLimits, GuardedBmc, Guards};
use super::ipmi::{
    BmcAddress, BmcAddressError, IpmiBmc, IpmiSettings, IpmiSettingsError, IPMI_PORT_DEFAULT,
};
use super::qmp::QmpBmc;
use super::redfish::{RedfishAuth, RedfishBmc, RedfishConfig, RedfishConfigError};
use super::{Bmc, BmcError, BmcProvider};
use crate::core::model::{BmcConfig, BmcDriver, Node};

/// BMC settings (the `[bmc]` table of the daemon's configuration file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BmcSettings {
    /// TOML file for `file:KEY` credentials: `[KEY]` tables with `username` and
    /// `password`. Must not be readable by group or others.
    pub secrets_file: Option<PathBuf>,
    /// BMC calls in flight at once across the whole fleet.
    pub concurrent_max: usize,
    /// Longest a call waits for its BMC's earlier calls and a fleet-wide slot.
    pub queue_timeout_ms: u64,
    /// Longest one call (with the driver's own retries) may take; then it is cancelled.
    pub call_timeout_ms: u64,
    /// Readbacks after a power command before it counts as failed (`bearman bmc`).
    pub readbacks_max: u32,
    /// Wait before the first readback; doubled up to 8× for later ones.
    pub readback_backoff_ms: u64,
    pub ipmi: IpmiSettings,
    /// Cipher suite for BMCs that refuse `ipmi.cipher_suite`, by address as configured on
    /// the node (`host` or `host:port`) or by host alone.
    pub ipmi_cipher_suites: BTreeMap<String, u8>,
    pub redfish: RedfishSettings,
    /// Directory of QEMU QMP sockets. Unset (the default), the `qmp` driver is refused;
    /// set, a `qmp` node's BMC address names a socket inside it (`node1.qmp`, or an
    /// absolute path under it) and Bearman drives that VM like a server. For smoke boots
    /// and labs: QMP has no authentication, so the directory is the whole access control.
    pub qmp_socket_dir: Option<PathBuf>,
}

/// How Redfish BMCs are spoken to (the `[bmc.redfish]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedfishSettings {
    /// Verify BMC certificates; `false` only for lab BMCs with self-signed ones.
    pub verify_tls: bool,
    /// PEM file of the CA that signs the BMCs' certificates (then only it is trusted).
    pub ca_file: Option<PathBuf>,
    /// Log in once per driver (`X-Auth-Token`) instead of HTTP Basic on every request.
    pub session_auth: bool,
    /// Bound on one Redfish call, every request in it included.
    pub timeout_ms: u64,
}

impl Default for RedfishSettings {
    fn default() -> Self {
        RedfishSettings {
            verify_tls: true,
            ca_file: None,
            session_auth: false,
            timeout_ms: 20_000,
        }
    }
}

impl Default for BmcSettings {
    fn default() -> Self {
        BmcSettings {
            secrets_file: None,
            concurrent_max: 32,
            queue_timeout_ms: 120_000,
            call_timeout_ms: 60_000,
            readbacks_max: 8,
            readback_backoff_ms: 1_000,
            ipmi: IpmiSettings::default(),
            ipmi_cipher_suites: BTreeMap::new(),
            redfish: RedfishSettings::default(),
            qmp_socket_dir: None,
        }
    }
}

/// Why `[bmc]` settings were refused; each message names the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BmcSettingsError {
    #[error(transparent)]
    Ipmi(#[from] IpmiSettingsError),
    #[error("{key} {value} is outside {min}-{max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("bmc.call_timeout_ms {call_timeout_ms} must be at least what one IPMI call may take with its retries ({ipmi_bound_ms} ms) and at most 3600000")]
    CallTimeout {
        call_timeout_ms: u64,
        ipmi_bound_ms: u128,
    },
    #[error("bmc.redfish.timeout_ms {timeout_ms} must be above 0 and at most bmc.call_timeout_ms ({call_timeout_ms})")]
    RedfishTimeout {
        timeout_ms: u64,
        call_timeout_ms: u64,
    },
    #[error("bmc.qmp_socket_dir {} must be an absolute path", dir.display())]
    QmpSocketDirRelative { dir: PathBuf },
    #[error("bmc.ipmi_cipher_suites: {suite} for {address} is not an IPMI v2 cipher suite (0-17)")]
    CipherSuite { address: String, suite: u8 },
}

impl BmcSettings {
    pub fn validate(&self) -> Result<(), BmcSettingsError> {
        self.ipmi.validate()?;
        let within = |key, value: u64, min, max| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(BmcSettingsError::OutOfRange {
                    key,
                    value,
                    min,
                    max,
                })
            }
        };
        within("bmc.concurrent_max", self.concurrent_max as u64, 1, 4096)?;
        within(
            "bmc.queue_timeout_ms",
            self.queue_timeout_ms,
            1_000,
            3_600_000,
        )?;
        let ipmi_bound = self.ipmi.call_bound();
        if Duration::from_millis(self.call_timeout_ms) < ipmi_bound
            || self.call_timeout_ms > 3_600_000
        {
            return Err(BmcSettingsError::CallTimeout {
                call_timeout_ms: self.call_timeout_ms,
                ipmi_bound_ms: ipmi_bound.as_millis(),
            });
        }
        within("bmc.readbacks_max", self.readbacks_max.into(), 1, 100)?;
        within(
            "bmc.readback_backoff_ms",
            self.readback_backoff_ms,
            10,
            60_000,
        )?;
        if self.redfish.timeout_ms == 0 || self.redfish.timeout_ms > self.call_timeout_ms {
            return Err(BmcSettingsError::RedfishTimeout {
                timeout_ms: self.redfish.timeout_ms,
                call_timeout_ms: self.call_timeout_ms,
            });
        }
        if let Some(dir) = &self.qmp_socket_dir {
            if !dir.is_absolute() {
                return Err(BmcSettingsError::QmpSocketDirRelative { dir: dir.clone() });
            }
        }
        if let Some((address, suite)) = self.ipmi_cipher_suites.iter().find(|(_, s)| **s > 17) {
            return Err(BmcSettingsError::CipherSuite {
                address: address.clone(),
                suite: *suite,
            });
        }
        Ok(())
    }

    pub fn guard_limits(&self) -> GuardLimits {
        GuardLimits {
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            call_timeout: Duration::from_millis(self.call_timeout_ms),
        }
    }

    pub fn readback_backoff(&self) -> Duration {
        Duration::from_millis(self.readback_backoff_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("node {node} has no BMC address")]
    NoAddress { node: String },
    #[error("node {node} has no BMC driver set (ipmi or redfish)")]
    NoDriver { node: String },
    #[error("node {node}: {reason}")]
    Address { node: String, reason: AddressError },
    #[error("node {node}: bmc credentials: {reason}")]
    Credentials {
        node: String,
        reason: CredentialError,
    },
    #[error("node {node}: the {driver} BMC driver is not available in production: {why}")]
    NotAvailable {
        node: String,
        driver: &'static str,
        why: &'static str,
    },
}

/// Why a node's BMC address cannot be used by its driver.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error(transparent)]
    Ipmi(#[from] BmcAddressError),
    #[error(transparent)]
    Redfish(#[from] RedfishConfigError),
    #[error(transparent)]
    Qmp(#[from] QmpSocketError),
}

/// Why a `qmp` address names no socket the daemon may use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QmpSocketError {
    #[error("bmc.qmp_socket_dir is not set")]
    DirUnset,
    #[error("qmp socket {address} is not directly in bmc.qmp_socket_dir {}", dir.display())]
    OutsideDir { address: String, dir: PathBuf },
    #[error(
        "qmp socket name {address:?}: use a file name of [A-Za-z0-9._-] inside bmc.qmp_socket_dir"
    )]
    BadName { address: String },
}

/// How errors and logs name a node: its hostname, else its uuid.
pub fn node_label(node: &Node) -> String {
    if node.hostname.is_empty() {
        node.uuid.to_string()
    } else {
        node.hostname.clone()
    }
}

pub fn driver_name(driver: Option<BmcDriver>) -> &'static str {
    match driver {
        None => "-",
        Some(BmcDriver::Ipmi) => "ipmi",
        Some(BmcDriver::Redfish) => "redfish",
        Some(BmcDriver::Qmp) => "qmp",
        Some(BmcDriver::Sim) => "sim",
    }
}

/// Real BMC drivers behind the guards.
pub struct DriverBmcs {
    settings: BmcSettings,
    credentials: CredentialSource,
    guards: Guards,
}

impl DriverBmcs {
    /// Checks `settings` and sets up the guards (a fleet-wide limit of its own).
    pub fn new(settings: BmcSettings) -> Result<DriverBmcs, BmcSettingsError> {
        let permits = Arc::new(Semaphore::new(settings.concurrent_max.max(1)));
        DriverBmcs::with_permits(settings, permits)
    }

    /// As [`DriverBmcs::new`], sharing `permits` (the fleet-wide limit) with others.
    pub fn with_permits(
        settings: BmcSettings,
        permits: Arc<Semaphore>,
    ) -> Result<DriverBmcs, BmcSettingsError> {
        settings.validate()?;
        Ok(DriverBmcs {
            credentials: CredentialSource::new(settings.secrets_file.clone()),
            guards: Guards::with_permits(permits, settings.guard_limits()),
            settings,
        })
    }

    /// Counts and times every BMC call in `metrics` (`GET /metrics`).
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> DriverBmcs {
        self.guards = self.guards.with_metrics(metrics);
        self
    }

    pub fn settings(&self) -> &BmcSettings {
        &self.settings
    }

    /// The guarded driver for the BMC described by `config`, on the node named `node`;
    /// credentials are resolved from its `credentials_ref`.
    pub fn connect(&self, node: &str, config: &BmcConfig) -> Result<Arc<GuardedBmc>, ConnectError> {
        // Refuse what cannot work before touching any secret.
        if self.driver_checks(node, config)? == BmcDriver::Qmp {
            // QMP has no credentials: the socket directory's permissions are its access control.
            let nobody = Credentials {
                username: String::new(),
                password: super::credentials::Secret::new(""),
            };
            return self.connect_with(node, config, nobody);
        }
        let credentials = self
            .credentials
            .resolve(config.credentials_ref.as_deref())
            .map_err(|error| ConnectError::Credentials {
                node: node.to_string(),
                reason: error,
            })?;
        self.connect_with(node, config, credentials)
    }

    /// As [`DriverBmcs::connect`], with credentials resolved by the caller.
    pub fn connect_with(
        &self,
        node: &str,
        config: &BmcConfig,
        credentials: Credentials,
    ) -> Result<Arc<GuardedBmc>, ConnectError> {
        let driver = self.driver_checks(node, config)?;
        let text = config.address.as_deref().unwrap_or("").trim();
        let address_error = |reason: AddressError| ConnectError::Address {
            node: node.to_string(),
            reason,
        };
        match driver {
            BmcDriver::Ipmi => {
                let address = BmcAddress::parse(text, IPMI_PORT_DEFAULT)
                    .map_err(|error| address_error(error.into()))?;
                let key = address.key();
                let name = format!("{node} at {key}");
                let mut settings = self.settings.ipmi.clone();
                if let Some(suite) = self
                    .settings
                    .ipmi_cipher_suites
                    .get(text)
                    .or_else(|| self.settings.ipmi_cipher_suites.get(&address.host))
                {
                    settings.cipher_suite = *suite;
                }
                let inner: Arc<dyn Bmc> =
                    Arc::new(IpmiBmc::new(&name, address, credentials, settings));
                Ok(Arc::new(self.guards.guard(&key, &name, "ipmi", inner)))
            }
            BmcDriver::Redfish => {
                let settings = &self.settings.redfish;
                let mut config =
                    RedfishConfig::new(text, credentials.username, credentials.password.expose());
                config.verify_tls = settings.verify_tls;
                config.ca_file = settings.ca_file.clone();
                config.auth = if settings.session_auth {
                    RedfishAuth::Session
                } else {
                    RedfishAuth::Basic
                };
                config.timeout = Duration::from_millis(settings.timeout_ms);
                let inner: Arc<dyn Bmc> =
                    Arc::new(RedfishBmc::new(config).map_err(|error| address_error(error.into()))?);
                let key = redfish_key(text);
                let name = format!("{node} at {key}");
                Ok(Arc::new(self.guards.guard(&key, &name, "redfish", inner)))
            }
            BmcDriver::Qmp => {
                let socket = self
                    .qmp_socket(text)
                    .map_err(|error| address_error(error.into()))?;
                let key = format!("qmp:{}", socket.display());
                let name = format!("{node} at {key}");
                let timeout = Duration::from_millis(self.settings.call_timeout_ms)
                    .min(super::qmp::QMP_TIMEOUT_DEFAULT);
                let inner: Arc<dyn Bmc> = Arc::new(QmpBmc::new(socket, timeout));
                Ok(Arc::new(self.guards.guard(&key, &name, "qmp", inner)))
            }
            other => Err(unavailable(node, other)),
        }
    }

    /// The socket a `qmp` address names: a plain file name inside `bmc.qmp_socket_dir`, or
    /// an absolute path that lies directly in it. Nothing else, so a node record cannot
    /// point the daemon at an arbitrary unix socket.
    fn qmp_socket(&self, address: &str) -> Result<PathBuf, QmpSocketError> {
        let Some(dir) = &self.settings.qmp_socket_dir else {
            return Err(QmpSocketError::DirUnset);
        };
        let path = Path::new(address);
        let name = if path.is_absolute() {
            if path.parent() != Some(dir.as_path()) {
                return Err(QmpSocketError::OutsideDir {
                    address: address.to_string(),
                    dir: dir.clone(),
                });
            }
            path.file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("")
        } else {
            address
        };
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !plain {
            return Err(QmpSocketError::BadName {
                address: address.to_string(),
            });
        }
        Ok(dir.join(name))
    }

    /// The node's driver, if this build can drive it and the node says where its BMC is.
    fn driver_checks(&self, node: &str, config: &BmcConfig) -> Result<BmcDriver, ConnectError> {
        let driver = config.driver.ok_or_else(|| ConnectError::NoDriver {
            node: node.to_string(),
        })?;
        let allowed = match driver {
            BmcDriver::Ipmi | BmcDriver::Redfish => true,
            BmcDriver::Qmp => self.settings.qmp_socket_dir.is_some(),
            BmcDriver::Sim => false,
        };
        if !allowed {
            return Err(unavailable(node, driver));
        }
        if config.address.as_deref().unwrap_or("").trim().is_empty() {
            return Err(ConnectError::NoAddress {
                node: node.to_string(),
            });
        }
        Ok(driver)
    }
}

/// The lock key of a Redfish BMC: `host:port` whichever way the address was written, so
/// `bmc1`, `bmc1:443` and `https://bmc1/` take turns as the one BMC they are.
fn redfish_key(address: &str) -> String {
    let (rest, port) = match address.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (rest, 80),
        Some((_, rest)) => (rest, 443),
        None => (address, 443),
    };
    let rest = rest.trim_end_matches('/');
    BmcAddress::parse(rest, port)
        .map(|address| address.key().to_ascii_lowercase())
        .unwrap_or_else(|_| address.to_string())
}

fn unavailable(node: &str, driver: BmcDriver) -> ConnectError {
    let why = match driver {
        BmcDriver::Ipmi | BmcDriver::Redfish => "unreachable: built in",
        BmcDriver::Qmp => {
            "QMP drives QEMU VMs (smoke boots, labs); set bmc.qmp_socket_dir to allow it"
        }
        BmcDriver::Sim => "the simulator's BMC exists only inside bearman-sim",
    };
    ConnectError::NotAvailable {
        node: node.to_string(),
        driver: driver_name(Some(driver)),
        why,
    }
}

impl BmcProvider for DriverBmcs {
    fn bmc_for(&self, node: &Node) -> Result<Arc<dyn Bmc>, BmcError> {
        Ok(self.connect(&node_label(node), &node.bmc)? as Arc<dyn Bmc>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_from_a_config_table() {
        let settings: BmcSettings = toml::from_str(
            r#"
            secrets_file = "/etc/bearman/bmc-secrets.toml"
            concurrent_max = 64
            call_timeout_ms = 90000
            readbacks_max = 6
            ipmi_cipher_suites = { "10.1.0.7" = 17 }
            [ipmi]
            session_timeout_s = 3
            attempts_max = 2
            [redfish]
            verify_tls = false
            "#,
        )
        .unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.concurrent_max, 64);
        assert_eq!(settings.ipmi.session_timeout_s, 3);
        assert_eq!(settings.ipmi.cipher_suite, 3);
        assert_eq!(settings.ipmi_cipher_suites["10.1.0.7"], 17);
        assert!(!settings.redfish.verify_tls);
        BmcSettings::default().validate().unwrap();
    }

    #[test]
    fn a_call_bound_shorter_than_the_drivers_own_is_refused() {
        let settings = BmcSettings {
            call_timeout_ms: 10_000,
            ..BmcSettings::default()
        };
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("bmc.call_timeout_ms 10000"), "{error}");
        assert!(
            toml::from_str::<BmcSettings>("concurrent = 3").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn each_refused_setting_is_named_by_its_key() {
        let check = |change: fn(&mut BmcSettings), expect: &str| {
            let mut settings = BmcSettings::default();
            change(&mut settings);
            assert_eq!(settings.validate().unwrap_err().to_string(), expect);
        };
        check(
            |s| s.concurrent_max = 0,
            "bmc.concurrent_max 0 is outside 1-4096",
        );
        check(
            |s| s.readbacks_max = 101,
            "bmc.readbacks_max 101 is outside 1-100",
        );
        check(
            |s| s.redfish.timeout_ms = 0,
            "bmc.redfish.timeout_ms 0 must be above 0 and at most bmc.call_timeout_ms (60000)",
        );
        check(
            |s| {
                s.ipmi_cipher_suites.insert("bmc7".into(), 18);
            },
            "bmc.ipmi_cipher_suites: 18 for bmc7 is not an IPMI v2 cipher suite (0-17)",
        );
        check(
            |s| s.ipmi.cipher_suite = 18,
            "ipmi.cipher_suite 18 is not an IPMI v2 cipher suite (0-17)",
        );
        check(
            |s| s.ipmi.session_retries = 11,
            "ipmi.session_retries 11 is more than 10",
        );
        check(
            |s| s.ipmi.attempts_max = 0,
            "ipmi.attempts_max 0 is outside 1-10",
        );
    }

    #[test]
    fn redfish_addresses_share_a_lock_however_written() {
        assert_eq!(redfish_key("bmc1"), "bmc1:443");
        assert_eq!(redfish_key("https://BMC1/"), "bmc1:443");
        assert_eq!(redfish_key("bmc1:443"), "bmc1:443");
        assert_eq!(redfish_key("http://bmc1"), "bmc1:80");
        assert_eq!(redfish_key("https://[fd00::1]:8443"), "[fd00::1]:8443");
    }
}
