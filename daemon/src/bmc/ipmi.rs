//! The IPMI driver: power control over IPMI v2 (RMCP+, `lanplus`) by running `ipmitool`.
//!
//! Every call runs one `ipmitool` child with `-I lanplus -H host -p port -U user -E`: the
//! password travels in the child's `IPMI_PASSWORD` environment variable, never in argv (so
//! never in a process listing). `-C` picks the cipher suite (3 by default: suite 17,
//! ipmitool's own default, is refused by many BMCs); `-N`/`-R` bound ipmitool's own
//! retransmissions, and the child is killed when `command_timeout_ms` passes anyway.
//! Failed attempts are retried with doubling backoff when retrying is safe.
//!
//! Architecture invariant: this module knows one BMC and one tool. Serialising calls per
//! BMC, the fleet-wide limit and readback verification are `bmc::guard`'s; choosing the
//! driver and the credentials is `bmc::provider`'s.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::credentials::Credentials;
use super::{Bmc, BmcError, PowerState};

/// The standard IPMI-over-LAN (RMCP) UDP port.
pub const IPMI_PORT_DEFAULT: u16 = 623;

/// What `ipmitool` prints for these commands is a few lines; more is not ipmitool talking
/// to a BMC. (A child filling the pipe past the kernel's buffer would block, and then be
/// killed at `command_timeout_ms` — a bounded failure, never a hang.)
const OUTPUT_BYTES_MAX: u64 = 64 * 1024;

/// How the driver runs `ipmitool`. The defaults bound one call to about 50 s in the worst
/// case (3 attempts × 15 s + 1 s + 2 s of backoff); see `bmc::guard` for the outer bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpmiSettings {
    /// The `ipmitool` program (a name looked up on PATH, or a path).
    pub ipmitool: PathBuf,
    /// RMCP+ cipher suite (`-C`). 3 (HMAC-SHA1, AES-128) is what nearly every BMC accepts.
    pub cipher_suite: u8,
    /// Seconds ipmitool waits for each answer before retransmitting (`-N`). Ironic's
    /// experience (ironic-image #172): 1 s is too short for busy BMCs.
    pub session_timeout_s: u32,
    /// Retransmissions ipmitool makes per request (`-R`).
    pub session_retries: u32,
    /// Longest one ipmitool run may take; then it is killed.
    pub command_timeout_ms: u64,
    /// Runs per call, counting the first (at least 1).
    pub attempts_max: u32,
    /// Wait before the second run; doubled before each later one.
    pub retry_backoff_ms: u64,
}

impl Default for IpmiSettings {
    fn default() -> Self {
        IpmiSettings {
            ipmitool: PathBuf::from("ipmitool"),
            cipher_suite: 3,
            session_timeout_s: 2,
            session_retries: 2,
            command_timeout_ms: 15_000,
            attempts_max: 3,
            retry_backoff_ms: 1_000,
        }
    }
}

/// Why `[bmc.ipmi]` settings were refused; each message names the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpmiSettingsError {
    #[error("ipmi.cipher_suite {suite} is not an IPMI v2 cipher suite (0-17)")]
    CipherSuite { suite: u8 },
    #[error("{key} {value} is outside {min}-{max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{key} {value} is more than {max}")]
    TooLarge {
        key: &'static str,
        value: u64,
        max: u64,
    },
}

impl IpmiSettings {
    /// Refuses settings that would make calls unbounded or pointless.
    pub fn validate(&self) -> Result<(), IpmiSettingsError> {
        if self.cipher_suite > 17 {
            return Err(IpmiSettingsError::CipherSuite {
                suite: self.cipher_suite,
            });
        }
        let within = |key, value: u64, min, max| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(IpmiSettingsError::OutOfRange {
                    key,
                    value,
                    min,
                    max,
                })
            }
        };
        let at_most = |key, value: u64, max| {
            if value <= max {
                Ok(())
            } else {
                Err(IpmiSettingsError::TooLarge { key, value, max })
            }
        };
        within(
            "ipmi.session_timeout_s",
            self.session_timeout_s.into(),
            1,
            60,
        )?;
        at_most("ipmi.session_retries", self.session_retries.into(), 10)?;
        within(
            "ipmi.command_timeout_ms",
            self.command_timeout_ms,
            100,
            600_000,
        )?;
        within("ipmi.attempts_max", self.attempts_max.into(), 1, 10)?;
        at_most("ipmi.retry_backoff_ms", self.retry_backoff_ms, 60_000)?;
        Ok(())
    }

    /// The longest one driver call can take with these settings (all attempts and waits).
    pub fn call_bound(&self) -> Duration {
        let attempts = self.attempts_max.max(1);
        let backoff: u64 = (0..attempts.saturating_sub(1))
            .map(|n| self.retry_backoff_ms << n.min(16))
            .sum();
        Duration::from_millis(self.command_timeout_ms * attempts as u64 + backoff)
    }
}

