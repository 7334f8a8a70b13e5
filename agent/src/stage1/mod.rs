//! Stage 1 and stage 2 entry points: everything in the agent that touches the operating
//! system (kernel command line, DHCP via busybox `udhcpc`, LLDP raw sockets, ipmitool,
//! downloads, kexec, reboot; in stage 2 the hostname, resolv.conf, addresses and routes).
//!
//! Stage 1: read the command line, collect facts, bring the network up, listen for LLDP
//! (once per run, all NICs at once, `bearman.lldp_wait_s`), read the BMC, register, configure
//! the BMC with what Bearman answered, download, kexec. LLDP and the BMC never stop a boot:
//! their problems are console lines.
//!
//! Stage 1 never hangs and never gives up silently: every failure prints one console line
//! (`bearman-agent: <what failed>: <why>; retrying in N s`) and the whole attempt starts
//! again after a capped, jittered backoff. Decisions are made by [`crate::plan`]; this
//! module only performs them.

pub mod bmc;
pub mod download;
pub mod kexec;
pub mod lldp_listen;
pub mod netconf;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bearman_proto::{Heartbeat, InstalledReport, LldpNeighbor};

use crate::client::{BootClient, Connector};
use crate::plan::{self, Backoff, BootArgs, KexecPlan, SplitMix64, Tuning};
use bmc::Ipmitool;
use download::Limits;
use kexec::{Kexec, KexecFiles};
use netconf::HostNetwork;

/// Where console lines go: stderr (the console) in production, a buffer in tests.
pub type Console = Arc<dyn Fn(&str) + Send + Sync>;

/// Prints to stderr, which the stage-1 service connects to the console.
pub fn stderr_console() -> Console {
    Arc::new(|line: &str| eprintln!("{line}"))
}

/// Bound on one `udhcpc` run.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(30);
/// Stage 2's heartbeat period (jittered by a tenth).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Options {
    /// `/proc/cmdline`, or a file standing in for it.
    pub cmdline_path: PathBuf,
    /// Root of the `/sys` and `/proc` trees facts and routes are read from.
    pub root: PathBuf,
    /// Where artifacts are downloaded (a tmpfs: `/run/bearman`).
    pub work_dir: PathBuf,
    /// Stop after the first failed attempt instead of retrying.
    pub once: bool,
    /// Stop after this many failed attempts; `None` retries forever.
    pub attempts_max: Option<u32>,
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    pub limits: Limits,
    /// Run `udhcpc` when no network is up.
    pub dhcp: bool,
    /// How BMC commands are run: the real ipmitool, or a fake in tests.
    pub ipmitool: Arc<dyn Ipmitool>,
    pub console: Console,
}

impl Options {
    pub fn new(cmdline_path: PathBuf, root: PathBuf, work_dir: PathBuf) -> Self {
        Options {
            cmdline_path,
            root,
            work_dir,
            once: false,
            attempts_max: None,
            backoff_start: plan::BACKOFF_START,
            backoff_cap: plan::BACKOFF_CAP,
            limits: Limits::default(),
            dhcp: true,
            ipmitool: Arc::new(bmc::SystemIpmitool::default()),
            console: stderr_console(),
        }
    }

    fn say(&self, line: &str) {
        (self.console)(&format!("bearman-agent: {line}"));
    }
}

/// One failed step: what was being done and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}")]
pub struct StepError {
    pub what: String,
    pub why: String,
}

fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> StepError {
    let what = what.into();
    move |error| StepError {
        what,
        why: error.to_string(),
    }
}

