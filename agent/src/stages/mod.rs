//! The stage-1 and stage-2 sequences, generic over the machine they run on ([`Host`]) and
//! the way they reach Bearman ([`Connector`]): production runs them on
//! [`crate::stage1::SystemHost`] over TCP, the simulator on its virtual nodes over turmoil.
//!
//! Stage 1: read the command line, collect facts, bring the network up, listen for LLDP
//! (once per run, all NICs at once, `bearman.lldp_wait_s`), read the BMC and the NICs'
//! firmware versions, register, configure the BMC with what Bearman answered, then either
//! apply the firmware update Bearman ordered ([`firmware`]: download, run the updater,
//! report, reboot or register again), wait as Bearman says, or download and kexec. LLDP
//! and the BMC never stop a boot: their problems are console lines.
//!
//! Stage 1 never hangs and never gives up silently: every failure prints one console line
//! (`bearman-agent: <what failed>: <why>; retrying in N s`) and the whole attempt starts
//! again after a capped, jittered backoff. Decisions are made by [`crate::plan`]; this
//! module only sequences them, and touches nothing but the host, the connector and
//! tokio's timer.

pub mod bmc;
pub mod fetch;
pub mod firmware;

use std::collections::BTreeMap;
use std::time::Duration;

use bearman_proto::{Heartbeat, InstalledReport, LldpNeighbor};

use crate::client::{BootClient, Connector, Prepared, REQUEST_TIMEOUT};
use crate::firmware::LastUpdate;
use crate::host::{Host, WorkDir};
use crate::lldp::NicLldp;
use crate::plan::{self, Backoff, BootArgs, KexecPlan, SplitMix64, Tuning};
use crate::stage1::kexec::KexecFiles;
use crate::stage1::netconf::HostNetwork;
use fetch::Limits;

/// Stage 2's heartbeat period (jittered by a tenth).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Options {
    /// Stop after the first failed attempt instead of retrying.
    pub once: bool,
    /// Stop after this many failed attempts; `None` retries forever.
    pub attempts_max: Option<u32>,
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    /// Mixed into the backoff's seed, which is otherwise derived from the node's uuid
    /// alone (0, as in production, mixes nothing in). The simulator passes one derived
    /// from its run seed, so different seeds give different runs.
    pub seed_salt: u64,
    /// Bound on one request to Bearman, connect included.
    pub request_timeout: Duration,
    pub limits: Limits,
    /// Bring the network up (`udhcpc` in production) when none is up.
    pub dhcp: bool,
    /// How long to wait for Bearman to power-cycle the machine after a firmware update
    /// before registering again.
    pub power_cycle_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            once: false,
            attempts_max: None,
            backoff_start: plan::BACKOFF_START,
            backoff_cap: plan::BACKOFF_CAP,
            seed_salt: 0,
            request_timeout: REQUEST_TIMEOUT,
            limits: Limits::default(),
            dhcp: true,
            power_cycle_wait: crate::firmware::POWER_CYCLE_WAIT,
        }
    }
}

/// One failed step: what was being done and why it failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {why}")]
pub struct StepError {
    pub what: String,
    pub why: String,
}

pub(crate) fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> StepError {
    let what = what.into();
    move |error| StepError {
        what,
        why: error.to_string(),
    }
}

/// The seed of a node's backoff and heartbeat jitter: its uuid's, with `salt` mixed in.
fn seed_for(uuid: &str, salt: u64) -> u64 {
    SplitMix64::seed_from(uuid) ^ salt
}

