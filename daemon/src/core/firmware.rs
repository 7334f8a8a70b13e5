//! Firmware compliance, decided here and nowhere else: each node's per-component
//! inventory (current version, first seen, last flashed by Bearman), the bundles that
//! update a component and the machines they apply to, the fleet's drift report, and the
//! rollout — which node may start flashing now (fleet and per-rack caps, a canary group
//! first, the automatic pause when too many fail), what a registration or an updater's
//! report changes, and when a node has failed often enough to be taken out of service.
//!
//! Architecture invariant: pure. The application layer reads the node, its flavor, the
//! bundles and the rollout, calls [`on_registration`] or [`on_report`], and writes what
//! they changed — node and rollout — in one store transaction.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use bearman_proto::firmware::{components, differences, version_of};
use bearman_proto::{
    Artifact, FirmwareOrder, FirmwareOutcome, FirmwareReport, FirmwareRestart, FirmwareVersions,
};
use serde::{Deserialize, Serialize};

use super::model::{Node, TimestampMs};
use super::validate::FieldError;

/// Longest bundle name.
pub const BUNDLE_NAME_MAX: usize = 64;
/// Largest bundle file Bearman orders a machine to download (stage 1 holds it in RAM).
pub const BUNDLE_SIZE_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Longest updater run a bundle may ask for.
pub const UPDATER_TIMEOUT_S_MAX: u64 = 4 * 3600;
/// Arguments in an updater's command, and the length of each.
pub const UPDATER_ARGS_MAX: usize = 32;
pub const UPDATER_ARG_BYTES_MAX: usize = 1024;
/// Bundles the daemon keeps.
pub const BUNDLES_MAX: usize = 256;
/// Longest version string a bundle names.
pub const VERSION_BYTES_MAX: usize = 128;
/// Longest failure reason kept on a node (the updater's output tail is longer).
pub const FAILURE_REASON_MAX: usize = 1024;
/// Time a machine is given, on top of its updater's timeout, to download the bundle and
/// report.
pub const DOWNLOAD_ALLOWANCE_MS: i64 = 10 * 60_000;

/// A firmware bundle: one file that brings one component of some machines to one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareBundle {
    pub name: String,
    /// `bios`, `bmc` or `nic:<interface name>`.
    pub component: String,
    /// The version the component reads after the update.
    pub version: String,
    /// Where the file is (an image-store path under `/images/` or an http(s) URL) and
    /// its sha256, which stage 1 verifies before running anything.
    pub artifact: Artifact,
    /// The file's exact size in bytes; at most [`BUNDLE_SIZE_BYTES_MAX`].
    pub size_bytes: u64,
    /// Which machines it is for; empty fields match any.
    #[serde(default)]
    pub applies_to: AppliesTo,
    /// The updater's argument vector, run without a shell; `{file}` is the bundle file.
    pub command: Vec<String>,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Exit codes that mean the firmware was written.
    #[serde(default = "default_success_exit_codes")]
    pub success_exit_codes: Vec<i32>,
    /// How the new firmware is brought into use: `reboot` (stage 1 reboots) or
    /// `power_cycle` (the daemon power-cycles the machine through its BMC).
    #[serde(default = "default_restart")]
    pub restart: FirmwareRestart,
    /// When it was added; set by the daemon.
    #[serde(default)]
    pub created_at_ms: TimestampMs,
}

fn default_timeout_s() -> u64 {
    600
}

fn default_success_exit_codes() -> Vec<i32> {
    vec![0]
}

fn default_restart() -> FirmwareRestart {
    FirmwareRestart::Reboot
}

/// Which machines a bundle is for. Vendor and model compare exactly (as DMI reports
/// them); the version range is inclusive and ordered by [`compare_versions`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliesTo {
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Lowest current version the bundle updates from.
    #[serde(default)]
    pub from_version_min: Option<String>,
    /// Highest current version the bundle updates from.
    #[serde(default)]
    pub from_version_max: Option<String>,
}

/// Orders firmware version strings: split at `.`, `-` and `_`; numeric parts compare as
/// numbers, others as text, a numeric part sorts before a text one; a version that is a
/// prefix of another sorts first. Vendors' version strings are not semver; this is the
/// order their dotted numbers mean.
pub fn compare_versions(left: &str, right: &str) -> Ordering {
    let parts = |text: &str| -> Vec<String> {
        text.split(['.', '-', '_'])
            .map(|part| part.trim().to_ascii_lowercase())
            .collect()
    };
    let (left, right) = (parts(left), parts(right));
    for (a, b) in left.iter().zip(right.iter()) {
        let order = match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) => a.cmp(&b),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => a.cmp(b),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    left.len().cmp(&right.len())
}

