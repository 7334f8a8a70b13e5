//! Daemon configuration: command-line flags over `BEARMAN_*` environment variables over
//! the `--config` TOML file over built-in defaults that run out of the box on SQLite.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use bearman::core::boot::Stage1Config;
use bearman::core::model::NodeRole;
use serde::Deserialize;

pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
pub const DATA_DIR_DEFAULT: &str = "bearman-data";

/// The `--config` file. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    /// A file holding the database URL (trimmed), so its password is not in this file.
    pub database_url_file: Option<PathBuf>,
    pub log_format: Option<String>,
    pub default_flavor: Option<String>,
    pub default_role: Option<String>,
    pub body_limit_bytes: Option<usize>,
    pub heartbeat_fresh_s: Option<u64>,
    pub stage1: Option<Stage1Config>,
    /// Failure detection and remediation settings (guards, budgets).
    pub remediation: Option<bearman::controller::ControllerConfig>,
    /// OpenStack Nova, for forcing compute services down and evacuating VMs.
    pub nova: Option<bearman::cloud::nova::NovaConfig>,
    /// BMC drivers: secrets file, timeouts, fleet-wide limit, IPMI and Redfish settings.
    pub bmc: Option<bearman::bmc::provider::BmcSettings>,
    /// proxyDHCP and TFTP for PXE firmware; absent (the default) means none is served.
    pub pxe: Option<bearman_pxe::PxeFileConfig>,
    /// Several replicas on one PostgreSQL database (off by default).
    pub cluster: Option<bearman::core::cluster::ClusterConfig>,
    /// Which machines that register by themselves are accepted into the fleet.
    pub enrollment: Option<EnrollmentFile>,
    /// Connection timeouts, the connection cap and per-source rate limits.
    pub http: Option<HttpFile>,
    /// TLS on the admin listener, and the plain-HTTP listener the boot protocol moves to.
    pub tls: Option<TlsFile>,
    /// The web dashboard's sessions.
    pub dashboard: Option<bearman::core::session::DashboardConfig>,
    /// `GET /metrics`.
    pub metrics: Option<MetricsFile>,
    /// The firmware rollout: how many nodes flash at once, the canary group, the
    /// automatic pause, attempts per node.
    pub firmware: Option<bearman::core::firmware::RolloutPolicy>,
}

/// `[metrics]`: who may read `GET /metrics` (on the main listener).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Serve it without a token. Default false: a token of role viewer, because it
    /// names racks and counts the fleet's nodes.
    #[serde(default)]
    pub public: bool,
}

/// `[tls]` as written: with it, `listen` speaks HTTPS (the admin API, the boot
/// protocol and the probes), and `boot_listen` serves the boot protocol and the probes
/// over plain HTTP for iPXE firmware and agents, which do not trust a private CA.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// PEM: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Plain-HTTP address of the boot protocol (`/ipxe…`, `/images/…`, `/healthz`,
    /// `/readyz`), e.g. `0.0.0.0:8081`.
    pub boot_listen: String,
}

/// `[tls]` resolved.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub boot_listen: SocketAddr,
}

/// `[http]` as written; every key optional (defaults in `bearman::edge` and
/// `bearman::core::rate_limit`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    pub header_read_timeout_s: Option<u64>,
    pub idle_timeout_s: Option<u64>,
    pub body_read_timeout_s: Option<u64>,
    pub send_stall_timeout_s: Option<u64>,
    pub connections_max: Option<usize>,
    /// Requests per second per source address on the unauthenticated endpoints; 0 = no limit.
    pub rate_per_s: Option<u32>,
    pub rate_burst: Option<u32>,
    pub rate_sources_max: Option<usize>,
}

