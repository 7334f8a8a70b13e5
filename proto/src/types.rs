//! JSON bodies exchanged on the network-boot endpoints (`/ipxe/{uuid}/…`).
//!
//! Unknown fields are rejected so a typo in an agent is a clear 422, not silently dropped data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the stage-1 agent reports about the machine it runs on (`POST /ipxe/{uuid}/register`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub serial: String,
    #[serde(default)]
    pub vendor: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub cpu: CpuFacts,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub disks: Vec<DiskFacts>,
    pub nics: Vec<NicFacts>,
    #[serde(default)]
    pub firmware: FirmwareVersions,
    /// The BMC as the agent found it (`ipmitool lan print`), if the machine has one.
    #[serde(default)]
    pub bmc: Option<BmcFacts>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFacts {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub sockets: u32,
    #[serde(default)]
    pub cores: u32,
    #[serde(default)]
    pub threads: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFacts {
    pub name: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub model: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicFacts {
    pub name: String,
    pub mac: String,
    #[serde(default)]
    pub speed_mbps: Option<u32>,
    /// Neighbouring switch as read from LLDP, when a frame was heard in time.
    #[serde(default)]
    pub lldp: Option<LldpNeighbor>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LldpNeighbor {
    pub chassis_id: String,
    pub port_id: String,
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default)]
    pub system_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareVersions {
    #[serde(default)]
    pub bios: Option<String>,
    #[serde(default)]
    pub bmc: Option<String>,
    /// NIC firmware by NIC name.
    #[serde(default)]
    pub nics: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcFacts {
    pub mac: String,
    #[serde(default)]
    pub address: Option<String>,
}

/// What the daemon answers to a registration: who the node is and how to set its BMC up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub uuid: String,
    pub hostname: String,
    pub state: String,
    /// BMC LAN settings to apply with ipmitool; `None` when no BMC pool is configured.
    pub bmc: Option<BmcSettings>,
    /// Firmware versions the node's flavor expects, for the agent to compare.
    pub firmware_expected: FirmwareVersions,
    /// The machine is recorded but not accepted into the fleet yet (the daemon's
    /// enrollment policy): no address, no boot files. The agent waits and registers
    /// again. Absent (false) from daemons without enrollment policies.
    #[serde(default)]
    pub awaiting_acceptance: bool,
    /// A firmware update stage 1 must apply before it boots anything: download, verify,
    /// run the updater, report (`POST /ipxe/{uuid}/firmware`), restart. Absent from
    /// daemons without firmware bundles.
    #[serde(default)]
    pub firmware_update: Option<FirmwareOrder>,
    /// Why the machine must wait in stage 1 instead of booting: a firmware update it needs
    /// waits for a rollout slot, the rollout is paused, or its updates failed too often
    /// (the node is then in maintenance). The agent says it on the console and registers
    /// again after its backoff.
    #[serde(default)]
    pub firmware_hold: Option<String>,
}

/// One firmware update ordered by the daemon: a bundle and how to apply it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareOrder {
    /// The bundle's name, echoed back in the report.
    pub bundle: String,
    /// `bios`, `bmc` or `nic:<name>`.
    pub component: String,
    /// The version the machine reported (`None`: it could not be read).
    pub from_version: Option<String>,
    /// The version the bundle installs.
    pub to_version: String,
    /// Where the bundle file is and its sha256, verified before the updater runs.
    pub artifact: Artifact,
    /// The bundle file's exact size; a download that grows past it is cut off.
    pub size_bytes: u64,
    /// The updater's argument vector; `{file}` is replaced by the downloaded file's path.
    pub command: Vec<String>,
    /// The updater is killed after this long and the update counts as failed.
    pub timeout_s: u64,
    /// Exit codes that mean the firmware was written.
    pub success_exit_codes: Vec<i32>,
    /// How the new firmware is brought into use once written.
    pub restart: FirmwareRestart,
}

/// How a machine starts on its new firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareRestart {
    /// Stage 1 reboots the machine itself.
    Reboot,
    /// The daemon power-cycles it through its BMC (firmware that only loads from cold).
    PowerCycle,
}

impl FirmwareRestart {
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareRestart::Reboot => "reboot",
            FirmwareRestart::PowerCycle => "power_cycle",
        }
    }
}

/// Body of `POST /ipxe/{uuid}/firmware`: what came of a [`FirmwareOrder`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareReport {
    pub bundle: String,
    pub outcome: FirmwareOutcome,
    /// The updater's exit code, when it ran to an exit.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Why it failed, or the updater's last output lines (at most
    /// [`FIRMWARE_REPORT_DETAIL_MAX`] bytes).
    #[serde(default)]
    pub detail: String,
}

/// Longest `detail` a firmware report may carry.
pub const FIRMWARE_REPORT_DETAIL_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareOutcome {
    /// The updater exited with a success code: the firmware is written and takes effect
    /// after the restart.
    Applied,
    /// Download, verification or the updater failed; nothing was restarted.
    Failed,
}

/// The daemon's answer to a [`FirmwareReport`]: what stage 1 does next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareReportAnswer {
    pub next: FirmwareNext,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareNext {
    /// Reboot the machine now.
    Reboot,
    /// The daemon is power-cycling the machine through its BMC: wait for it.
    AwaitPowerCycle,
    /// Register again (a failed update: the daemon decides whether to retry or hold).
    RegisterAgain,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BmcSettings {
    pub address: String,
    pub prefix_len: u8,
    pub gateway: Option<String>,
    pub vlan: Option<u16>,
}

/// `GET /ipxe/{uuid}/profile`: what stage 2 is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootProfile {
    pub flavor: String,
    pub kernel: Artifact,
    pub initrds: Vec<Artifact>,
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub url: String,
    /// Lowercase hex sha256 the agent must verify before kexec.
    pub sha256: String,
}

/// `GET /ipxe/{uuid}/detail`: the node's network identity for stage 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetail {
    pub hostname: String,
    pub vlan: Option<u16>,
    /// bond0 addresses in CIDR notation; empty when the node keeps DHCP.
    pub bond0_addresses: Vec<String>,
    /// MACs of the NICs enslaved to bond0.
    pub bond0_slaves: Vec<String>,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
    pub mtu: u32,
}

/// Optional body of `POST /ipxe/{uuid}/installed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledReport {
    #[serde(default)]
    pub os_release: Option<String>,
}

/// Body of `POST /ipxe/{uuid}/progress`: a boot milestone only the node can see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootProgressReport {
    /// `stage1`: the stage-1 agent is running.
    pub phase: String,
}

/// What the stage-1 agent reports when it starts.
pub const BOOT_PHASE_STAGE1: &str = "stage1";

/// Optional body of `POST /ipxe/{uuid}/heartbeat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub uptime_s: Option<u64>,
}

/// The JSON body of every error the daemon returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `invalid_uuid`, `illegal_transition`.
    pub error: String,
    /// Human-readable explanation naming the offending field or state.
    pub message: String,
}