/// Runs stage 1 until the kexec step is reached. On a real machine a successful run does
/// not return; a host whose kexec returns `Ok` ends the run with the files it was given,
/// and one whose reboot (after a firmware update) returns `Ok` ends it with an error
/// saying so.
pub async fn run_stage1<C: Connector + Clone, H: Host>(
    options: &Options,
    connector: &C,
    host: &mut H,
) -> Result<KexecFiles, StepError> {
    let seed = host
        .read_cmdline()
        .ok()
        .and_then(|text| plan::parse_cmdline(&text).ok())
        .map_or(0, |args| SplitMix64::seed_from(args.uuid.as_str()))
        ^ options.seed_salt;
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    let mut failures: u32 = 0;
    let mut run = RunState::default();
    loop {
        let error = match attempt(options, connector, host, &mut run).await {
            Ok(Ended::Kexec(files)) => return Ok(files),
            Ok(Ended::Restarted { bundle }) => {
                let error = StepError {
                    what: "firmware".into(),
                    why: format!("restarted to bring bundle {bundle} into use; stage 1 ends here"),
                };
                host.say(&error.to_string());
                return Err(error);
            }
            Err(error) => error,
        };
        failures += 1;
        if options.once || options.attempts_max.is_some_and(|max| failures >= max) {
            host.say(&format!("{error}; giving up after {failures} attempt(s)"));
            return Err(error);
        }
        let delay = backoff.next().unwrap_or(options.backoff_cap);
        host.say(&format!(
            "{error}; retrying in {:.1} s",
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
}

/// How a successful attempt ended.
enum Ended {
    /// The host's kexec returned with these files.
    Kexec(KexecFiles),
    /// The host's reboot after a firmware update returned.
    Restarted { bundle: String },
}

/// What one stage-1 run learns once and keeps across retries: listening for LLDP again
/// would add the whole wait to every retry, the BMC is configured once, and a firmware
/// updater runs once per order.
#[derive(Default)]
struct RunState {
    discovered: Option<Discovered>,
    bmc_configured: bool,
    /// Whether stage 1 told Bearman it started (tried once per run, whatever came of it).
    announced: bool,
    /// The last firmware update this run applied or tried, and Bearman's answer to it.
    last_update: Option<LastUpdate>,
}

struct Discovered {
    tuning: Tuning,
    lldp: Vec<NicLldp>,
    bmc: bmc::Presence,
    /// Firmware version by NIC name, for the NICs that gave one.
    nic_firmware: BTreeMap<String, String>,
}

impl Discovered {
    fn neighbor(&self, nic: &str) -> Option<LldpNeighbor> {
        self.lldp
            .iter()
            .find(|heard| heard.nic == nic)
            .and_then(|heard| heard.neighbor().cloned())
    }
}

/// Reads the tuning keys, listens for LLDP on every NIC, looks for the BMC and reads the
/// NICs' firmware versions, printing what it found. Never fails.
async fn discover<H: Host>(host: &mut H, nics: &[bearman_proto::NicFacts]) -> Discovered {
    let tuning = host
        .read_cmdline()
        .map(|text| plan::parse_tuning(&text))
        .unwrap_or_default();
    for warning in &tuning.warnings {
        host.say(&format!("warning: {warning}"));
    }
    let names: Vec<String> = nics
        .iter()
        .filter(|nic| nic.name != "lo")
        .map(|nic| nic.name.clone())
        .collect();
    let lldp = if tuning.lldp_wait.is_zero() {
        host.say(&format!("lldp: not listening ({}=0)", plan::LLDP_WAIT_KEY));
        Vec::new()
    } else if names.is_empty() {
        Vec::new()
    } else {
        host.say(&format!(
            "lldp: listening on {} for up to {} s",
            names.join(", "),
            tuning.lldp_wait.as_secs()
        ));
        let heard = host.listen_lldp(&names, tuning.lldp_wait).await;
        for nic in &heard {
            host.say(&nic.console_line());
        }
        heard
    };
    let host = &*host;
    let say = |line: &str| host.say(line);
    let bmc = bmc::discover(host.bmc_device(), host.ipmitool(), tuning.bmc_channel, &say).await;
    let nic_firmware = crate::firmware::nic_versions(nics, |nic| host.nic_firmware(nic));
    if !nic_firmware.is_empty() {
        let listed: Vec<String> = nic_firmware
            .iter()
            .map(|(nic, version)| format!("{nic} {version}"))
            .collect();
        host.say(&format!("nic firmware: {}", listed.join(", ")));
    }
    Discovered {
        tuning,
        lldp,
        bmc,
        nic_firmware,
    }
}

async fn attempt<C: Connector + Clone, H: Host>(
    options: &Options,
    connector: &C,
    host: &mut H,
    run: &mut RunState,
) -> Result<Ended, StepError> {
    let args = read_cmdline(host)?;
    let facts = host.facts().map_err(step("collecting hardware facts"))?;
    if facts.uuid != args.uuid {
        host.say(&format!(
            "warning: dmi uuid {} differs from {}={}; using the command line's",
            facts.uuid,
            plan::UUID_KEY,
            args.uuid
        ));
    }
    if options.dhcp {
        host.ensure_network(&facts.register.nics).await?;
    }
    let client = BootClient::new(connector.clone(), &args.url, args.uuid.clone())
        .map_err(step(format!("{}={}", plan::URL_KEY, args.url)))?
        .with_timeout(options.request_timeout);
    if !run.announced {
        // Once per run, before the slow parts (LLDP, the BMC): Bearman's boot watchdog
        // then knows this boot got past the firmware. Never stops the boot.
        run.announced = true;
        if let Err(error) = client.progress(bearman_proto::BOOT_PHASE_STAGE1).await {
            host.say(&format!(
                "telling bearman stage 1 started: {error}; going on"
            ));
        }
    }
    if run.discovered.is_none() {
        run.discovered = Some(discover(host, &facts.register.nics).await);
    }
    let Some(discovered) = run.discovered.as_ref() else {
        unreachable!("discovered just above");
    };
    let mut register = facts.register.clone();
    for nic in &mut register.nics {
        nic.lldp = discovered.neighbor(&nic.name);
    }
    register.bmc = discovered.bmc.facts().cloned();
    register.firmware.bmc = discovered.bmc.firmware().cloned();
    register.firmware.nics = discovered.nic_firmware.clone();
    let prepared = client
        .prepare(&register)
        .await
        .map_err(step("asking bearman what to boot"))?;
    // Before any firmware step: Bearman power-cycles through the BMC after some updates.
    if !run.bmc_configured {
        run.bmc_configured = true;
        let host = &*host;
        let say = |line: &str| host.say(line);
        bmc::configure(
            &discovered.bmc,
            prepared.registration().bmc.as_ref(),
            discovered.tuning.bmc_channel,
            host.ipmitool(),
            &say,
        )
        .await;
    }
    let differences = plan::firmware_differences(
        &prepared.registration().firmware_expected,
        &register.firmware,
    );
    for line in crate::firmware::difference_lines(&differences, prepared.firmware_instruction()) {
        host.say(&line);
    }
    let boot_plan = match prepared {
        Prepared::Boot(plan) => plan,
        Prepared::HoldFirmware { reason, .. } => {
            return Err(StepError {
                what: "firmware".into(),
                why: format!("waiting: {}", crate::firmware::hold_reason_line(&reason)),
            })
        }
        Prepared::UpdateFirmware { order, .. } => {
            let firmware::Restarted = firmware::update(
                options,
                connector,
                &client,
                host,
                &order,
                &mut run.last_update,
            )
            .await?;
            return Ok(Ended::Restarted {
                bundle: order.bundle,
            });
        }
    };
    let kexec_plan = KexecPlan::from_boot_plan(&boot_plan).map_err(step("planning kexec"))?;
    host.say(&format!(
        "booting {} ({}) as {}",
        kexec_plan.kernel.url, boot_plan.profile.flavor, boot_plan.registration.hostname
    ));
    let files = fetch_artifacts(options, connector, host.work_dir(), &kexec_plan).await?;
    host.kexec(&files)
        .await
        .map_err(step(format!("kexec into {}", kexec_plan.kernel.url)))?;
    Ok(Ended::Kexec(files))
}

/// Downloads and verifies the kernel and initrds into `work_dir`.
pub async fn fetch_artifacts<C: Connector, W: WorkDir>(
    options: &Options,
    connector: &C,
    work_dir: &W,
    plan: &KexecPlan,
) -> Result<KexecFiles, StepError> {
    work_dir
        .create_dir_all()
        .await
        .map_err(step(format!("creating {}", work_dir.path().display())))?;
    let get = |artifact: &bearman_proto::Artifact, name: String| {
        let url = artifact.url.clone();
        let sha256 = artifact.sha256.clone();
        async move {
            fetch::download(connector, &url, &sha256, work_dir, &name, options.limits)
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

fn read_cmdline<H: Host>(host: &H) -> Result<BootArgs, StepError> {
    let what = || format!("reading {}", host.cmdline_source());
    let text = host.read_cmdline().map_err(step(what()))?;
    plan::parse_cmdline(&text).map_err(step(what()))
}

/// Attempts at fetching the network detail in stage 2 before going on without it.
pub const DETAIL_ATTEMPTS_MAX: u32 = 3;

/// Stage 2 options: the kexec'd OS applies its network detail, reports itself installed,
/// then heartbeats.
#[derive(Clone, Debug)]
pub struct Stage2Options {
    pub heartbeat_period: Duration,
    /// Stop after this many heartbeats; `None` runs forever.
    pub beats_max: Option<u64>,
    pub backoff_start: Duration,
    pub backoff_cap: Duration,
    /// Mixed into the uuid-derived seed of the backoff and heartbeat jitter (see
    /// [`Options::seed_salt`]); 0 in production.
    pub seed_salt: u64,
    /// Bound on one request to Bearman, connect included.
    pub request_timeout: Duration,
}

impl Default for Stage2Options {
    fn default() -> Self {
        Stage2Options {
            heartbeat_period: HEARTBEAT_PERIOD,
            beats_max: None,
            backoff_start: plan::BACKOFF_START,
            backoff_cap: plan::BACKOFF_CAP,
            seed_salt: 0,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// Stage 2: apply the network detail (`GET detail`, then only additive changes to the
/// host's network; failures are console lines), `POST installed` (retried until it
/// succeeds), then a heartbeat every period ± a tenth, failures logged and the loop kept
/// going. Returns only when `beats_max` is reached, or at once if the command line is
/// unusable.
pub async fn run_stage2<C: Connector + Clone, H: Host>(
    options: &Stage2Options,
    connector: &C,
    host: &mut H,
) -> Result<(), StepError> {
    let args = read_cmdline(host)?;
    let client = BootClient::new(connector.clone(), &args.url, args.uuid.clone())
        .map_err(step(format!("{}={}", plan::URL_KEY, args.url)))?
        .with_timeout(options.request_timeout);
    let seed = seed_for(args.uuid.as_str(), options.seed_salt);
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    apply_detail(options, &client, host, &mut backoff).await;
    let mut backoff = Backoff::new(options.backoff_start, options.backoff_cap, seed);
    let report = InstalledReport {
        os_release: host.os_release(),
    };
    loop {
        match client.installed(&report).await {
            Ok(state) => {
                host.say(&format!("reported installed; bearman says {state}"));
                break;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(options.backoff_cap);
                host.say(&format!(
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
            uptime_s: host.uptime_s(),
        };
        if let Err(error) = client.heartbeat(&beat).await {
            host.say(&format!("heartbeat: {error}; trying again next period"));
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
async fn apply_detail<C: Connector, H: Host>(
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
                host.say(&format!(
                    "network detail: {error}; not applied after {attempts} attempt(s), going on"
                ));
                return;
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(options.backoff_cap);
                host.say(&format!(
                    "network detail: {error}; retrying in {:.1} s",
                    delay.as_secs_f64()
                ));
                tokio::time::sleep(delay).await;
            }
        }
    };
    let state = match host.network().state().await {
        Ok(state) => state,
        Err(error) => {
            host.say(&format!(
                "network: reading the host's state: {error}; detail not applied, going on"
            ));
            return;
        }
    };
    let plan = crate::network::plan_network(&detail, &state);
    for note in &plan.notes {
        host.say(&format!("network: {note}"));
    }
    if plan.actions.is_empty() {
        host.say("network: already as bearman describes it; nothing changed");
    }
    for action in &plan.actions {
        match host.network().apply(action).await {
            Ok(()) => host.say(&format!("network: applied {action}")),
            Err(error) => host.say(&format!("network: {action} failed: {error}; going on")),
        }
    }
}