impl HttpFile {
    fn resolve(self) -> anyhow::Result<bearman::edge::EdgeLimits> {
        use std::time::Duration;
        let defaults = bearman::edge::EdgeLimits::default();
        fn seconds(
            name: &str,
            given: Option<u64>,
            default: Duration,
            max_s: u64,
        ) -> anyhow::Result<Duration> {
            match given {
                None => Ok(default),
                Some(s) if (1..=max_s).contains(&s) => Ok(Duration::from_secs(s)),
                Some(s) => bail!("[http] {name} {s} is outside 1-{max_s}"),
            }
        }
        fn count<T: PartialOrd + std::fmt::Display + Copy>(
            name: &str,
            given: Option<T>,
            default: T,
            min: T,
            max: T,
        ) -> anyhow::Result<T> {
            let value = given.unwrap_or(default);
            if value < min || value > max {
                bail!("[http] {name} {value} is outside {min}-{max}");
            }
            Ok(value)
        }
        let c = defaults.connections;
        let r = defaults.rate;
        Ok(bearman::edge::EdgeLimits {
            connections: bearman::edge::ConnectionLimits {
                header_read_timeout: seconds(
                    "header_read_timeout_s",
                    self.header_read_timeout_s,
                    c.header_read_timeout,
                    300,
                )?,
                idle_timeout: seconds("idle_timeout_s", self.idle_timeout_s, c.idle_timeout, 3600)?,
                body_read_timeout: seconds(
                    "body_read_timeout_s",
                    self.body_read_timeout_s,
                    c.body_read_timeout,
                    600,
                )?,
                send_stall_timeout: seconds(
                    "send_stall_timeout_s",
                    self.send_stall_timeout_s,
                    c.send_stall_timeout,
                    3600,
                )?,
                connections_max: count(
                    "connections_max",
                    self.connections_max,
                    c.connections_max,
                    16,
                    1_000_000,
                )?,
            },
            rate: bearman::core::rate_limit::RateLimitConfig {
                per_s: count("rate_per_s", self.rate_per_s, r.per_s, 0, 1_000_000)?,
                burst: count("rate_burst", self.rate_burst, r.burst, 1, 10_000_000)?,
                sources_max: count(
                    "rate_sources_max",
                    self.rate_sources_max,
                    r.sources_max,
                    16,
                    1_000_000,
                )?,
            },
        })
    }
}

/// `[enrollment]` as written. Without it (or with every list empty and `auto_accept`
/// false) a machine nobody enrolled waits, Discovered, for `bearman node accept`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentFile {
    #[serde(default)]
    pub auto_accept: bool,
    #[serde(default)]
    pub allow_serials: Vec<String>,
    #[serde(default)]
    pub allow_macs: Vec<String>,
    /// `SWITCH/PORT`: the LLDP chassis id or system name of a switch and a port id.
    #[serde(default)]
    pub allow_switch_ports: Vec<String>,
    pub pending_max: Option<usize>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

impl FileConfig {
    /// `database_url`, or the content of `database_url_file` (not both).
    pub fn database_url(&self) -> anyhow::Result<Option<String>> {
        match (&self.database_url, &self.database_url_file) {
            (Some(_), Some(_)) => bail!("give database_url or database_url_file, not both"),
            (Some(url), None) => Ok(Some(url.clone())),
            (None, Some(path)) => super::args::read_secret_file(path, "database URL")
                .map(Some)
                .map_err(|e| anyhow!("database_url_file: {e}")),
            (None, None) => Ok(None),
        }
    }
}

/// Everything `serve` needs, resolved.
#[derive(Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub public_url: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub log_json: bool,
    pub default_flavor: Option<String>,
    pub default_role: NodeRole,
    pub body_limit_bytes: usize,
    pub heartbeat_fresh_s: u64,
    pub stage1: Stage1Config,
    pub remediation: bearman::controller::ControllerConfig,
    pub nova: Option<bearman::cloud::nova::NovaConfig>,
    pub bmc: bearman::bmc::provider::BmcSettings,
    pub pxe: Option<bearman_pxe::PxeConfig>,
    pub cluster: bearman::core::cluster::ClusterConfig,
    pub enrollment: bearman::core::enrollment::EnrollmentPolicy,
    pub edge: bearman::edge::EdgeLimits,
    pub tls: Option<TlsConfig>,
    pub dashboard: bearman::core::session::DashboardConfig,
    /// `GET /metrics` without a token.
    pub metrics_public: bool,
    pub firmware: bearman::core::firmware::RolloutPolicy,
}

/// Values given on the command line or in the environment (clap merges those two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub log_format: Option<String>,
    pub default_flavor: Option<String>,
}

pub fn sqlite_url(data_dir: &Path) -> anyhow::Result<String> {
    let absolute = std::path::absolute(data_dir)
        .with_context(|| format!("resolving data directory {}", data_dir.display()))?;
    Ok(format!(
        "sqlite://{}?mode=rwc",
        absolute.join("bearman.db").display()
    ))
}