/// Runs stage 1 until the kexec step is reached. With [`kexec::SystemKexec`] a successful
/// run does not return; an injected [`Kexec`] that returns `Ok` ends the run with the files
/// it was given.
pub async fn run_stage1<C: Connector + Clone, K: Kexec>(
    options: &Options,
    connector: &C,
    kexec: &mut K,
) -> Result<KexecFiles, StepError> {
    let seed = std::fs::read_to_string(&options.cmdline_path)
        .ok()
        .and_then(|text| plan::parse_cmdline(&text).ok())
        .map_or(0, |args| SplitMix64::seed_from(args.uuid.as_str()));
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    let mut failures: u32 = 0;
    let mut run = RunState::default();
    loop {
        let error = match attempt(options, connector, kexec, &mut run).await {
            Ok(files) => return Ok(files),
            Err(error) => error,
        };
        failures += 1;
        if options.once || options.attempts_max.is_some_and(|max| failures >= max) {
            options.say(&format!("{error}; giving up after {failures} attempt(s)"));
            return Err(error);
        }
        let delay = backoff.next().unwrap_or(options.backoff_cap);
        options.say(&format!(
            "{error}; retrying in {:.1} s",
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
}

/// What one stage-1 run learns once and keeps across retries: listening for LLDP again
/// would add the whole wait to every retry, and the BMC is configured once.
#[derive(Default)]
struct RunState {
    discovered: Option<Discovered>,
    bmc_configured: bool,
}

struct Discovered {
    tuning: Tuning,
    lldp: Vec<lldp_listen::NicLldp>,
    bmc: bmc::Presence,
}

impl Discovered {
    fn neighbor(&self, nic: &str) -> Option<LldpNeighbor> {
        self.lldp
            .iter()
            .find(|heard| heard.nic == nic)
            .and_then(|heard| heard.neighbor().cloned())
    }
}

/// Reads the tuning keys, listens for LLDP on every NIC and looks for the BMC, printing
/// what it found. Never fails.
async fn discover(options: &Options, nics: &[bearman_proto::NicFacts]) -> Discovered {
    let tuning = std::fs::read_to_string(&options.cmdline_path)
        .map(|text| plan::parse_tuning(&text))
        .unwrap_or_default();
    for warning in &tuning.warnings {
        options.say(&format!("warning: {warning}"));
    }
    let names: Vec<String> = nics
        .iter()
        .filter(|nic| nic.name != "lo")
        .map(|nic| nic.name.clone())
        .collect();
    let lldp = if tuning.lldp_wait.is_zero() {
        options.say(&format!("lldp: not listening ({}=0)", plan::LLDP_WAIT_KEY));
        Vec::new()
    } else if names.is_empty() {
        Vec::new()
    } else {
        options.say(&format!(
            "lldp: listening on {} for up to {} s",
            names.join(", "),
            tuning.lldp_wait.as_secs()
        ));
        let heard = lldp_listen::listen_all(&names, tuning.lldp_wait).await;
        for nic in &heard {
            options.say(&nic.console_line());
        }
        heard
    };
    let say = |line: &str| options.say(line);
    let bmc = bmc::discover(
        &options.root,
        options.ipmitool.as_ref(),
        tuning.bmc_channel,
        &say,
    )
    .await;
    Discovered { tuning, lldp, bmc }
}

async fn attempt<C: Connector + Clone, K: Kexec>(
    options: &Options,
    connector: &C,
    kexec: &mut K,
    run: &mut RunState,
) -> Result<KexecFiles, StepError> {
    let args = read_cmdline(&options.cmdline_path)?;
    let facts = crate::facts::collect(&options.root).map_err(step("collecting hardware facts"))?;
    if facts.uuid != args.uuid {
        options.say(&format!(
            "warning: dmi uuid {} differs from {}={}; using the command line's",
            facts.uuid,
            plan::UUID_KEY,
            args.uuid
        ));
    }
    if options.dhcp {
        ensure_network(options, &facts.register.nics).await?;
    }
    if run.discovered.is_none() {
        run.discovered = Some(discover(options, &facts.register.nics).await);
    }
    let Some(discovered) = run.discovered.as_ref() else {
        unreachable!("discovered just above");
    };
    let mut register = facts.register.clone();
    for nic in &mut register.nics {
        nic.lldp = discovered.neighbor(&nic.name);
    }
    register.bmc = discovered.bmc.facts().cloned();
    let client = BootClient::new(connector.clone(), &args.url, args.uuid.clone())
        .map_err(step(format!("{}={}", plan::URL_KEY, args.url)))?;
    let boot_plan = client
        .prepare_boot(&register)
        .await
        .map_err(step("asking bearman what to boot"))?;
    if !run.bmc_configured {
        run.bmc_configured = true;
        let say = |line: &str| options.say(line);
        bmc::configure(
            &discovered.bmc,
            boot_plan.registration.bmc.as_ref(),
            discovered.tuning.bmc_channel,
            options.ipmitool.as_ref(),
            &say,
        )
        .await;
    }
    for difference in plan::firmware_differences(
        &boot_plan.registration.firmware_expected,
        &facts.register.firmware,
    ) {
        options.say(&format!(
            "warning: {difference} (firmware updates are not automated yet)"
        ));
    }
    let kexec_plan = KexecPlan::from_boot_plan(&boot_plan).map_err(step("planning kexec"))?;
    options.say(&format!(
        "booting {} ({}) as {}",
        kexec_plan.kernel.url, boot_plan.profile.flavor, boot_plan.registration.hostname
    ));
    let files = fetch_artifacts(options, connector, &kexec_plan).await?;
    kexec
        .kexec(&files)
        .map_err(step(format!("kexec into {}", kexec_plan.kernel.url)))?;
    Ok(files)
}

/// Downloads and verifies the kernel and initrds into `work_dir`.
pub async fn fetch_artifacts<C: Connector>(
    options: &Options,
    connector: &C,
    plan: &KexecPlan,
) -> Result<KexecFiles, StepError> {
    tokio::fs::create_dir_all(&options.work_dir)
        .await
        .map_err(step(format!("creating {}", options.work_dir.display())))?;
    let get = |artifact: &bearman_proto::Artifact, name: String| {
        let url = artifact.url.clone();
        let sha256 = artifact.sha256.clone();
        async move {
            download::download(
                connector,
                &url,
                &sha256,
                &options.work_dir,
                &name,
                options.limits,
            )
            .await
            .map_err(step("downloading"))
        }
    };
    let kernel = get(&plan.kernel, "kernel".into()).await?;
    let mut initrds = Vec::with_capacity(plan.initrds.len());
    for (index, artifact) in plan.initrds.iter().enumerate() {
        initrds.push(get(artifact, format!("initrd-{index}")).await?);
    }
    Ok(KexecFiles {
        kernel,
        initrds,
        cmdline: plan.cmdline.clone(),
    })
}

fn read_cmdline(path: &Path) -> Result<BootArgs, StepError> {
    let text =
        std::fs::read_to_string(path).map_err(step(format!("reading {}", path.display())))?;
    plan::parse_cmdline(&text).map_err(step(format!("reading {}", path.display())))
}

/// True when `/proc/net/route` text has a default route (destination and mask 0).
pub fn has_default_route(route: &str) -> bool {
    route.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000"
    })
}

/// True when `/proc/net/fib_trie` text lists a local IPv4 address outside 127/8.
pub fn has_address(fib_trie: &str) -> bool {
    let mut last_address = "";
    for line in fib_trie.lines() {
        let line = line.trim_start_matches(|c: char| c.is_whitespace() || "|+-".contains(c));
        if let Some(address) = line.strip_prefix("/32 host LOCAL").map(|_| last_address) {
            if !address.starts_with("127.") {
                return true;
            }
        } else if let Some(first) = line.split_whitespace().next() {
            last_address = first;
        }
    }
    false
}

/// Brings the network up with busybox `udhcpc` unless a default route or an address
/// already exists (iPXE does not hand its lease to the kernel).
async fn ensure_network(
    options: &Options,
    nics: &[bearman_proto::NicFacts],
) -> Result<(), StepError> {
    let read = |name: &str| std::fs::read_to_string(options.root.join(name)).unwrap_or_default();
    if has_default_route(&read("proc/net/route")) || has_address(&read("proc/net/fib_trie")) {
        return Ok(());
    }
    let mut last_error = String::from("no network interface found");
    for nic in nics.iter().filter(|nic| nic.name != "lo") {
        let mut command = tokio::process::Command::new("udhcpc");
        command
            .args(["-i", &nic.name, "-n", "-q", "-t", "5"])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(DHCP_TIMEOUT, command.status()).await {
            Ok(Ok(status)) if status.success() => return Ok(()),
            Ok(Ok(status)) => last_error = format!("udhcpc -i {}: {status}", nic.name),
            Ok(Err(error)) => last_error = format!("udhcpc -i {}: {error}", nic.name),
            Err(_) => {
                last_error = format!("udhcpc -i {}: no lease within {DHCP_TIMEOUT:?}", nic.name)
            }
        }
    }
    Err(StepError {
        what: "bringing the network up".into(),
        why: last_error,
    })
}

/// Attempts at fetching the network detail in stage 2 before going on without it.
pub const DETAIL_ATTEMPTS_MAX: u32 = 3;

/// Stage 2 options: the kexec'd OS applies its network detail, reports itself installed,
/// then heartbeats.
#[derive(Clone)]
pub struct Stage2Options {
    pub cmdline_path: PathBuf,
    pub root: PathBuf,
    pub heartbeat_period: Duration,
    /// Stop after this many heartbeats; `None` runs forever.
    pub beats_max: Option<u64>,
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    pub console: Console,
}

impl Stage2Options {
    pub fn new(cmdline_path: PathBuf, root: PathBuf) -> Self {
        Stage2Options {
            cmdline_path,
            root,
            heartbeat_period: HEARTBEAT_PERIOD,
            beats_max: None,
            backoff_start: plan::BACKOFF_START,
            backoff_cap: plan::BACKOFF_CAP,
            console: stderr_console(),
        }
    }

    fn say(&self, line: &str) {
        (self.console)(&format!("bearman-agent: {line}"));
    }
}

/// Stage 2: apply the network detail (`GET detail`, then only additive changes to `host`;
/// failures are console lines), `POST installed` (retried until it succeeds), then a
/// heartbeat every period ± a tenth, failures logged and the loop kept going. Returns only
/// when `beats_max` is reached, or at once if the command line is unusable.
pub async fn run_stage2<C: Connector + Clone, H: HostNetwork>(
    options: &Stage2Options,
    connector: &C,
    host: &mut H,
) -> Result<(), StepError> {
    let args = read_cmdline(&options.cmdline_path)?;
    let client = BootClient::new(connector.clone(), &args.url, args.uuid.clone())
        .map_err(step(format!("{}={}", plan::URL_KEY, args.url)))?;
    let seed = SplitMix64::seed_from(args.uuid.as_str());
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    apply_detail(options, &client, host, &mut backoff).await;
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    let report = InstalledReport {
        os_release: os_release(&options.root),
    };
    loop {
        match client.installed(&report).await {
            Ok(state) => {
                options.say(&format!("reported installed; bearman says {state}"));
                break;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(options.backoff_cap);
                options.say(&format!(
                    "reporting installed: {error}; retrying in {:.1} s",
                    delay.as_secs_f64()
                ));
                tokio::time::sleep(delay).await;
            }
        }
    }
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    let mut beats: u64 = 0;
    loop {
        let beat = Heartbeat {
            uptime_s: uptime_s(&options.root),
        };
        if let Err(error) = client.heartbeat(&beat).await {
            options.say(&format!("heartbeat: {error}; trying again next period"));
        }
        beats += 1;
        if options.beats_max.is_some_and(|max| beats >= max) {
            break;
        }
        tokio::time::sleep(plan::jittered(options.heartbeat_period, &mut rng)).await;
    }
    Ok(())
}

/// Fetches the network detail (a few bounded attempts) and applies the plan
/// [`crate::network::plan_network`] makes of it, one console line per change, note or
/// failure. Never fails: stage 2 goes on to report installed whatever happens here.
async fn apply_detail<C: Connector, H: HostNetwork>(
    options: &Stage2Options,
    client: &BootClient<C>,
    host: &mut H,
    backoff: &mut Backoff,
) {
    let mut attempts = 0;
    let detail = loop {
        attempts += 1;
        match client.detail().await {
            Ok(detail) => break detail,
            Err(error) if attempts >= DETAIL_ATTEMPTS_MAX => {
                options.say(&format!(
                    "network detail: {error}; not applied after {attempts} attempt(s), going on"
                ));
                return;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(options.backoff_cap);
                options.say(&format!(
                    "network detail: {error}; retrying in {:.1} s",
                    delay.as_secs_f64()
                ));
                tokio::time::sleep(delay).await;
            }
        }
    };
    let state = match host.state() {
        Ok(state) => state,
        Err(error) => {
            options.say(&format!(
                "network: reading the host's state: {error}; detail not applied, going on"
            ));
            return;
        }
    };
    let plan = crate::network::plan_network(&detail, &state);
    for note in &plan.notes {
        options.say(&format!("network: {note}"));
    }
    if plan.actions.is_empty() {
        options.say("network: already as bearman describes it; nothing changed");
    }
    for action in &plan.actions {
        match host.apply(action).await {
            Ok(()) => options.say(&format!("network: applied {action}")),
            Err(error) => options.say(&format!("network: {action} failed: {error}; going on")),
        }
    }
}

/// `PRETTY_NAME` from `etc/os-release` under `root`.
fn os_release(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("etc/os-release")).ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix("PRETTY_NAME=")
            .map(|value| value.trim_matches('"').to_string())
    })
}

fn uptime_s(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("proc/uptime")).ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(seconds as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_is_found_in_proc_net_route() {
        let header =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let default = "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        let subnet = "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert!(has_default_route(&format!("{header}{subnet}{default}")));
        assert!(!has_default_route(&format!("{header}{subnet}")));
        assert!(!has_default_route(""));
    }

    #[test]
    fn addresses_are_found_in_fib_trie_except_loopback() {
        let loopback_only =
            "Local:\n  +-- 127.0.0.0/8 2 0 2\n     |-- 127.0.0.1\n        /32 host LOCAL\n";
        assert!(!has_address(loopback_only));
        let with_lease = format!(
            "{loopback_only}  +-- 192.168.2.0/24 2 0 2\n     |-- 192.168.2.15\n        /32 host LOCAL\n"
        );
        assert!(has_address(&with_lease));
    }
}