impl FirmwareBundle {
    /// Checks a bundle an operator submits; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        let field = |name: &str, why: String| FieldError::new(name, why);
        if self.name.is_empty()
            || self.name.len() > BUNDLE_NAME_MAX
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(field(
                "name",
                format!("must be 1-{BUNDLE_NAME_MAX} characters of a-z, A-Z, 0-9, '-', '_', '.'"),
            ));
        }
        check_component(&self.component)?;
        check_version("version", &self.version)?;
        if !(self.artifact.url.starts_with("/images/")
            || self.artifact.url.starts_with("http://")
            || self.artifact.url.starts_with("https://"))
        {
            return Err(field(
                "artifact.url",
                "must be an image-store path (/images/…) or an http(s) URL".into(),
            ));
        }
        if self.artifact.url.len() > 2048 || self.artifact.url.chars().any(char::is_whitespace) {
            return Err(field(
                "artifact.url",
                "must be at most 2048 characters without whitespace".into(),
            ));
        }
        if self.artifact.sha256.len() != 64
            || !self
                .artifact
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(field(
                "artifact.sha256",
                "must be 64 lowercase hex digits".into(),
            ));
        }
        if self.size_bytes == 0 || self.size_bytes > BUNDLE_SIZE_BYTES_MAX {
            return Err(field(
                "size_bytes",
                format!("must be 1-{BUNDLE_SIZE_BYTES_MAX}"),
            ));
        }
        if let Some(min) = &self.applies_to.from_version_min {
            check_version("applies_to.from_version_min", min)?;
        }
        if let Some(max) = &self.applies_to.from_version_max {
            check_version("applies_to.from_version_max", max)?;
        }
        if let (Some(min), Some(max)) = (
            &self.applies_to.from_version_min,
            &self.applies_to.from_version_max,
        ) {
            if compare_versions(min, max) == Ordering::Greater {
                return Err(field(
                    "applies_to.from_version_min",
                    format!("{min} is above from_version_max {max}"),
                ));
            }
        }
        for (name, value) in [
            ("applies_to.vendor", &self.applies_to.vendor),
            ("applies_to.model", &self.applies_to.model),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.len() > 256)
            {
                return Err(field(name, "must be 1-256 characters when given".into()));
            }
        }
        if self.command.is_empty() || self.command.len() > UPDATER_ARGS_MAX {
            return Err(field(
                "command",
                format!("must have 1-{UPDATER_ARGS_MAX} arguments (the updater's argv, no shell)"),
            ));
        }
        if self.command[0].is_empty() {
            return Err(field(
                "command",
                "the program (first argument) is empty".into(),
            ));
        }
        if let Some(bad) = self
            .command
            .iter()
            .find(|arg| arg.len() > UPDATER_ARG_BYTES_MAX || arg.contains('\0'))
        {
            return Err(field(
                "command",
                format!(
                    "argument {:?}… is longer than {UPDATER_ARG_BYTES_MAX} bytes or holds a NUL",
                    bad.chars().take(32).collect::<String>()
                ),
            ));
        }
        if self.timeout_s == 0 || self.timeout_s > UPDATER_TIMEOUT_S_MAX {
            return Err(field(
                "timeout_s",
                format!("must be 1-{UPDATER_TIMEOUT_S_MAX}"),
            ));
        }
        if self.success_exit_codes.is_empty() || self.success_exit_codes.len() > 16 {
            return Err(field(
                "success_exit_codes",
                "must list 1-16 exit codes".into(),
            ));
        }
        if let Some(code) = self
            .success_exit_codes
            .iter()
            .find(|code| !(0..=255).contains(*code))
        {
            return Err(field(
                "success_exit_codes",
                format!("{code} is not an exit code (0-255)"),
            ));
        }
        Ok(())
    }

    /// Whether this bundle updates `component` of a machine by `vendor`/`model` that
    /// reads `current`, to `target`.
    pub fn applies(
        &self,
        component: &str,
        target: &str,
        vendor: &str,
        model: &str,
        current: Option<&str>,
    ) -> bool {
        if self.component != component || self.version != target {
            return false;
        }
        if self
            .applies_to
            .vendor
            .as_deref()
            .is_some_and(|v| v != vendor)
            || self.applies_to.model.as_deref().is_some_and(|m| m != model)
        {
            return false;
        }
        let bounded = self.applies_to.from_version_min.is_some()
            || self.applies_to.from_version_max.is_some();
        match current {
            // An unreadable version can only be updated by a bundle that does not care.
            None => !bounded,
            Some(current) => {
                self.applies_to
                    .from_version_min
                    .as_deref()
                    .is_none_or(|min| compare_versions(current, min) != Ordering::Less)
                    && self
                        .applies_to
                        .from_version_max
                        .as_deref()
                        .is_none_or(|max| compare_versions(current, max) != Ordering::Greater)
            }
        }
    }

    /// The order stage 1 receives for this bundle; an image-store path is resolved
    /// against `public_url`, the daemon's URL as nodes reach it.
    pub fn order(&self, from_version: Option<String>, public_url: &str) -> FirmwareOrder {
        let url = super::boot::resolve_url(public_url, &self.artifact.url);
        FirmwareOrder {
            bundle: self.name.clone(),
            component: self.component.clone(),
            from_version,
            to_version: self.version.clone(),
            artifact: Artifact {
                url,
                sha256: self.artifact.sha256.clone(),
            },
            size_bytes: self.size_bytes,
            command: self.command.clone(),
            timeout_s: self.timeout_s,
            success_exit_codes: self.success_exit_codes.clone(),
            restart: self.restart,
        }
    }

    /// How long after it is ordered the node has to come back on the new version.
    fn deadline_ms(&self, now_ms: TimestampMs, policy: &RolloutPolicy) -> TimestampMs {
        now_ms + DOWNLOAD_ALLOWANCE_MS + self.timeout_s as i64 * 1000 + policy.restart_grace_ms
    }
}

fn check_component(component: &str) -> Result<(), FieldError> {
    let ok = match component {
        "bios" | "bmc" => true,
        other => other.strip_prefix("nic:").is_some_and(|nic| {
            !nic.is_empty()
                && nic.len() <= 15
                && nic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        }),
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "component",
            "must be bios, bmc or nic:<interface name>".to_string(),
        ))
    }
}

fn check_version(name: &str, version: &str) -> Result<(), FieldError> {
    if version.trim().is_empty() || version.len() > VERSION_BYTES_MAX || version.contains('\n') {
        return Err(FieldError::new(
            name,
            format!("must be 1-{VERSION_BYTES_MAX} characters on one line"),
        ));
    }
    Ok(())
}

/// What Bearman knows of one firmware component of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// The version last reported (`None`: the agent could not read it).
    pub current: Option<String>,
    /// The version reported the first time this component was seen.
    pub first_seen: Option<String>,
    pub first_seen_at_ms: TimestampMs,
    /// When `current` last changed.
    pub changed_at_ms: TimestampMs,
    /// The last version a Bearman bundle brought it to, and when that was confirmed.
    #[serde(default)]
    pub last_flashed: Option<String>,
    #[serde(default)]
    pub last_flashed_at_ms: Option<TimestampMs>,
}

/// The update a node is going through, or last failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFirmwareUpdate {
    pub bundle: String,
    pub component: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// Set while the node holds a rollout slot for it.
    #[serde(default)]
    pub in_flight: Option<InFlight>,
    /// Attempts of this bundle on this node that failed.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub last_failure: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub started_at_ms: TimestampMs,
    /// The updater reported success; the node is restarting onto the new firmware.
    #[serde(default)]
    pub applied_at_ms: Option<TimestampMs>,
    /// By when the node must register again reading the new version.
    pub deadline_ms: TimestampMs,
}

/// The fleet's rollout: who is flashing now, what each bundle's attempts came to, and
/// whether new updates are paused. One record for the whole fleet; every replica reads
/// and writes it with a generation check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRollout {
    /// Bumped by the store on every write; a write must present the one it read.
    #[serde(default)]
    pub generation: i64,
    #[serde(default)]
    pub paused: Option<RolloutPause>,
    #[serde(default)]
    pub slots: Vec<RolloutSlot>,
    #[serde(default)]
    pub tallies: BTreeMap<String, BundleTally>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPause {
    /// An operator's token name, or `system` for the automatic pause.
    pub by: String,
    pub at_ms: TimestampMs,
    pub reason: String,
}

/// One node flashing now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSlot {
    pub uuid: bearman_proto::uuid::NodeUuid,
    pub rack: Option<String>,
    pub bundle: String,
    pub started_at_ms: TimestampMs,
    pub deadline_ms: TimestampMs,
}

/// What one bundle's attempts came to, fleet-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleTally {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
}

impl BundleTally {
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// The rollout rules (`[firmware]` in the daemon's configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutPolicy {
    /// Nodes flashing at once, fleet-wide.
    pub updates_max: usize,
    /// Nodes flashing at once in one rack.
    pub updates_per_rack_max: usize,
    /// A new bundle goes to this many nodes first; no other node starts it until they
    /// all succeeded.
    pub canary_nodes: u64,
    /// Pause the rollout when more than this percentage of a bundle's finished attempts
    /// failed…
    pub failure_pause_percent: u32,
    /// …once at least this many finished.
    pub failure_pause_min_finished: u64,
    /// Failed attempts of one bundle on one node before the node is taken out of service.
    pub attempts_max: u32,
    /// Time a node has, after its updater succeeded, to come back on the new version.
    pub restart_grace_ms: i64,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            updates_max: 10,
            updates_per_rack_max: 2,
            canary_nodes: 1,
            failure_pause_percent: 10,
            failure_pause_min_finished: 5,
            attempts_max: 3,
            restart_grace_ms: 15 * 60_000,
        }
    }
}