/// Where a BMC listens: `host` or `host:port` (`[v6]:port` for IPv6 with a port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BmcAddress {
    pub host: String,
    pub port: u16,
}

/// Why a BMC address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bmc address {address:?} {problem}")]
pub struct BmcAddressError {
    pub address: String,
    pub problem: AddressProblem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    #[error("has an unclosed [")]
    UnclosedBracket,
    #[error("has text after ]")]
    TextAfterBracket,
    #[error("has no host")]
    NoHost,
    #[error("is not a host name or IP address")]
    NotAHost,
    #[error("has an invalid port")]
    InvalidPort,
}

impl BmcAddress {
    /// Parses `address`, taking `default_port` when it names none.
    pub fn parse(address: &str, default_port: u16) -> Result<BmcAddress, BmcAddressError> {
        let address = address.trim();
        let invalid = |problem| BmcAddressError {
            address: address.to_string(),
            problem,
        };
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (host, rest) = rest
                .split_once(']')
                .ok_or_else(|| invalid(AddressProblem::UnclosedBracket))?;
            match rest {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        rest.strip_prefix(':')
                            .ok_or_else(|| invalid(AddressProblem::TextAfterBracket))?,
                    ),
                ),
            }
        } else {
            match address.matches(':').count() {
                0 => (address, None),
                1 => {
                    let (host, port) = address.split_once(':').unwrap_or((address, ""));
                    (host, Some(port))
                }
                // Bare IPv6 address, no port.
                _ => (address, None),
            }
        };
        if host.is_empty() {
            return Err(invalid(AddressProblem::NoHost));
        }
        // The host becomes one argv element; still, refuse what no host name contains.
        if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(AddressProblem::NotAHost));
        }
        let port = match port {
            None => default_port,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(invalid(AddressProblem::InvalidPort)),
            },
        };
        Ok(BmcAddress {
            host: host.to_string(),
            port,
        })
    }

    /// The same BMC always gets the same key (for its lock): `host:port`, IPv6 bracketed.
    pub fn key(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why one `ipmitool` run failed, as far as its output tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpmiFailure {
    /// ipmitool itself is not installed (or not executable).
    NotInstalled(String),
    /// Running ipmitool failed for another local reason.
    Tool(String),
    /// The BMC rejected the username or password (or the user's privilege).
    Auth(String),
    /// The BMC does not offer the requested cipher suite.
    CipherSuite(String),
    /// Nothing answered at the address.
    NoAnswer,
    /// The host name does not resolve.
    Resolve,
    /// The BMC refused to open a session for another reason (out of sessions, busy).
    Session(String),
    /// A session was open and the BMC refused the command itself.
    Rejected(String),
    /// The run exceeded `command_timeout_ms` and was killed.
    Killed,
    /// Success exit, but output we do not understand.
    Unparseable(String),
}

impl IpmiFailure {
    /// Worth another run? Never for what another run cannot change.
    fn retryable(&self, repeating_is_harmful: bool) -> bool {
        match self {
            IpmiFailure::NoAnswer | IpmiFailure::Session(_) => true,
            // The command may have reached the BMC: only repeat what is harmless twice.
            IpmiFailure::Rejected(_) | IpmiFailure::Killed => !repeating_is_harmful,
            IpmiFailure::NotInstalled(_)
            | IpmiFailure::Tool(_)
            | IpmiFailure::Auth(_)
            | IpmiFailure::CipherSuite(_)
            | IpmiFailure::Resolve
            | IpmiFailure::Unparseable(_) => false,
        }
    }

    fn detail(&self, address: &BmcAddress, username: &str, cipher_suite: u8) -> String {
        let at = address.key();
        match self {
            IpmiFailure::NotInstalled(why) => format!(
                "cannot run ipmitool ({why}); install it (scripts/install-deps.sh, or apt-get install ipmitool)"
            ),
            IpmiFailure::Tool(why) => format!("running ipmitool failed: {why}"),
            IpmiFailure::Auth(why) => format!(
                "authentication failed for user {username:?} at {at}: {why}; check the credentials the node's credentials_ref names"
            ),
            IpmiFailure::CipherSuite(why) => format!(
                "the BMC at {at} refused cipher suite {cipher_suite} ({why}); configure another one for it (ipmi cipher_suite_overrides)"
            ),
            IpmiFailure::NoAnswer => format!(
                "no answer from {at} (wrong address, BMC down or unreachable, or not speaking IPMI on that port)"
            ),
            IpmiFailure::Resolve => format!("cannot resolve the BMC host name {:?}", address.host),
            IpmiFailure::Session(why) => {
                format!("could not establish an IPMI v2 / RMCP+ session with {at}: {why}")
            }
            IpmiFailure::Rejected(why) => format!("the BMC at {at} refused the command: {why}"),
            IpmiFailure::Killed => format!("ipmitool gave no result from {at} in time and was killed"),
            IpmiFailure::Unparseable(output) => format!("unexpected ipmitool output: {output:?}"),
        }
    }
}

/// Lines ipmitool's `-v` prints on every run; they say nothing about a failure.
const NOISE: [&str; 4] = [
    "Loading IANA PEN Registry",
    "Running Get VSO Capabilities",
    "Invalid completion code received: Invalid command",
    "Discovered IPMB address",
];

/// The meaningful tail of ipmitool's error output, bounded.
fn excerpt(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !NOISE.iter().any(|noise| line.starts_with(noise)))
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    let mut tail: String = tail.chars().take(300).collect();
    if tail.is_empty() {
        tail = "no error message".to_string();
    }
    tail
}