pub fn resolve(overrides: Overrides, file: FileConfig) -> anyhow::Result<ServeConfig> {
    let file_database_url = match overrides.database_url {
        Some(_) => None,
        None => file.database_url()?,
    };
    let listen_text = overrides
        .listen
        .or(file.listen)
        .unwrap_or_else(|| LISTEN_DEFAULT.to_string());
    let listen: SocketAddr = listen_text.parse().with_context(|| {
        format!("--listen {listen_text:?} is not an address such as 0.0.0.0:8080")
    })?;
    let tls = match file.tls {
        None => None,
        Some(tls) => {
            let boot_listen: SocketAddr = tls.boot_listen.parse().with_context(|| {
                format!(
                    "[tls] boot_listen {:?} is not an address such as 0.0.0.0:8081",
                    tls.boot_listen
                )
            })?;
            if boot_listen == listen {
                bail!("[tls] boot_listen {boot_listen} is the admin listener's address: give the boot protocol its own port");
            }
            Some(TlsConfig {
                cert_file: tls.cert_file,
                key_file: tls.key_file,
                boot_listen,
            })
        }
    };
    // Nodes reach the boot protocol: on the boot listener when the admin one is TLS.
    let boot_address = tls.as_ref().map_or(listen, |tls| tls.boot_listen);
    let public_url = match overrides.public_url.or(file.public_url) {
        Some(url) => url,
        None if boot_address.ip().is_unspecified() => bail!(
            "--public-url is required when the boot protocol listens on {boot_address}: nodes need an address they can reach, \
             e.g. --public-url http://10.0.0.1:{}",
            boot_address.port()
        ),
        None => format!("http://{boot_address}"),
    };
    if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
        bail!("--public-url {public_url:?} must start with http:// or https://");
    }
    if tls.is_some() && !public_url.starts_with("http://") {
        bail!(
            "--public-url {public_url:?}: with [tls] the boot protocol is plain HTTP on boot_listen (iPXE and the agent do not trust a private CA); give its http:// URL"
        );
    }
    let data_dir = overrides
        .data_dir
        .or(file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
    let database_url = match overrides.database_url.or(file_database_url) {
        Some(url) => url,
        None => sqlite_url(&data_dir)?,
    };
    let log_format = overrides
        .log_format
        .or(file.log_format)
        .unwrap_or_else(|| "text".to_string());
    let log_json = match log_format.as_str() {
        "text" => false,
        "json" => true,
        other => bail!("--log-format {other:?}: expected text or json"),
    };
    let default_role = match file.default_role.as_deref() {
        None => NodeRole::Compute,
        Some(text) => NodeRole::parse(text).with_context(|| {
            format!(
                "default_role {text:?}: expected compute, storage, load_balancer or control_plane"
            )
        })?,
    };
    let body_limit_bytes = file
        .body_limit_bytes
        .unwrap_or(bearman::server::BODY_LIMIT_BYTES_DEFAULT);
    if !(1024..=16 * 1024 * 1024).contains(&body_limit_bytes) {
        bail!("body_limit_bytes {body_limit_bytes} is outside 1 KiB-16 MiB");
    }
    let remediation = file.remediation.unwrap_or_default();
    if let Err(problem) = remediation.validate() {
        bail!("[remediation] {problem}");
    }
    let bmc = file.bmc.unwrap_or_default();
    if bmc.concurrent_max > 1 && remediation.power_polls_in_flight_max >= bmc.concurrent_max {
        bail!(
            "[remediation] power_polls_in_flight_max {} must be below bmc.concurrent_max {}: power polls stuck on hung BMCs must never hold every permit fencing needs",
            remediation.power_polls_in_flight_max,
            bmc.concurrent_max
        );
    }
    let public_url = public_url.trim_end_matches('/').to_string();
    let pxe = match file.pxe {
        Some(pxe) => Some(
            pxe.resolve(&public_url, &data_dir.join("tftp"))
                .map_err(|problem| anyhow!("[pxe] {problem}"))?,
        ),
        None => None,
    };
    let cluster = file.cluster.unwrap_or_default();
    if let Err(problem) = cluster.validate() {
        bail!("[cluster] {problem}");
    }
    if cluster.enabled
        && bearman::store::sql::Backend::from_url(&database_url)
            != Some(bearman::store::sql::Backend::Postgres)
    {
        bail!(
            "[cluster] enabled = true needs a PostgreSQL database_url (postgres://…): SQLite is one daemon's embedded store"
        );
    }
    let enrollment_file = file.enrollment.unwrap_or_default();
    let enrollment = bearman::core::enrollment::EnrollmentPolicy::from_settings(
        enrollment_file.auto_accept,
        &enrollment_file.allow_serials,
        &enrollment_file.allow_macs,
        &enrollment_file.allow_switch_ports,
        enrollment_file
            .pending_max
            .unwrap_or(bearman::core::enrollment::PENDING_MAX_DEFAULT),
    )
    .map_err(|problem| anyhow!("[enrollment] {problem}"))?;
    let edge = file.http.unwrap_or_default().resolve()?;
    let dashboard = file.dashboard.unwrap_or_default();
    if let Err(problem) = dashboard.validate() {
        bail!("[dashboard] {problem}");
    }
    let firmware = file.firmware.unwrap_or_default();
    if let Err(problem) = firmware.validate() {
        bail!("[firmware] {problem}");
    }
    Ok(ServeConfig {
        listen,
        public_url,
        data_dir,
        database_url,
        log_json,
        default_flavor: overrides.default_flavor.or(file.default_flavor),
        default_role,
        body_limit_bytes,
        heartbeat_fresh_s: file.heartbeat_fresh_s.unwrap_or(30),
        stage1: file.stage1.unwrap_or_default(),
        remediation,
        nova: file.nova,
        bmc,
        pxe,
        cluster,
        enrollment,
        edge,
        tls,
        dashboard,
        metrics_public: file.metrics.unwrap_or_default().public,
        firmware,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_moves_the_boot_protocol_to_its_own_plain_listener() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:8443\"\n[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nboot_listen = \"127.0.0.1:8081\"\n",
        )
        .unwrap();
        let config = resolve(Overrides::default(), file).unwrap();
        assert_eq!(config.public_url, "http://127.0.0.1:8081");
        assert_eq!(config.tls.unwrap().boot_listen.port(), 8081);
        for (bad, says) in [
            ("listen = \"127.0.0.1:8443\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nboot_listen = \"127.0.0.1:8443\"\n", "own port"),
            ("[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nboot_listen = \"0.0.0.0:8081\"\n", "--public-url is required"),
            ("public_url = \"https://x\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nboot_listen = \"127.0.0.1:8081\"\n", "plain HTTP"),
            ("[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nboot_listen = \"nowhere\"\n", "boot_listen"),
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let error = format!("{:#}", resolve(Overrides::default(), file).unwrap_err());
            assert!(error.contains(says), "{bad}: {error}");
        }
        assert!(toml::from_str::<FileConfig>("[tls]\ncert_file = \"c\"\n").is_err());
    }

    #[test]
    fn http_limits_default_and_are_bounded() {
        let config = resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert_eq!(config.edge, bearman::edge::EdgeLimits::default());
        let file: FileConfig = toml::from_str(
            "[http]\nheader_read_timeout_s = 5\nconnections_max = 100\nrate_per_s = 0\n",
        )
        .unwrap();
        let config = resolve(Overrides::default(), file).unwrap();
        assert_eq!(
            config.edge.connections.header_read_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(config.edge.connections.connections_max, 100);
        assert_eq!(config.edge.rate.per_s, 0);
        for bad in [
            "[http]\nheader_read_timeout_s = 0\n",
            "[http]\nidle_timeout_s = 100000\n",
            "[http]\nconnections_max = 1\n",
            "[http]\nrate_burst = 0\n",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            let error = resolve(Overrides::default(), file).unwrap_err().to_string();
            assert!(error.starts_with("[http] "), "{bad}: {error}");
        }
        assert!(toml::from_str::<FileConfig>("[http]\nheader_timeout = 5\n").is_err());
    }

    #[test]
    fn enrollment_is_closed_by_default_and_its_lists_are_checked() {
        let config = resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert!(!config.enrollment.auto_accept);
        assert!(config.enrollment.allow_serials.is_empty());
        let file: FileConfig = toml::from_str(
            "[enrollment]\nallow_serials = [\"SN1\"]\nallow_switch_ports = [\"tor-a01/Ethernet1/1\"]\n",
        )
        .unwrap();
        let config = resolve(Overrides::default(), file).unwrap();
        assert!(config.enrollment.allow_serials.contains("SN1"));
        assert_eq!(config.enrollment.allow_switch_ports.len(), 1);
        let file: FileConfig =
            toml::from_str("[enrollment]\nallow_macs = [\"not-a-mac\"]\n").unwrap();
        let error = resolve(Overrides::default(), file).unwrap_err().to_string();
        assert!(
            error.contains("[enrollment] enrollment.allow_macs"),
            "{error}"
        );
    }

    #[test]
    fn a_cluster_needs_postgres_and_valid_lease_timings() {
        let file: FileConfig = toml::from_str("[cluster]\nenabled = true\n").unwrap();
        let error = resolve(Overrides::default(), file).unwrap_err().to_string();
        assert!(error.contains("needs a PostgreSQL database_url"), "{error}");
        let file: FileConfig = toml::from_str(
            "database_url = \"postgres://db/bearman\"\n[cluster]\nenabled = true\nrenew_deadline_ms = 20000\n",
        )
        .unwrap();
        let error = resolve(Overrides::default(), file).unwrap_err().to_string();
        assert!(error.contains("[cluster] renew_deadline_ms"), "{error}");
        let file: FileConfig =
            toml::from_str("database_url = \"postgres://db/bearman\"\n[cluster]\nenabled = true\n")
                .unwrap();
        let config = resolve(Overrides::default(), file).unwrap();
        assert!(config.cluster.enabled);
        assert_eq!(config.cluster.lease_ttl_ms, 15_000);
    }

    #[test]
    fn defaults_run_on_sqlite_in_the_working_directory() {
        let config = resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.public_url, "http://127.0.0.1:8080");
        assert!(config.database_url.starts_with("sqlite://"));
        assert!(config
            .database_url
            .ends_with("bearman-data/bearman.db?mode=rwc"));
    }

    #[test]
    fn flags_beat_file_and_bad_values_are_explained() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:9000\"\nlog_format = \"json\"\n").unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:9100".into()),
            ..Default::default()
        };
        let config = resolve(overrides, file).unwrap();
        assert_eq!(config.listen.port(), 9100);
        assert!(config.log_json);

        let error = resolve(
            Overrides {
                listen: Some("0.0.0.0:8080".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("--public-url is required"),
            "{error}"
        );
        assert!(
            toml::from_str::<FileConfig>("lisen = \"x\"").is_err(),
            "typos in keys are errors"
        );
    }

    #[test]
    fn pxe_is_off_by_default_and_its_keys_are_checked() {
        let config = resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert!(config.pxe.is_none(), "no [pxe] section, no DHCP or TFTP");
        let file: FileConfig = toml::from_str(
            "public_url = \"http://10.77.0.1:8080/\"\n[pxe]\nserver_address = \"10.77.0.1\"\n",
        )
        .unwrap();
        let pxe = resolve(Overrides::default(), file).unwrap().pxe.unwrap();
        assert_eq!(pxe.targets.ipxe_url, "http://10.77.0.1:8080/ipxe");
        let file: FileConfig = toml::from_str("[pxe]\ntftp_root = \"/srv/tftp\"\n").unwrap();
        let error = resolve(Overrides::default(), file).unwrap_err().to_string();
        assert!(
            error.contains("[pxe] pxe.server_address is required"),
            "{error}"
        );
    }

    #[test]
    fn dashboard_sessions_default_to_eight_hours_and_are_bounded() {
        let config = resolve(Overrides::default(), FileConfig::default()).unwrap();
        assert_eq!(config.dashboard.session_max_s, 8 * 3600);
        let file: FileConfig = toml::from_str("[dashboard]\nsession_max_s = 600\n").unwrap();
        assert_eq!(
            resolve(Overrides::default(), file)
                .unwrap()
                .dashboard
                .session_max_s,
            600
        );
        let file: FileConfig = toml::from_str("[dashboard]\nsession_max_s = 86400\n").unwrap();
        let error = resolve(Overrides::default(), file).unwrap_err().to_string();
        assert!(
            error.contains("[dashboard] dashboard.session_max_s 86400"),
            "{error}"
        );
    }

    #[test]
    fn remediation_settings_are_validated() {
        let file: FileConfig =
            toml::from_str("[remediation.health]\npower_poll_interval_ms = 0\n").unwrap();
        let config = resolve(Overrides::default(), file).unwrap();
        assert_eq!(
            config.remediation.health.power_poll_interval_ms, 0,
            "0 turns power sync off"
        );
        for (text, key) in [
            (
                "[remediation.health]\npower_poll_interval_ms = 10\n",
                "power_poll_interval_ms",
            ),
            (
                "[remediation.health]\npower_check_silence_ms = 25000\n",
                "power_check_silence_ms",
            ),
            (
                "[remediation]\npower_polls_per_tick_max = 0\n",
                "power_polls_per_tick_max",
            ),
            (
                "[remediation]\npower_polls_in_flight_max = 32\n",
                "bmc.concurrent_max",
            ),
            (
                "[remediation.health]\nrack_silent_fraction_max = 0.0\n",
                "rack_silent_fraction_max",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).unwrap();
            let error = resolve(Overrides::default(), file).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }
}