impl RolloutPolicy {
    /// Checks the settings; the error names the `firmware.` key.
    pub fn validate(&self) -> Result<(), String> {
        let check = |key: &str, ok: bool, range: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("firmware.{key} must be {range}"))
            }
        };
        check(
            "updates_max",
            (1..=10_000).contains(&self.updates_max),
            "1-10000",
        )?;
        check(
            "updates_per_rack_max",
            (1..=10_000).contains(&self.updates_per_rack_max),
            "1-10000",
        )?;
        check("canary_nodes", self.canary_nodes <= 1_000, "0-1000")?;
        check(
            "failure_pause_percent",
            self.failure_pause_percent <= 100,
            "0-100",
        )?;
        check(
            "failure_pause_min_finished",
            (1..=100_000).contains(&self.failure_pause_min_finished),
            "1-100000",
        )?;
        check(
            "attempts_max",
            (1..=100).contains(&self.attempts_max),
            "1-100",
        )?;
        check(
            "restart_grace_ms",
            (10_000..=86_400_000).contains(&self.restart_grace_ms),
            "10000-86400000",
        )?;
        Ok(())
    }
}

/// Whether a node may start flashing `bundle` now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Start,
    /// Not now; the text says why (for the console and the node view).
    Wait(String),
}

impl FirmwareRollout {
    /// The gate for a node in `rack` wanting `bundle`.
    pub fn gate(&self, bundle: &str, rack: Option<&str>, policy: &RolloutPolicy) -> Gate {
        if let Some(pause) = &self.paused {
            return Gate::Wait(format!(
                "the firmware rollout is paused by {} ({}); `bearman firmware rollout resume` restarts it",
                pause.by, pause.reason
            ));
        }
        if self.slots.len() >= policy.updates_max {
            return Gate::Wait(format!(
                "{} node(s) are flashing, the most at once (firmware.updates_max)",
                self.slots.len()
            ));
        }
        if let Some(rack) = rack {
            let in_rack = self
                .slots
                .iter()
                .filter(|slot| slot.rack.as_deref() == Some(rack))
                .count();
            if in_rack >= policy.updates_per_rack_max {
                return Gate::Wait(format!(
                    "{in_rack} node(s) in rack {rack} are flashing, the most at once (firmware.updates_per_rack_max)"
                ));
            }
        }
        let tally = self.tallies.get(bundle).copied().unwrap_or_default();
        if tally.succeeded < policy.canary_nodes {
            let flashing = self
                .slots
                .iter()
                .filter(|slot| slot.bundle == bundle)
                .count() as u64;
            let canaries_left = policy.canary_nodes - tally.succeeded;
            if flashing >= canaries_left {
                return Gate::Wait(format!(
                    "bundle {bundle} is on its canary group: {} of {} succeeded, {flashing} flashing (firmware.canary_nodes)",
                    tally.succeeded, policy.canary_nodes
                ));
            }
        }
        Gate::Start
    }

    /// Removes `uuid`'s slot, counting the attempt as `succeeded` or failed; pauses the
    /// rollout when the bundle's failure rate passes the threshold. Returns whether a
    /// slot was there (an attempt is counted once, when its slot goes) and the pause it
    /// caused, if any.
    fn finish(
        &mut self,
        uuid: &bearman_proto::uuid::NodeUuid,
        succeeded: bool,
        policy: &RolloutPolicy,
        now_ms: TimestampMs,
    ) -> (bool, Option<RolloutPause>) {
        let Some(index) = self.slots.iter().position(|slot| &slot.uuid == uuid) else {
            return (false, None);
        };
        let slot = self.slots.remove(index);
        let tally = self.tallies.entry(slot.bundle.clone()).or_default();
        if succeeded {
            tally.succeeded += 1;
        } else {
            tally.failed += 1;
        }
        let tally = *tally;
        (
            true,
            self.pause_if_failing(&slot.bundle, tally, policy, now_ms),
        )
    }

    fn pause_if_failing(
        &mut self,
        bundle: &str,
        tally: BundleTally,
        policy: &RolloutPolicy,
        now_ms: TimestampMs,
    ) -> Option<RolloutPause> {
        if self.paused.is_some()
            || tally.finished() < policy.failure_pause_min_finished
            || tally.failed * 100 <= u64::from(policy.failure_pause_percent) * tally.finished()
        {
            return None;
        }
        let pause = RolloutPause {
            by: super::model::SYSTEM_ACTOR.to_string(),
            at_ms: now_ms,
            reason: format!(
                "bundle {bundle}: {} of {} finished updates failed, more than firmware.failure_pause_percent = {} %",
                tally.failed,
                tally.finished(),
                policy.failure_pause_percent
            ),
        };
        self.paused = Some(pause.clone());
        Some(pause)
    }

    /// Drops the slots whose node never came back by their deadline, counting each as a
    /// failure. Returns the uuids dropped and the pause it caused, if any.
    pub fn expire(
        &mut self,
        policy: &RolloutPolicy,
        now_ms: TimestampMs,
    ) -> (Vec<bearman_proto::uuid::NodeUuid>, Option<RolloutPause>) {
        let expired: Vec<_> = self
            .slots
            .iter()
            .filter(|slot| slot.deadline_ms <= now_ms)
            .map(|slot| slot.uuid.clone())
            .collect();
        let mut paused = None;
        for uuid in &expired {
            let (_, pause) = self.finish(uuid, false, policy, now_ms);
            paused = paused.or(pause);
        }
        (expired, paused)
    }
}

/// One audit line the application writes for the node (or the fleet, when `node_event`
/// is false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareNote {
    pub kind: NoteKind,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoteKind {
    /// A component's reported version changed (or was seen the first time).
    Changed,
    /// An update was ordered.
    Started,
    /// The updater reported success; the node restarts.
    Applied,
    /// The node came back on the new version.
    Flashed,
    /// An attempt failed.
    Failed,
    /// The node failed `attempts_max` times: out of service.
    Exhausted,
    /// The rollout paused itself.
    RolloutPaused,
}

/// What a registration means for a node's firmware.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistrationFirmware {
    pub notes: Vec<FirmwareNote>,
    /// The update stage 1 is ordered to apply now.
    pub order: Option<FirmwareBundle>,
    /// Why stage 1 must wait instead of booting.
    pub hold: Option<String>,
    /// Take the node out of service (maintenance) with this reason.
    pub maintenance: Option<String>,
    /// The rollout changed and must be written with the node.
    pub rollout_changed: bool,
}