/// Classifies a failed run (non-zero exit) from ipmitool's error output (with `-v`).
pub fn classify_failure(stderr: &str) -> IpmiFailure {
    let lower = stderr.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    if has("rakp 2 hmac is invalid") || has("rakp 4 message has invalid integrity check") {
        return IpmiFailure::Auth("the BMC rejected the password (RAKP 2 HMAC is invalid)".into());
    }
    if has("unauthorized name") {
        return IpmiFailure::Auth("the BMC does not know this user (unauthorized name)".into());
    }
    if has("rakp") && (has("unauthorized") || has("invalid role") || has("privilege")) {
        return IpmiFailure::Auth(excerpt(stderr));
    }
    if has("invalid authentication algorithm")
        || has("invalid integrity algorithm")
        || has("invalid confidentiality algorithm")
        || has("no matching cipher suite")
        || has("invalid cipher suite")
    {
        return IpmiFailure::CipherSuite(excerpt(stderr));
    }
    if has("address lookup for") {
        return IpmiFailure::Resolve;
    }
    if has("get auth capabilities error")
        || has("error issuing get channel authentication capabilities")
        || has("no response from remote controller")
    {
        return IpmiFailure::NoAnswer;
    }
    if has("unable to establish") || has("error in open session") || has("activate session") {
        return IpmiFailure::Session(excerpt(stderr));
    }
    IpmiFailure::Rejected(excerpt(stderr))
}

/// What ipmitool prints when a BMC answers `chassis power diag` with completion code 0xCC.
const DIAG_REFUSED: &str =
    "Set Chassis Power Control to Diag failed: Invalid data field in request";

/// Reads "Chassis Power is on|off" from `chassis power status` output.
pub fn parse_power_status(stdout: &str) -> Option<PowerState> {
    stdout.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("Chassis Power is ")?;
        match rest.trim().to_ascii_lowercase().as_str() {
            "on" => Some(PowerState::On),
            "off" => Some(PowerState::Off),
            _ => None,
        }
    })
}

/// One finished ipmitool run.
struct RunOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Kills the child unless it finished: a call cancelled from outside (the guard's
/// timeout) must not leave an ipmitool running against the BMC.
struct Running {
    child: Child,
    exited: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            // SIGKILL is immediate; reap it so no zombie is left.
            let _ = self.child.wait();
        }
    }
}