/// Records the versions a registration reports in the node's per-component inventory;
/// one note listing every component seen the first time or changed (none when nothing
/// did), so a registration writes at most one such event however many NICs it has.
pub fn record_inventory(
    node: &mut Node,
    reported: &FirmwareVersions,
    now_ms: TimestampMs,
) -> Vec<FirmwareNote> {
    let mut first_seen = Vec::new();
    let mut changed = Vec::new();
    for (component, version) in components(reported) {
        match node.firmware_components.get_mut(&component) {
            None => {
                let Some(text) = version.clone() else {
                    continue;
                };
                first_seen.push(format!("{component} {text}"));
                node.firmware_components.insert(
                    component,
                    ComponentRecord {
                        current: version.clone(),
                        first_seen: version,
                        first_seen_at_ms: now_ms,
                        changed_at_ms: now_ms,
                        last_flashed: None,
                        last_flashed_at_ms: None,
                    },
                );
            }
            Some(record) => {
                if record.current != version {
                    changed.push(format!(
                        "{component} {} -> {}",
                        record.current.as_deref().unwrap_or("unknown"),
                        version.as_deref().unwrap_or("unknown")
                    ));
                    record.current = version;
                    record.changed_at_ms = now_ms;
                }
            }
        }
    }
    node.firmware = reported.clone();
    let mut parts = Vec::new();
    if !changed.is_empty() {
        parts.push(format!("changed: {}", changed.join(", ")));
    }
    if !first_seen.is_empty() {
        parts.push(format!("first seen: {}", first_seen.join(", ")));
    }
    if parts.is_empty() {
        return Vec::new();
    }
    vec![FirmwareNote {
        kind: NoteKind::Changed,
        text: format!("firmware {}", parts.join("; ")),
    }]
}

/// The first component behind its expectation that a bundle can update, with the bundle.
pub fn next_update<'a>(
    node: &Node,
    expected: &FirmwareVersions,
    reported: &FirmwareVersions,
    bundles: &'a [FirmwareBundle],
) -> Option<(&'a FirmwareBundle, Option<String>)> {
    for difference in differences(expected, reported) {
        let current = difference.reported.as_deref();
        let mut candidates: Vec<&FirmwareBundle> = bundles
            .iter()
            .filter(|bundle| {
                bundle.applies(
                    &difference.component,
                    &difference.expected,
                    &node.vendor,
                    &node.model,
                    current,
                )
            })
            .collect();
        // The most specific bundle wins, then the name: the same answer on every replica.
        candidates.sort_by_key(|bundle| {
            (
                bundle.applies_to.vendor.is_none(),
                bundle.applies_to.model.is_none(),
                bundle.name.clone(),
            )
        });
        if let Some(bundle) = candidates.first() {
            return Some((bundle, difference.reported.clone()));
        }
    }
    None
}

/// Decides what a registration reporting `reported` means for `node`'s firmware: the
/// inventory, the end of an update in flight (succeeded when the component now reads the
/// bundle's version), and whether an update is ordered now or the node must wait.
/// `node` and `rollout` are changed in place; the result says what to write and audit.
pub fn on_registration(
    node: &mut Node,
    reported: &FirmwareVersions,
    expected: &FirmwareVersions,
    bundles: &[FirmwareBundle],
    rollout: &mut FirmwareRollout,
    policy: &RolloutPolicy,
    now_ms: TimestampMs,
) -> RegistrationFirmware {
    let mut result = RegistrationFirmware {
        notes: record_inventory(node, reported, now_ms),
        ..RegistrationFirmware::default()
    };
    let (expired, pause) = rollout.expire(policy, now_ms);
    if !expired.is_empty() {
        result.rollout_changed = true;
    }
    note_pause(&mut result.notes, pause);

    // An update in flight ends with this registration, one way or the other.
    if let Some(update) = node.firmware_update.as_mut() {
        if let Some(in_flight) = update.in_flight.take() {
            let now_reads = version_of(reported, &update.component).cloned();
            let succeeded = now_reads.as_deref() == Some(update.to_version.as_str());
            let (had_slot, pause) = rollout.finish(&node.uuid, succeeded, policy, now_ms);
            result.rollout_changed |= had_slot;
            note_pause(&mut result.notes, pause);
            if succeeded {
                result.notes.push(FirmwareNote {
                    kind: NoteKind::Flashed,
                    text: format!(
                        "{} firmware {} -> {} by bundle {}",
                        update.component,
                        update.from_version.as_deref().unwrap_or("unknown"),
                        update.to_version,
                        update.bundle
                    ),
                });
                if let Some(record) = node.firmware_components.get_mut(&update.component) {
                    record.last_flashed = Some(update.to_version.clone());
                    record.last_flashed_at_ms = Some(now_ms);
                }
                node.firmware_update = None;
            } else {
                let why = match in_flight.applied_at_ms {
                    Some(_) => format!(
                        "the updater reported success but {} reads {} after the restart, not {}",
                        update.component,
                        now_reads.as_deref().unwrap_or("unknown"),
                        update.to_version
                    ),
                    None if in_flight.deadline_ms <= now_ms => format!(
                        "no report within the deadline; {} reads {}",
                        update.component,
                        now_reads.as_deref().unwrap_or("unknown")
                    ),
                    None => format!(
                        "the machine registered again before reporting the update (it restarted or stage 1 started over); {} reads {}",
                        update.component,
                        now_reads.as_deref().unwrap_or("unknown")
                    ),
                };
                fail(update, &why, &mut result.notes);
            }
        }
    }

    let Some((bundle, from_version)) = next_update(node, expected, reported, bundles) else {
        // Nothing to do: an update record for a bundle that no longer applies goes.
        if node
            .firmware_update
            .as_ref()
            .is_some_and(|update| update.in_flight.is_none())
        {
            node.firmware_update = None;
        }
        return result;
    };
    let update = match node.firmware_update.as_mut() {
        Some(update) if update.bundle == bundle.name => {
            update.from_version = from_version.clone();
            update
        }
        _ => node.firmware_update.insert(NodeFirmwareUpdate {
            bundle: bundle.name.clone(),
            component: bundle.component.clone(),
            from_version: from_version.clone(),
            to_version: bundle.version.clone(),
            in_flight: None,
            failures: 0,
            last_failure: None,
        }),
    };
    if update.failures >= policy.attempts_max {
        let reason = format!(
            "firmware update {} ({} {} -> {}) failed {} time(s), the most allowed (firmware.attempts_max); last: {}; fix it, then `bearman firmware retry {}`",
            update.bundle,
            update.component,
            update.from_version.as_deref().unwrap_or("unknown"),
            update.to_version,
            update.failures,
            update.last_failure.as_deref().unwrap_or("unknown"),
            node.uuid
        );
        result.hold = Some(reason.clone());
        result.maintenance = Some(reason);
        return result;
    }
    match rollout.gate(&bundle.name, node.rack.as_deref(), policy) {
        Gate::Wait(why) => {
            result.hold = Some(format!(
                "firmware update {} ({} -> {}) waits: {why}",
                bundle.name,
                from_version.as_deref().unwrap_or("unknown"),
                bundle.version
            ));
        }
        Gate::Start => {
            let deadline_ms = bundle.deadline_ms(now_ms, policy);
            update.in_flight = Some(InFlight {
                started_at_ms: now_ms,
                applied_at_ms: None,
                deadline_ms,
            });
            rollout.slots.push(RolloutSlot {
                uuid: node.uuid.clone(),
                rack: node.rack.clone(),
                bundle: bundle.name.clone(),
                started_at_ms: now_ms,
                deadline_ms,
            });
            rollout
                .tallies
                .entry(bundle.name.clone())
                .or_default()
                .started += 1;
            result.rollout_changed = true;
            result.notes.push(FirmwareNote {
                kind: NoteKind::Started,
                text: format!(
                    "updating {} firmware {} -> {} with bundle {} (attempt {} of {})",
                    bundle.component,
                    from_version.as_deref().unwrap_or("unknown"),
                    bundle.version,
                    bundle.name,
                    update.failures + 1,
                    policy.attempts_max
                ),
            });
            result.order = Some(bundle.clone());
        }
    }
    result
}

fn fail(update: &mut NodeFirmwareUpdate, why: &str, notes: &mut Vec<FirmwareNote>) {
    update.in_flight = None;
    update.failures += 1;
    update.last_failure = Some(why.chars().take(FAILURE_REASON_MAX).collect());
    notes.push(FirmwareNote {
        kind: NoteKind::Failed,
        text: format!(
            "firmware update {} ({} -> {}) failed (attempt {}): {why}",
            update.bundle, update.component, update.to_version, update.failures
        ),
    });
}

fn note_pause(notes: &mut Vec<FirmwareNote>, pause: Option<RolloutPause>) {
    if let Some(pause) = pause {
        notes.push(FirmwareNote {
            kind: NoteKind::RolloutPaused,
            text: format!("firmware rollout paused: {}", pause.reason),
        });
    }
}

/// Why a report was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    #[error("no firmware update is in flight on this node")]
    NoneInFlight,
    #[error("the update in flight is bundle {in_flight}, not {reported}")]
    OtherBundle { in_flight: String, reported: String },
    #[error("bundle {bundle} was already reported applied")]
    AlreadyApplied { bundle: String },
}

/// What a report changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportEffect {
    pub notes: Vec<FirmwareNote>,
    pub next: bearman_proto::FirmwareNext,
    /// The daemon power-cycles the node through its BMC.
    pub power_cycle: bool,
    /// Take the node out of service with this reason.
    pub maintenance: Option<String>,
}

/// Applies stage 1's report of an update: applied (the node restarts; the slot is kept
/// until it comes back reading the new version) or failed (the slot goes, counted).
pub fn on_report(
    node: &mut Node,
    report: &FirmwareReport,
    restart: FirmwareRestart,
    rollout: &mut FirmwareRollout,
    policy: &RolloutPolicy,
    now_ms: TimestampMs,
) -> Result<ReportEffect, ReportRefused> {
    let uuid = node.uuid.clone();
    let Some(update) = node.firmware_update.as_mut() else {
        return Err(ReportRefused::NoneInFlight);
    };
    let Some(in_flight) = update.in_flight.as_mut() else {
        return Err(ReportRefused::NoneInFlight);
    };
    if update.bundle != report.bundle {
        return Err(ReportRefused::OtherBundle {
            in_flight: update.bundle.clone(),
            reported: report.bundle.clone(),
        });
    }
    if in_flight.applied_at_ms.is_some() {
        return Err(ReportRefused::AlreadyApplied {
            bundle: report.bundle.clone(),
        });
    }
    let detail: String = report.detail.chars().take(FAILURE_REASON_MAX).collect();
    match report.outcome {
        FirmwareOutcome::Applied => {
            in_flight.applied_at_ms = Some(now_ms);
            in_flight.deadline_ms = now_ms + policy.restart_grace_ms;
            if let Some(slot) = rollout.slots.iter_mut().find(|slot| slot.uuid == uuid) {
                slot.deadline_ms = in_flight.deadline_ms;
            }
            Ok(ReportEffect {
                notes: vec![FirmwareNote {
                    kind: NoteKind::Applied,
                    text: format!(
                        "bundle {} written to {} (updater exit {}); restarting by {}",
                        update.bundle,
                        update.component,
                        report
                            .exit_code
                            .map_or_else(|| "unknown".to_string(), |code| code.to_string()),
                        restart.as_str()
                    ),
                }],
                next: match restart {
                    FirmwareRestart::Reboot => bearman_proto::FirmwareNext::Reboot,
                    FirmwareRestart::PowerCycle => bearman_proto::FirmwareNext::AwaitPowerCycle,
                },
                power_cycle: restart == FirmwareRestart::PowerCycle,
                maintenance: None,
            })
        }
        FirmwareOutcome::Failed => {
            // Stage 1's detail already says how the updater ended; an empty one says it
            // here.
            let why = match (detail.trim().is_empty(), report.exit_code) {
                (false, _) => detail,
                (true, Some(code)) => format!("updater exit {code}"),
                (true, None) => "stage 1 reported a failure without detail".to_string(),
            };
            let mut notes = Vec::new();
            fail(update, &why, &mut notes);
            let exhausted = update.failures >= policy.attempts_max;
            let maintenance = exhausted.then(|| {
                format!(
                    "firmware update {} failed {} time(s), the most allowed (firmware.attempts_max); last: {}; fix it, then `bearman firmware retry {uuid}`",
                    update.bundle,
                    update.failures,
                    update.last_failure.as_deref().unwrap_or("unknown")
                )
            });
            let (_, pause) = rollout.finish(&uuid, false, policy, now_ms);
            note_pause(&mut notes, pause);
            Ok(ReportEffect {
                notes,
                next: bearman_proto::FirmwareNext::RegisterAgain,
                power_cycle: false,
                maintenance,
            })
        }
    }
}

/// How the node stands against its flavor, for `bearman node show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub component: String,
    pub expected: Option<String>,
    pub current: Option<String>,
    pub compliant: bool,
}

/// One line of the fleet's drift report: how many nodes run `actual` of `component`
/// where their flavor expects `expected`, and which (the first few).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftLine {
    pub component: String,
    pub expected: String,
    /// `None`: the version could not be read.
    pub actual: Option<String>,
    pub flavor: String,
    pub nodes: u64,
    /// At most [`DRIFT_NODES_LISTED_MAX`] uuids, sorted.
    pub uuids: Vec<bearman_proto::uuid::NodeUuid>,
    /// Whether a bundle can update them.
    pub bundle: Option<String>,
}

pub const DRIFT_NODES_LISTED_MAX: usize = 20;

/// The fleet's firmware drift, built one page of nodes at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Nodes whose flavor expects something and that meet it.
    pub compliant_nodes: u64,
    /// Nodes behind on at least one component.
    pub drifting_nodes: u64,
    /// Nodes with an update in flight, and those out of service after failed attempts.
    pub updating_nodes: u64,
    pub failed_nodes: u64,
    pub lines: Vec<DriftLine>,
}