fn read_bounded(stream: Option<impl Read>) -> String {
    let mut bytes = Vec::new();
    if let Some(stream) = stream {
        let _ = stream.take(OUTPUT_BYTES_MAX).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether running a command twice is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    Harmless,
    /// Only repeat when the command cannot have reached the BMC (a power cycle).
    OnlyIfNotSent,
}

/// A BMC spoken to with `ipmitool -I lanplus`.
pub struct IpmiBmc {
    name: String,
    address: BmcAddress,
    credentials: Credentials,
    settings: IpmiSettings,
}

impl IpmiBmc {
    /// `name` is how errors name this BMC (e.g. "cn0001 at 10.0.0.5:623").
    pub fn new(
        name: &str,
        address: BmcAddress,
        credentials: Credentials,
        settings: IpmiSettings,
    ) -> IpmiBmc {
        IpmiBmc {
            name: name.to_string(),
            address,
            credentials,
            settings,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// ACPI soft power-off: asks the OS to shut down. Not a fence — the OS may ignore it.
    pub async fn power_soft(&self) -> Result<(), BmcError> {
        self.command(
            "power_soft",
            &["chassis", "power", "soft"],
            Repeat::Harmless,
        )
        .await
        .map(|_| ())
    }

    /// Power cycle (off, then on). Not repeated once it may have reached the BMC.
    pub async fn power_cycle(&self) -> Result<(), BmcError> {
        self.command(
            "power_cycle",
            &["chassis", "power", "cycle"],
            Repeat::OnlyIfNotSent,
        )
        .await
        .map(|_| ())
    }

    fn argv(&self, command: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = vec![
            "-I".into(),
            "lanplus".into(),
            "-H".into(),
            self.address.host.clone(),
            "-p".into(),
            self.address.port.to_string(),
            "-U".into(),
            self.credentials.username.clone(),
            // The password comes from IPMI_PASSWORD, never argv.
            "-E".into(),
            "-C".into(),
            self.settings.cipher_suite.to_string(),
            "-N".into(),
            self.settings.session_timeout_s.to_string(),
            "-R".into(),
            self.settings.session_retries.to_string(),
            // Verbose: the only way ipmitool says *why* a session failed (wrong password
            // vs. nobody answering).
            "-v".into(),
        ];
        argv.extend(command.iter().map(|s| s.to_string()));
        argv
    }

    /// Runs ipmitool once, bounded by `command_timeout_ms`.
    async fn run_once(&self, command: &[&str]) -> Result<RunOutput, IpmiFailure> {
        let child = Command::new(&self.settings.ipmitool)
            .args(self.argv(command))
            .env("IPMI_PASSWORD", self.credentials.password.expose())
            // Messages are matched as text: keep them in English.
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                IpmiFailure::NotInstalled(format!("{}: {error}", self.settings.ipmitool.display()))
            })?;
        let mut running = Running {
            child,
            exited: false,
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.command_timeout_ms);
        // Polled rather than awaited: the daemon's tokio has no process driver, and an
        // ipmitool run takes tens of milliseconds to seconds, so a few polls cost nothing.
        let mut poll = Duration::from_millis(2);
        let status = loop {
            match running.child.try_wait() {
                Ok(Some(status)) => {
                    running.exited = true;
                    break status;
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(IpmiFailure::Tool(format!("waiting for it: {error}")));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(IpmiFailure::Killed); // `running` kills it on drop
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
            poll = (poll * 2).min(Duration::from_millis(25));
        };
        // The child has exited, so its pipes hold all it wrote and reading ends at once.
        let stdout = read_bounded(running.child.stdout.take());
        let stderr = read_bounded(running.child.stderr.take());
        Ok(RunOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs `command` with retries; returns its standard output on success.
    async fn command(
        &self,
        operation: &'static str,
        command: &[&str],
        repeat: Repeat,
    ) -> Result<String, BmcError> {
        let attempts_max = self.settings.attempts_max.max(1);
        let mut backoff = Duration::from_millis(self.settings.retry_backoff_ms);
        let mut attempt = 1;
        loop {
            let failure = match self.run_once(command).await {
                Ok(output) if output.status.success() => return Ok(output.stdout),
                Ok(output) => classify_failure(&output.stderr),
                Err(failure) => failure,
            };
            let harmful = repeat == Repeat::OnlyIfNotSent;
            if attempt >= attempts_max || !failure.retryable(harmful) {
                return Err(self.error(operation, &failure, attempt));
            }
            tracing::debug!(
                bmc = %self.name,
                operation,
                attempt,
                failure = %self.credentials.password.redact(&format!("{failure:?}")),
                "ipmitool failed; retrying"
            );
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    fn error(&self, operation: &'static str, failure: &IpmiFailure, attempts: u32) -> BmcError {
        if *failure == IpmiFailure::Killed && attempts == 1 {
            return BmcError::Timeout {
                bmc: self.name.clone(),
                operation,
            };
        }
        let mut detail = failure.detail(
            &self.address,
            &self.credentials.username,
            self.settings.cipher_suite,
        );
        if attempts > 1 {
            detail.push_str(&format!(" (after {attempts} attempts)"));
        }
        BmcError::Failed {
            bmc: self.name.clone(),
            operation,
            // ipmitool never prints the password, but this text came from outside.
            detail: self.credentials.password.redact(&detail),
        }
    }

    fn unparseable(&self, operation: &'static str, stdout: &str) -> BmcError {
        let output: String = stdout.trim().chars().take(200).collect();
        self.error(operation, &IpmiFailure::Unparseable(output), 1)
    }
}

#[async_trait]
impl Bmc for IpmiBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        let stdout = self
            .command(
                "power_state",
                &["chassis", "power", "status"],
                Repeat::Harmless,
            )
            .await?;
        parse_power_status(&stdout).ok_or_else(|| self.unparseable("power_state", &stdout))
    }

    async fn power_on(&self) -> Result<(), BmcError> {
        self.command("power_on", &["chassis", "power", "on"], Repeat::Harmless)
            .await
            .map(|_| ())
    }
    async fn power_off(&self) -> Result<(), BmcError> {
        self.command("power_off", &["chassis", "power", "off"], Repeat::Harmless)
            .await
            .map(|_| ())
    }

    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.power_soft().await
    }

    fn supports_nmi(&self) -> bool {
        true
    }

    /// `chassis power diag`: IPMI Chassis Control 4, "pulse diagnostic interrupt", which
    /// BMCs deliver to the host as an NMI. Not repeated once it may have reached the BMC:
    /// a drill asked for one fault, and a second NMI would be a second fault.
    async fn inject_nmi(&self) -> Result<(), BmcError> {
        self.command(
            "inject_nmi",
            &["chassis", "power", "diag"],
            Repeat::OnlyIfNotSent,
        )
        .await
        .map(|_| ())
        .map_err(|error| match error {
            // Completion code 0xCC to a well-formed Chassis Control: the BMC does not do
            // this control at all (OpenIPMI's ipmi_sim, some vendors' BMCs). Say so, rather
            // than leave the operator to decode ipmitool's words.
            BmcError::Failed {
                bmc,
                operation,
                detail,
            } if detail.contains(DIAG_REFUSED) => BmcError::Failed {
                bmc,
                operation,
                detail: format!(
                    "{detail}; this BMC does not offer the diagnostic interrupt (IPMI chassis \
                     control 4), so no NMI was sent"
                ),
            },
            other => other,
        })
    }

    /// `chassis bootdev pxe` without `options=persistent`: the next boot only.
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        self.command(
            "set_next_boot_pxe",
            &["chassis", "bootdev", "pxe"],
            Repeat::Harmless,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_failure(stderr: &str, expect: IpmiFailure) {
        assert_eq!(classify_failure(stderr), expect, "{stderr}");
    }

    // Captured from ipmitool 1.8.19 -v against OpenIPMI's ipmi_sim 2.0.33.
    #[test]
    fn ipmitool_errors_are_classified() {
        check_failure(
            "Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::Auth("the BMC rejected the password (RAKP 2 HMAC is invalid)".into()),
        );
        check_failure(
            "Loading IANA PEN Registry...\nRAKP 2 message indicates an error : unauthorized name\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::Auth("the BMC does not know this user (unauthorized name)".into()),
        );
        check_failure(
            "Loading IANA PEN Registry...\nGet Auth Capabilities error\nError issuing Get Channel Authentication Capabilities request\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::NoAnswer,
        );
        check_failure(
            "Address lookup for no.such.host.invalid failed\nCould not open socket!\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::Resolve,
        );
        check_failure(
            "Loading IANA PEN Registry...\nError in open session response message : invalid authentication algorithm\n\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::CipherSuite("Error in open session response message : invalid authentication algorithm; Error: Unable to establish IPMI v2 / RMCP+ session".into()),
        );
        check_failure(
            "Loading IANA PEN Registry...\nError in open session response message : insufficient resources for session\nError: Unable to establish IPMI v2 / RMCP+ session\n",
            IpmiFailure::Session("Error in open session response message : insufficient resources for session; Error: Unable to establish IPMI v2 / RMCP+ session".into()),
        );
        check_failure(
            "Loading IANA PEN Registry...\nRunning Get VSO Capabilities my_addr 0x20, transit 0, target 0x20\nInvalid completion code received: Invalid command\nDiscovered IPMB address 0x0\nSet Chassis Power Control to Soft failed: Unspecified error\n",
            IpmiFailure::Rejected("Set Chassis Power Control to Soft failed: Unspecified error".into()),
        );
        check_failure("", IpmiFailure::Rejected("no error message".into()));
    }

    #[test]
    fn power_status_is_read_from_its_line() {
        assert_eq!(
            parse_power_status("Chassis Power is on\n"),
            Some(PowerState::On)
        );
        assert_eq!(
            parse_power_status("noise\n  Chassis Power is off  \n"),
            Some(PowerState::Off)
        );
        assert_eq!(parse_power_status("Chassis Power is unknown\n"), None);
        assert_eq!(parse_power_status(""), None);
    }

    #[test]
    fn addresses_take_an_optional_port() {
        let parse = |text| BmcAddress::parse(text, IPMI_PORT_DEFAULT);
        assert_eq!(parse("10.0.0.5").unwrap().key(), "10.0.0.5:623");
        assert_eq!(parse("bmc1.rack3:6230").unwrap().key(), "bmc1.rack3:6230");
        assert_eq!(parse("[fd00::5]:624").unwrap().key(), "[fd00::5]:624");
        assert_eq!(parse("fd00::5").unwrap().key(), "[fd00::5]:623");
        for bad in [
            "",
            ":623",
            "host:0",
            "host:x",
            "-oops",
            "two words",
            "[fd00::5",
            "[::1]x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_password_is_never_an_argument() {
        let bmc = IpmiBmc::new(
            "cn0001",
            BmcAddress::parse("10.0.0.5", IPMI_PORT_DEFAULT).unwrap(),
            Credentials {
                username: "admin".into(),
                password: super::super::credentials::Secret::new("pw-123"),
            },
            IpmiSettings::default(),
        );
        let argv = bmc.argv(&["chassis", "power", "status"]);
        assert!(argv.iter().all(|arg| !arg.contains("pw-123")), "{argv:?}");
        assert!(argv.contains(&"-E".to_string()));
        assert!(argv.windows(2).any(|w| w == ["-C", "3"]));
    }

    #[tokio::test]
    async fn missing_ipmitool_says_how_to_install_it() {
        let bmc = IpmiBmc::new(
            "cn0001",
            BmcAddress::parse("10.0.0.5", IPMI_PORT_DEFAULT).unwrap(),
            Credentials {
                username: "admin".into(),
                password: super::super::credentials::Secret::new("pw-123"),
            },
            IpmiSettings {
                ipmitool: PathBuf::from("/nonexistent/bearman/ipmitool"),
                ..IpmiSettings::default()
            },
        );
        let error = bmc.power_state().await.unwrap_err().to_string();
        assert!(
            error.starts_with("bmc cn0001: power_state failed: cannot run ipmitool"),
            "{error}"
        );
        assert!(error.contains("scripts/install-deps.sh"), "{error}");
        assert!(!error.contains("after"), "not retried: {error}");
    }

    #[test]
    fn default_settings_are_valid_and_bounded() {
        let settings = IpmiSettings::default();
        settings.validate().unwrap();
        assert_eq!(settings.call_bound(), Duration::from_millis(48_000));
    }
}