impl DriftReport {
    /// Adds one node, whose flavor expects `expected`.
    pub fn add(
        &mut self,
        node: &Node,
        flavor: &str,
        expected: &FirmwareVersions,
        bundles: &[FirmwareBundle],
        policy: &RolloutPolicy,
    ) {
        if let Some(update) = &node.firmware_update {
            if update.in_flight.is_some() {
                self.updating_nodes += 1;
            } else if update.failures >= policy.attempts_max {
                self.failed_nodes += 1;
            }
        }
        let behind = differences(expected, &node.firmware);
        if behind.is_empty() {
            if *expected != FirmwareVersions::default() {
                self.compliant_nodes += 1;
            }
            return;
        }
        self.drifting_nodes += 1;
        for difference in behind {
            let bundle = bundles
                .iter()
                .find(|bundle| {
                    bundle.applies(
                        &difference.component,
                        &difference.expected,
                        &node.vendor,
                        &node.model,
                        difference.reported.as_deref(),
                    )
                })
                .map(|bundle| bundle.name.clone());
            let line = match self.lines.iter_mut().find(|line| {
                line.component == difference.component
                    && line.expected == difference.expected
                    && line.actual == difference.reported
                    && line.flavor == flavor
            }) {
                Some(line) => line,
                None => {
                    self.lines.push(DriftLine {
                        component: difference.component.clone(),
                        expected: difference.expected.clone(),
                        actual: difference.reported.clone(),
                        flavor: flavor.to_string(),
                        nodes: 0,
                        uuids: Vec::new(),
                        bundle: None,
                    });
                    self.lines.last_mut().expect("just pushed")
                }
            };
            line.nodes += 1;
            if line.uuids.len() < DRIFT_NODES_LISTED_MAX {
                line.uuids.push(node.uuid.clone());
            }
            if line.bundle.is_none() {
                line.bundle = bundle;
            }
        }
    }

    /// Sorts the lines: most nodes first, then by component and versions.
    pub fn finish(&mut self) {
        for line in &mut self.lines {
            line.uuids.sort();
        }
        self.lines.sort_by(|a, b| {
            b.nodes
                .cmp(&a.nodes)
                .then_with(|| a.component.cmp(&b.component))
                .then_with(|| a.flavor.cmp(&b.flavor))
                .then_with(|| a.actual.cmp(&b.actual))
        });
    }
}

/// Per-component view of a node against what its flavor expects.
pub fn node_status(node: &Node, expected: &FirmwareVersions) -> Vec<ComponentStatus> {
    let mut rows: Vec<ComponentStatus> = components(&node.firmware)
        .into_iter()
        .map(|(component, current)| {
            let expected_version = version_of(expected, &component).cloned();
            ComponentStatus {
                compliant: expected_version.is_none() || expected_version == current,
                component,
                expected: expected_version,
                current,
            }
        })
        .collect();
    for (component, expected_version) in components(expected) {
        if expected_version.is_some() && !rows.iter().any(|row| row.component == component) {
            rows.push(ComponentStatus {
                component,
                expected: expected_version,
                current: None,
                compliant: false,
            });
        }
    }
    rows.retain(|row| row.current.is_some() || row.expected.is_some());
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::NodeRole;
    use bearman_proto::uuid::NodeUuid;
    use bearman_proto::FirmwareNext;

    fn uuid(n: u32) -> NodeUuid {
        NodeUuid::parse(&format!("00000000-0000-0000-0000-{n:012}")).unwrap()
    }

    fn node(n: u32, rack: &str, bios: &str) -> Node {
        let mut node = Node::new(uuid(n), format!("n{n}"), NodeRole::Compute, 0);
        node.vendor = "Dell Inc.".into();
        node.model = "R650".into();
        node.rack = Some(rack.into());
        node.firmware.bios = Some(bios.into());
        node
    }

    fn bios(version: &str) -> FirmwareVersions {
        FirmwareVersions {
            bios: Some(version.into()),
            ..FirmwareVersions::default()
        }
    }

    fn bundle(name: &str, version: &str) -> FirmwareBundle {
        FirmwareBundle {
            name: name.into(),
            component: "bios".into(),
            version: version.into(),
            artifact: Artifact {
                url: "/images/bios.bin".into(),
                sha256: "a".repeat(64),
            },
            size_bytes: 1024,
            applies_to: AppliesTo::default(),
            command: vec!["/usr/bin/flash".into(), "{file}".into()],
            timeout_s: 60,
            success_exit_codes: vec![0],
            restart: FirmwareRestart::Reboot,
            created_at_ms: 0,
        }
    }

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            updates_max: 2,
            updates_per_rack_max: 1,
            canary_nodes: 0,
            failure_pause_percent: 10,
            failure_pause_min_finished: 3,
            attempts_max: 2,
            restart_grace_ms: 60_000,
        }
    }

    /// Registers `node` reporting `reported` against an expectation of bios 2.0.
    fn register(
        node: &mut Node,
        reported: &str,
        bundles: &[FirmwareBundle],
        rollout: &mut FirmwareRollout,
        policy: &RolloutPolicy,
        now: i64,
    ) -> RegistrationFirmware {
        on_registration(
            node,
            &bios(reported),
            &bios("2.0"),
            bundles,
            rollout,
            policy,
            now,
        )
    }

    fn kinds(notes: &[FirmwareNote]) -> Vec<NoteKind> {
        notes.iter().map(|note| note.kind).collect()
    }

    #[test]
    fn versions_order_by_their_numbers_not_their_text() {
        use Ordering::*;
        for (left, right, want) in [
            ("1.9", "1.10", Less),
            ("2.0", "2.0", Equal),
            ("2.0", "2.0.1", Less),
            ("1.2.3", "1.2-3", Equal),
            ("U46", "U47", Less),
            ("10", "9", Greater),
            ("1.0a", "1.0", Greater),
            ("1.2", "1.beta", Less),
        ] {
            assert_eq!(compare_versions(left, right), want, "{left} vs {right}");
        }
    }

    #[test]
    fn a_bundle_refuses_what_it_cannot_run_safely_naming_the_field() {
        type BreakIt = Box<dyn Fn(&mut FirmwareBundle)>;
        let cases: Vec<(&str, BreakIt)> = vec![
            ("name", Box::new(|b| b.name = "a b".into())),
            ("component", Box::new(|b| b.component = "gpu".into())),
            ("component", Box::new(|b| b.component = "nic:".into())),
            ("version", Box::new(|b| b.version = " ".into())),
            (
                "artifact.url",
                Box::new(|b| b.artifact.url = "ftp://x".into()),
            ),
            (
                "artifact.sha256",
                Box::new(|b| b.artifact.sha256 = "ABC".into()),
            ),
            ("size_bytes", Box::new(|b| b.size_bytes = 0)),
            (
                "size_bytes",
                Box::new(|b| b.size_bytes = BUNDLE_SIZE_BYTES_MAX + 1),
            ),
            ("command", Box::new(|b| b.command.clear())),
            ("command", Box::new(|b| b.command = vec!["".into()])),
            ("timeout_s", Box::new(|b| b.timeout_s = 0)),
            (
                "success_exit_codes",
                Box::new(|b| b.success_exit_codes = vec![300]),
            ),
            (
                "applies_to.from_version_min",
                Box::new(|b| {
                    b.applies_to.from_version_min = Some("3".into());
                    b.applies_to.from_version_max = Some("2".into());
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut bad = bundle("b", "2.0");
            break_it(&mut bad);
            let error = bad.validate().unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        bundle("b", "2.0").validate().unwrap();
    }

    #[test]
    fn a_bundle_applies_only_to_its_component_target_machines_and_version_range() {
        let mut b = bundle("b", "2.0");
        b.applies_to = AppliesTo {
            vendor: Some("Dell Inc.".into()),
            model: None,
            from_version_min: Some("1.5".into()),
            from_version_max: Some("1.9".into()),
        };
        let applies = |component: &str, target: &str, vendor: &str, current: Option<&str>| {
            b.applies(component, target, vendor, "R650", current)
        };
        assert!(applies("bios", "2.0", "Dell Inc.", Some("1.5")));
        assert!(applies("bios", "2.0", "Dell Inc.", Some("1.9")));
        assert!(
            !applies("bios", "2.0", "Dell Inc.", Some("1.10")),
            "1.10 is above 1.9"
        );
        assert!(!applies("bios", "2.0", "Dell Inc.", Some("1.4")));
        assert!(
            !applies("bios", "2.0", "Dell Inc.", None),
            "a range needs a version"
        );
        assert!(
            !applies("bios", "2.1", "Dell Inc.", Some("1.6")),
            "another target"
        );
        assert!(!applies("bmc", "2.0", "Dell Inc.", Some("1.6")));
        assert!(!applies("bios", "2.0", "HPE", Some("1.6")));
    }

    #[test]
    fn a_node_behind_gets_the_bundle_then_is_recorded_flashed_when_it_reads_the_new_version() {
        let bundles = [bundle("bios-2", "2.0")];
        let mut rollout = FirmwareRollout::default();
        let mut n = node(1, "r1", "1.0");
        let first = register(&mut n, "1.0", &bundles, &mut rollout, &policy(), 1_000);
        assert_eq!(
            first.order.as_ref().map(|b| b.name.as_str()),
            Some("bios-2")
        );
        assert_eq!(first.hold, None);
        assert!(first.rollout_changed);
        assert_eq!(kinds(&first.notes), [NoteKind::Changed, NoteKind::Started]);
        assert_eq!(rollout.slots.len(), 1);
        assert_eq!(rollout.tallies["bios-2"].started, 1);

        let report = FirmwareReport {
            bundle: "bios-2".into(),
            outcome: FirmwareOutcome::Applied,
            exit_code: Some(0),
            detail: String::new(),
        };
        let effect = on_report(
            &mut n,
            &report,
            FirmwareRestart::Reboot,
            &mut rollout,
            &policy(),
            2_000,
        )
        .unwrap();
        assert_eq!(effect.next, FirmwareNext::Reboot);
        assert!(!effect.power_cycle);
        assert_eq!(
            rollout.slots.len(),
            1,
            "the slot is kept until the node comes back"
        );
        assert_eq!(
            on_report(
                &mut n,
                &report,
                FirmwareRestart::Reboot,
                &mut rollout,
                &policy(),
                2_001
            ),
            Err(ReportRefused::AlreadyApplied {
                bundle: "bios-2".into()
            })
        );

        let back = register(&mut n, "2.0", &bundles, &mut rollout, &policy(), 3_000);
        assert_eq!(back.order, None);
        assert_eq!(back.hold, None);
        assert_eq!(kinds(&back.notes), [NoteKind::Changed, NoteKind::Flashed]);
        assert!(rollout.slots.is_empty());
        assert_eq!(rollout.tallies["bios-2"].succeeded, 1);
        let record = &n.firmware_components["bios"];
        assert_eq!(record.first_seen.as_deref(), Some("1.0"));
        assert_eq!(record.current.as_deref(), Some("2.0"));
        assert_eq!(record.last_flashed.as_deref(), Some("2.0"));
        assert_eq!(record.last_flashed_at_ms, Some(3_000));
        assert_eq!(n.firmware_update, None);
    }

    #[test]
    fn the_gate_holds_nodes_past_the_fleet_and_rack_caps_and_while_paused() {
        let bundles = [bundle("bios-2", "2.0")];
        let policy = policy();
        let mut rollout = FirmwareRollout::default();
        let mut a = node(1, "r1", "1.0");
        let mut b = node(2, "r1", "1.0");
        let mut c = node(3, "r2", "1.0");
        let mut d = node(4, "r3", "1.0");
        assert!(register(&mut a, "1.0", &bundles, &mut rollout, &policy, 0)
            .order
            .is_some());
        let same_rack = register(&mut b, "1.0", &bundles, &mut rollout, &policy, 0);
        assert!(same_rack.order.is_none());
        assert!(same_rack.hold.unwrap().contains("updates_per_rack_max"));
        assert!(register(&mut c, "1.0", &bundles, &mut rollout, &policy, 0)
            .order
            .is_some());
        let fleet_full = register(&mut d, "1.0", &bundles, &mut rollout, &policy, 0);
        assert!(fleet_full.hold.unwrap().contains("updates_max"));

        let mut paused = FirmwareRollout {
            paused: Some(RolloutPause {
                by: "token:ops".into(),
                at_ms: 0,
                reason: "vendor recall".into(),
            }),
            ..FirmwareRollout::default()
        };
        let held = register(&mut d, "1.0", &bundles, &mut paused, &policy, 0);
        assert!(held
            .hold
            .unwrap()
            .contains("paused by token:ops (vendor recall)"));
        assert!(paused.slots.is_empty());
    }

    #[test]
    fn a_new_bundle_goes_to_its_canaries_first() {
        let bundles = [bundle("bios-2", "2.0")];
        let policy = RolloutPolicy {
            canary_nodes: 1,
            updates_per_rack_max: 10,
            ..policy()
        };
        let mut rollout = FirmwareRollout::default();
        let mut canary = node(1, "r1", "1.0");
        let mut next = node(2, "r1", "1.0");
        assert!(
            register(&mut canary, "1.0", &bundles, &mut rollout, &policy, 0)
                .order
                .is_some()
        );
        let waits = register(&mut next, "1.0", &bundles, &mut rollout, &policy, 0);
        assert!(waits.hold.unwrap().contains("canary"));
        // The canary comes back flashed: the others may go.
        register(&mut canary, "2.0", &bundles, &mut rollout, &policy, 10);
        assert!(
            register(&mut next, "1.0", &bundles, &mut rollout, &policy, 20)
                .order
                .is_some()
        );
    }

    #[test]
    fn failed_attempts_are_retried_then_take_the_node_out_of_service() {
        let bundles = [bundle("bios-2", "2.0")];
        let policy = RolloutPolicy {
            failure_pause_min_finished: 100,
            ..policy()
        };
        let mut rollout = FirmwareRollout::default();
        let mut n = node(1, "r1", "1.0");
        let failed = FirmwareReport {
            bundle: "bios-2".into(),
            outcome: FirmwareOutcome::Failed,
            exit_code: Some(3),
            detail: "checksum of the image region failed".into(),
        };
        register(&mut n, "1.0", &bundles, &mut rollout, &policy, 0);
        let first = on_report(
            &mut n,
            &failed,
            FirmwareRestart::Reboot,
            &mut rollout,
            &policy,
            1,
        )
        .unwrap();
        assert_eq!(first.next, FirmwareNext::RegisterAgain);
        assert_eq!(first.maintenance, None);
        assert!(rollout.slots.is_empty());
        assert_eq!(rollout.tallies["bios-2"].failed, 1);
        // The second attempt: the machine registers again without reporting (it restarted
        // mid-flash), which counts as a failure too.
        assert!(register(&mut n, "1.0", &bundles, &mut rollout, &policy, 2)
            .order
            .is_some());
        let third = register(&mut n, "1.0", &bundles, &mut rollout, &policy, 3);
        assert_eq!(third.order, None);
        assert!(kinds(&third.notes).contains(&NoteKind::Failed));
        let reason = third.maintenance.unwrap();
        assert!(reason.contains("failed 2 time(s)"), "{reason}");
        assert!(reason.contains("bearman firmware retry"), "{reason}");
        assert_eq!(third.hold.as_deref(), Some(reason.as_str()));
        assert_eq!(rollout.tallies["bios-2"].failed, 2);
    }

    #[test]
    fn the_rollout_pauses_itself_when_failures_pass_the_threshold() {
        let bundles = [bundle("bios-2", "2.0")];
        let policy = RolloutPolicy {
            updates_max: 100,
            updates_per_rack_max: 100,
            failure_pause_percent: 30,
            failure_pause_min_finished: 3,
            ..policy()
        };
        let mut rollout = FirmwareRollout::default();
        let mut nodes: Vec<Node> = (1..=6).map(|i| node(i, "r1", "1.0")).collect();
        for n in &mut nodes {
            assert!(register(n, "1.0", &bundles, &mut rollout, &policy, 0)
                .order
                .is_some());
        }
        let failed = FirmwareReport {
            bundle: "bios-2".into(),
            outcome: FirmwareOutcome::Failed,
            exit_code: Some(1),
            detail: String::new(),
        };
        // Two successes, then one failure: 1 of 3 = 33 % > 30 %.
        register(&mut nodes[0], "2.0", &bundles, &mut rollout, &policy, 1);
        register(&mut nodes[1], "2.0", &bundles, &mut rollout, &policy, 1);
        assert_eq!(rollout.paused, None);
        let effect = on_report(
            &mut nodes[2],
            &failed,
            FirmwareRestart::Reboot,
            &mut rollout,
            &policy,
            2,
        )
        .unwrap();
        assert!(kinds(&effect.notes).contains(&NoteKind::RolloutPaused));
        let pause = rollout.paused.clone().unwrap();
        assert_eq!(pause.by, crate::core::model::SYSTEM_ACTOR);
        assert!(pause.reason.contains("1 of 3"), "{}", pause.reason);
        // Those already flashing finish; nobody new starts.
        let mut late = node(9, "r2", "1.0");
        assert!(
            register(&mut late, "1.0", &bundles, &mut rollout, &policy, 3)
                .hold
                .unwrap()
                .contains("paused")
        );
        assert_eq!(rollout.slots.len(), 3);
    }

    #[test]
    fn a_slot_whose_node_never_came_back_expires_as_a_failure() {
        let bundles = [bundle("bios-2", "2.0")];
        let mut rollout = FirmwareRollout::default();
        let mut n = node(1, "r1", "1.0");
        register(&mut n, "1.0", &bundles, &mut rollout, &policy(), 0);
        let deadline = rollout.slots[0].deadline_ms;
        assert_eq!(
            deadline,
            DOWNLOAD_ALLOWANCE_MS + 60_000 + policy().restart_grace_ms
        );
        let (expired, _) = rollout.expire(&policy(), deadline - 1);
        assert!(expired.is_empty());
        let (expired, _) = rollout.expire(&policy(), deadline);
        assert_eq!(expired, vec![uuid(1)]);
        assert_eq!(rollout.tallies["bios-2"].failed, 1);
        // When the node does come back, it is not counted a second time.
        let late = register(
            &mut n,
            "1.0",
            &bundles,
            &mut rollout,
            &policy(),
            deadline + 5,
        );
        assert_eq!(rollout.tallies["bios-2"].failed, 1);
        assert!(late.notes.iter().any(|note| note.text.contains("deadline")));
    }

    #[test]
    fn nothing_is_ordered_without_a_bundle_that_fits_and_a_stale_record_goes() {
        let mut rollout = FirmwareRollout::default();
        let mut n = node(1, "r1", "1.0");
        let mut other_vendor = bundle("bios-2", "2.0");
        other_vendor.applies_to.vendor = Some("HPE".into());
        let none = register(&mut n, "1.0", &[other_vendor], &mut rollout, &policy(), 0);
        assert_eq!((none.order, none.hold), (None, None));
        assert!(!none.rollout_changed);
        assert_eq!(n.firmware_update, None);
    }

    #[test]
    fn a_report_for_another_bundle_or_none_in_flight_is_refused() {
        let mut rollout = FirmwareRollout::default();
        let mut n = node(1, "r1", "1.0");
        let report = FirmwareReport {
            bundle: "bios-2".into(),
            outcome: FirmwareOutcome::Applied,
            exit_code: Some(0),
            detail: String::new(),
        };
        assert_eq!(
            on_report(
                &mut n,
                &report,
                FirmwareRestart::Reboot,
                &mut rollout,
                &policy(),
                0
            ),
            Err(ReportRefused::NoneInFlight)
        );
        register(
            &mut n,
            "1.0",
            &[bundle("bios-3", "2.0")],
            &mut rollout,
            &policy(),
            0,
        );
        assert_eq!(
            on_report(
                &mut n,
                &report,
                FirmwareRestart::Reboot,
                &mut rollout,
                &policy(),
                0
            ),
            Err(ReportRefused::OtherBundle {
                in_flight: "bios-3".into(),
                reported: "bios-2".into()
            })
        );
    }

    #[test]
    fn drift_groups_nodes_by_component_versions_and_flavor() {
        let bundles = [bundle("bios-2", "2.0")];
        let expected = bios("2.0");
        let mut report = DriftReport::default();
        for (i, version) in [(1, "1.0"), (2, "1.0"), (3, "2.0"), (4, "1.5")] {
            report.add(
                &node(i, "r1", version),
                "hv",
                &expected,
                &bundles,
                &policy(),
            );
        }
        report.finish();
        assert_eq!(report.compliant_nodes, 1);
        assert_eq!(report.drifting_nodes, 3);
        let lines: Vec<(Option<&str>, u64, Option<&str>)> = report
            .lines
            .iter()
            .map(|l| (l.actual.as_deref(), l.nodes, l.bundle.as_deref()))
            .collect();
        assert_eq!(
            lines,
            [
                (Some("1.0"), 2, Some("bios-2")),
                (Some("1.5"), 1, Some("bios-2"))
            ]
        );
        assert_eq!(report.lines[0].uuids, [uuid(1), uuid(2)]);
    }
}
