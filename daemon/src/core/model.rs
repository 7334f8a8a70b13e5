//! The domain model: nodes, flavors (boot profiles), IP pools and allocations, events,
//! API tokens. Plain data; persistence lives in `store`, rules in the sibling modules.

use std::collections::BTreeMap;

use bearman_proto::uuid::NodeUuid;
use bearman_proto::{CpuFacts, DiskFacts, FirmwareVersions, NicFacts};
use serde::{Deserialize, Serialize};

use super::lifecycle::LifecycleState;

/// Milliseconds since the Unix epoch, as read from the injected clock.
pub type TimestampMs = i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Compute,
    Storage,
    LoadBalancer,
    ControlPlane,
}

impl NodeRole {
    pub const ALL: [NodeRole; 4] = [
        NodeRole::Compute,
        NodeRole::Storage,
        NodeRole::LoadBalancer,
        NodeRole::ControlPlane,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Compute => "compute",
            NodeRole::Storage => "storage",
            NodeRole::LoadBalancer => "load_balancer",
            NodeRole::ControlPlane => "control_plane",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BmcDriver {
    Ipmi,
    Redfish,
    /// QEMU's QMP socket, for VMs standing in for servers (smoke boots).
    Qmp,
    /// The simulator's virtual BMC.
    Sim,
}

/// How to reach a node's BMC. Credentials are a *reference* (a key in the secrets file or
/// an environment variable name), never the secret itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcConfig {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub driver: Option<BmcDriver>,
    #[serde(default)]
    pub credentials_ref: Option<String>,
}

/// Hardware facts as last registered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu: CpuFacts,
    pub memory_bytes: u64,
    pub disks: Vec<DiskFacts>,
    /// NICs with their LLDP neighbour (switch chassis, port, VLAN), if one was heard.
    pub nics: Vec<NicFacts>,
}

/// The node's network identity handed to stage 2 (`/ipxe/{uuid}/detail`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub vlan: Option<u16>,
    /// Addresses in CIDR notation.
    pub bond0_addresses: Vec<String>,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub uuid: NodeUuid,
    pub hostname: String,
    pub serial: String,
    pub vendor: String,
    pub model: String,
    pub role: NodeRole,
    pub flavor: Option<String>,
    /// Failure domain; defaults to the top-of-rack switch heard over LLDP.
    pub rack: Option<String>,
    pub state: LifecycleState,
    /// Bumped on every update; writers must present the generation they read.
    pub generation: i64,
    pub hardware: Hardware,
    pub firmware: FirmwareVersions,
    pub bmc: BmcConfig,
    pub network: NetworkConfig,
    pub created_at_ms: TimestampMs,
    pub updated_at_ms: TimestampMs,
    pub registered_at_ms: Option<TimestampMs>,
    pub installed_at_ms: Option<TimestampMs>,
    pub last_heartbeat_at_ms: Option<TimestampMs>,
    /// The last boot milestone the daemon witnessed, and when (the boot watchdog's clock).
    #[serde(default)]
    pub boot: Option<BootProgress>,
    /// Who put the node in maintenance and why, while it is there: an operator's hold
    /// and a node the controller parked look the same to the lifecycle, not to a human.
    #[serde(default)]
    pub maintenance: Option<MaintenanceHold>,
    /// Set while a machine that registered by itself waits for an operator (or an
    /// allow-list) to accept it (`core::enrollment`): it stays Discovered, holds no
    /// address and is served no boot files. `None` for every accepted node, and for
    /// records written before enrollment policies existed.
    #[serde(default)]
    pub pending_acceptance: Option<PendingAcceptance>,
    /// The address the node's heartbeats arrive from, as the daemon's socket saw it (a
    /// proxy's, behind one), and since when: which of a node's addresses its liveness
    /// travels over. Written only when it changes ([`Node::heartbeat_source_change`]),
    /// so a heartbeat from where the last one came from stays one timestamp write.
    #[serde(default)]
    pub heartbeat_source: Option<HeartbeatSource>,
    /// Per firmware component (`bios`, `bmc`, `nic:<name>`): the version now, the one
    /// first seen, the last one a Bearman bundle flashed (`core::firmware`).
    #[serde(default)]
    pub firmware_components: BTreeMap<String, super::firmware::ComponentRecord>,
    /// The firmware update the node is going through, or last failed.
    #[serde(default)]
    pub firmware_update: Option<super::firmware::NodeFirmwareUpdate>,
    /// A chaos drill's `silence`: until then the daemon ignores this node's heartbeats
    /// (a partition as the daemon sees it). Lifted by the drill once the node is fenced,
    /// and bounded by itself if the drill is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_silenced_until_ms: Option<TimestampMs>,
}

/// A node's heartbeat source is rewritten at most this often. A node whose heartbeats
/// alternate between addresses (a proxy with several egress addresses in front of the
/// daemon) would otherwise cost a full node write and an audit event per heartbeat; a
/// node that moved for good is shown within this much of its first heartbeat from there.
pub const HEARTBEAT_SOURCE_CHANGE_INTERVAL_MS: TimestampMs = 60_000;

/// Where a node's heartbeats come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatSource {
    pub address: std::net::IpAddr,
    /// The first heartbeat from `address` since the previous source.
    pub since_ms: TimestampMs,
}

/// A machine that enlisted itself and is not accepted yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAcceptance {
    /// When it first registered.
    pub since_ms: TimestampMs,
}

/// A boot milestone the daemon witnessed, in the order a boot passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootPhase {
    /// A remediation powered the node on (for a rebuild): firmware POST, iPXE and the
    /// stage-1 kernel come next, none of which can speak to us.
    PoweredOn,
    /// The stage-1 agent announced itself (`POST /ipxe/{uuid}/progress`).
    Stage1,
    /// Stage 1 registered the hardware.
    Registered,
    /// Stage 1 was ordered a firmware update (or waits for a rollout slot): download, the
    /// updater and a restart come next, bounded by the update's own deadline
    /// ([`BootProgress::until_ms`]).
    Firmware,
    /// Stage 1 fetched the target OS script (`GET /ipxe/{uuid}`): download, kexec and
    /// stage 2 come next.
    OsFetched,
    /// Stage 2 reported installed.
    Installed,
}

impl BootPhase {
    pub const ALL: [BootPhase; 6] = [
        BootPhase::PoweredOn,
        BootPhase::Stage1,
        BootPhase::Registered,
        BootPhase::Firmware,
        BootPhase::OsFetched,
        BootPhase::Installed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BootPhase::PoweredOn => "powered_on",
            BootPhase::Stage1 => "stage1",
            BootPhase::Registered => "registered",
            BootPhase::OsFetched => "os_fetched",
            BootPhase::Installed => "installed",
            BootPhase::Firmware => "firmware",
        }
    }

    pub fn parse(text: &str) -> Option<BootPhase> {
        Self::ALL.into_iter().find(|phase| phase.as_str() == text)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootProgress {
    pub phase: BootPhase,
    pub at_ms: TimestampMs,
    /// A deadline of this milestone's own, instead of the configured one for its phase
    /// (a firmware update's: its updater timeout and restart grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<TimestampMs>,
}

/// Why a node is in maintenance: who put it there (an operator's name, or the controller
/// as `system`), when, and the reason they gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceHold {
    pub by: String,
    pub at_ms: TimestampMs,
    pub reason: String,
}

impl MaintenanceHold {
    /// Whether the controller parked the node (rather than a human holding it).
    pub fn parked_by_controller(&self) -> bool {
        self.by == SYSTEM_ACTOR
    }
}

/// Who the audit trail names for the controller's own actions.
pub const SYSTEM_ACTOR: &str = "system";

impl Node {
    /// A node known by uuid only (operator enrolment, or first registration).
    pub fn new(uuid: NodeUuid, hostname: String, role: NodeRole, now_ms: TimestampMs) -> Self {
        Node {
            uuid,
            hostname,
            serial: String::new(),
            vendor: String::new(),
            model: String::new(),
            role,
            flavor: None,
            rack: None,
            state: LifecycleState::Discovered,
            generation: 1,
            hardware: Hardware::default(),
            firmware: FirmwareVersions::default(),
            bmc: BmcConfig::default(),
            network: NetworkConfig::default(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            registered_at_ms: None,
            installed_at_ms: None,
            last_heartbeat_at_ms: None,
            boot: None,
            maintenance: None,
            pending_acceptance: None,
            heartbeat_source: None,
            firmware_components: BTreeMap::new(),
            firmware_update: None,
            drill_silenced_until_ms: None,
        }
    }

    /// The heartbeat source to record for a heartbeat from `peer` at `now_ms`: `None`
    /// when nothing is to be written (the same address as recorded, no peer known — an
    /// in-process caller —, or a change within [`HEARTBEAT_SOURCE_CHANGE_INTERVAL_MS`] of
    /// the last one). An IPv4 peer on a dual-stack socket (`::ffff:a.b.c.d`) is recorded
    /// as the IPv4 address it is.
    pub fn heartbeat_source_change(
        &self,
        peer: Option<std::net::IpAddr>,
        now_ms: TimestampMs,
    ) -> Option<HeartbeatSource> {
        let address = peer?.to_canonical();
        if let Some(source) = self.heartbeat_source {
            if source.address == address
                || now_ms.saturating_sub(source.since_ms) < HEARTBEAT_SOURCE_CHANGE_INTERVAL_MS
            {
                return None;
            }
        }
        Some(HeartbeatSource {
            address,
            since_ms: now_ms,
        })
    }

    /// Records that the node reached `phase` at `now_ms`; whether that changed anything.
    pub fn reach_boot_phase(&mut self, phase: BootPhase, now_ms: TimestampMs) -> bool {
        if self.boot.is_some_and(|boot| boot.phase == phase) {
            return false;
        }
        self.boot = Some(BootProgress {
            phase,
            at_ms: now_ms,
            until_ms: None,
        });
        true
    }

    /// Records that stage 1 was ordered a firmware update at `now_ms`, which the boot
    /// watchdog gives until `until_ms`.
    pub fn enter_firmware_update(&mut self, now_ms: TimestampMs, until_ms: TimestampMs) {
        self.boot = Some(BootProgress {
            phase: BootPhase::Firmware,
            at_ms: now_ms,
            until_ms: Some(until_ms),
        });
    }

    /// Lowercase MACs of every NIC, sorted: the identity the anti-spoofing check compares.
    pub fn mac_set(&self) -> Vec<String> {
        mac_set(&self.hardware.nics)
    }
}

pub fn mac_set(nics: &[NicFacts]) -> Vec<String> {
    let mut macs: Vec<String> = nics
        .iter()
        .map(|nic| nic.mac.to_ascii_lowercase())
        .collect();
    macs.sort();
    macs.dedup();
    macs
}

/// A boot profile: which kernel and initrds stage 2 is, and with what command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flavor {
    pub name: String,
    pub kernel: bearman_proto::Artifact,
    #[serde(default)]
    pub initrds: Vec<bearman_proto::Artifact>,
    /// Kernel command line; `{hostname}`, `{uuid}`, `{url}`, `{ip}`, `{gateway}`, `{vlan}`
    /// are substituted per node.
    #[serde(default)]
    pub cmdline_template: String,
    #[serde(default)]
    pub firmware_expected: FirmwareVersions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolPurpose {
    /// Node (bond0) addresses.
    Node,
    /// BMC (out-of-band) addresses.
    Bmc,
}

impl PoolPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolPurpose::Node => "node",
            PoolPurpose::Bmc => "bmc",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "node" => Some(PoolPurpose::Node),
            "bmc" => Some(PoolPurpose::Bmc),
            _ => None,
        }
    }
}

/// An IPv4 pool on one VLAN subnet (the original's "IPman").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpPool {
    pub name: String,
    pub purpose: PoolPurpose,
    #[serde(default)]
    pub vlan: Option<u16>,
    /// Subnet in CIDR notation, e.g. `10.1.0.0/24`.
    pub cidr: String,
    /// First and last assignable addresses (inclusive).
    pub range_start: String,
    pub range_end: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
}

/// The MTU of a pool that names none, and of a node whose pool gave it none.
pub const MTU_DEFAULT: u32 = 1500;

fn default_mtu() -> u32 {
    MTU_DEFAULT
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAllocation {
    pub pool: String,
    pub address: String,
    pub node_uuid: NodeUuid,
    pub purpose: PoolPurpose,
    pub allocated_at_ms: TimestampMs,
}

/// Declares [`Action`] with the name each variant is stored and serialized as, once.
macro_rules! actions {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// What an audit event records. Stored as its name (the same strings the audit
        /// trail always had), so callers match on variants, never on text: renaming one
        /// is a compile error everywhere it is used, not a silently empty figure.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Action {
            $($(#[$doc])* $variant,)*
        }

        impl Action {
            pub const ALL: &'static [Action] = &[$(Action::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Action::$variant => $name,)*
                }
            }

            pub fn parse(text: &str) -> Option<Action> {
                match text {
                    $($name => Some(Action::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

actions! {
    // Lifecycle events (`LifecycleEvent::action`).
    Register = "register",
    BootStarted = "boot_started",
    Installed = "installed",
    Heartbeat = "heartbeat",
    HeartbeatsMissed = "heartbeats_missed",
    FenceStarted = "fence_started",
    FenceVerified = "fence_verified",
    FenceFailed = "fence_failed",
    RebuildStarted = "rebuild_started",
    RebuildFailed = "rebuild_failed",
    MaintenanceOn = "maintenance_on",
    MaintenanceOff = "maintenance_off",
    Retire = "retire",
    // Inventory edits.
    Enroll = "enroll",
    Update = "update",
    AcceptIdentity = "accept_identity",
    FlavorCreate = "flavor_create",
    FlavorReplace = "flavor_replace",
    FlavorDelete = "flavor_delete",
    PoolCreate = "pool_create",
    PoolDelete = "pool_delete",
    TokenCreate = "token_create",
    TokenDelete = "token_delete",
    /// A dashboard login (a session cookie was issued for a token).
    SessionOpened = "session_opened",
    /// A dashboard logout.
    SessionClosed = "session_closed",
    // What nodes said that was refused or noteworthy.
    IdentityRefused = "identity_refused",
    FirmwareMismatch = "firmware_mismatch",
    UnexpectedHeartbeat = "unexpected_heartbeat",
    /// A node's heartbeats arrive from another address than the last ones did (or for the
    /// first time): at most one per change, never one per heartbeat.
    HeartbeatSourceChanged = "heartbeat_source_changed",
    /// A machine no one accepted registered by itself; it waits, Discovered, for
    /// `bearman node accept` or an allow-list.
    Enlisted = "enlisted",
    /// A waiting machine was accepted (by an operator, or an allow-list it now matches).
    Accepted = "accepted",
    /// A new machine was turned away: `enrollment.pending_max` machines already wait.
    EnlistmentRefused = "enlistment_refused",
    /// Repeats of a refused request's event that were not written one by one (a machine
    /// retrying, or someone flooding the provisioning network): how many, since when.
    EventsSuppressed = "events_suppressed",
    /// Every BMC pool that fits is full: the node registered without a BMC address.
    BmcPoolExhausted = "bmc_pool_exhausted",
    // Remediation.
    RemediationStarted = "remediation_started",
    RemediationStep = "remediation_step",
    RemediationProgress = "remediation_progress",
    RemediationDone = "remediation_done",
    RemediationFailed = "remediation_failed",
    RemediationCancelled = "remediation_cancelled",
    RemediationWriteAbandoned = "remediation_write_abandoned",
    /// A fence could not be verified; it will be tried again (the alert).
    FenceRetryScheduled = "fence_retry_scheduled",
    /// Evacuated VMs were not running elsewhere in time: reported, the saga goes on.
    EvacuationUnverified = "evacuation_unverified",
    /// A booting node stopped short of its next boot milestone: a rebuild power-cycles
    /// it; one booting on its own is reported, then power-cycled by a boot retry unless
    /// something holds that (the event says what).
    BootStalled = "boot_stalled",
    /// A node's boot reached a milestone only it can report (stage 1 started).
    BootProgress = "boot_progress",
    // Guards and power sync.
    RackFencingPaused = "rack_fencing_paused",
    RackFencingResumed = "rack_fencing_resumed",
    FleetFencingStopped = "fleet_fencing_stopped",
    FleetFencingResumed = "fleet_fencing_resumed",
    /// So many boots stalled at once that the cause is shared: none is power-cycled.
    BootRetriesHeld = "boot_retries_held",
    BootRetriesResumed = "boot_retries_resumed",
    PowerStateChanged = "power_state_changed",
    /// Allocations a start-up check found without a node that holds them.
    OrphanAddresses = "orphan_addresses",
    // Operator power actions (`POST /api/v1/nodes/{uuid}/power`): who asked and why,
    // written with the maintenance hold before any BMC call; then what the BMC read back.
    PowerRequested = "power_requested",
    PowerDone = "power_done",
    PowerFailed = "power_failed",
    // Firmware (`core::firmware`).
    /// A component's reported version changed, or was seen the first time.
    FirmwareChanged = "firmware_changed",
    /// Stage 1 was ordered a firmware update (a rollout slot taken).
    FirmwareUpdateStarted = "firmware_update_started",
    /// The updater wrote the firmware; the machine restarts onto it.
    FirmwareApplied = "firmware_applied",
    /// The machine came back reading the bundle's version: `last_version_flashed` set.
    FirmwareFlashed = "firmware_flashed",
    FirmwareUpdateFailed = "firmware_update_failed",
    /// The daemon power-cycled a machine through its BMC for its new firmware.
    FirmwarePowerCycle = "firmware_power_cycle",
    /// A node's failed-attempt count was cleared by an operator.
    FirmwareRetry = "firmware_retry",
    FirmwareBundleCreate = "firmware_bundle_create",
    FirmwareBundleDelete = "firmware_bundle_delete",
    /// The rollout was paused: by an operator, or by itself past its failure threshold.
    FirmwareRolloutPaused = "firmware_rollout_paused",
    FirmwareRolloutResumed = "firmware_rollout_resumed",
    // Chaos drills (`core::drill`).
    DrillStarted = "drill_started",
    /// A drill's fault went out to a target (or failed to).
    DrillInjected = "drill_injected",
    /// A drill's `silence` set or lifted on a node.
    DrillSilence = "drill_silence",
    DrillAborted = "drill_aborted",
    /// What an aborted drill did to put a target back.
    DrillRestored = "drill_restored",
    DrillFinished = "drill_finished",
    /// The kill switch: no drill starts until an operator clears it.
    DrillsBlocked = "drills_blocked",
    DrillsUnblocked = "drills_unblocked",
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Action::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown audit action {text:?}")))
    }
}

/// One row of the audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub at_ms: TimestampMs,
    pub node_uuid: Option<NodeUuid>,
    /// Who: `node` (the machine itself), `system`, or `token:<name>`.
    pub actor: String,
    /// What happened; stored and serialized as its snake_case name.
    pub action: Action,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    /// Why, in words.
    pub reason: String,
}

/// An event before the store assigns its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub at_ms: TimestampMs,
    pub node_uuid: Option<NodeUuid>,
    pub actor: String,
    pub action: Action,
    pub from_state: Option<LifecycleState>,
    pub to_state: Option<LifecycleState>,
    pub reason: String,
}

impl NewEvent {
    pub fn for_node(
        node: &NodeUuid,
        at_ms: TimestampMs,
        actor: &str,
        action: Action,
        reason: impl Into<String>,
    ) -> Self {
        NewEvent {
            at_ms,
            node_uuid: Some(node.clone()),
            actor: actor.to_string(),
            action,
            from_state: None,
            to_state: None,
            reason: reason.into(),
        }
    }

    /// An event about the fleet or the inventory rather than one node.
    pub fn global(
        at_ms: TimestampMs,
        actor: &str,
        action: Action,
        reason: impl Into<String>,
    ) -> Self {
        NewEvent {
            at_ms,
            node_uuid: None,
            actor: actor.to_string(),
            action,
            from_state: None,
            to_state: None,
            reason: reason.into(),
        }
    }

    pub fn with_states(mut self, from: LifecycleState, to: LifecycleState) -> Self {
        self.from_state = Some(from);
        self.to_state = Some(to);
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    Viewer,
    Operator,
    Admin,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Viewer => "viewer",
            TokenRole::Operator => "operator",
            TokenRole::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(TokenRole::Viewer),
            "operator" => Some(TokenRole::Operator),
            "admin" => Some(TokenRole::Admin),
            _ => None,
        }
    }
}

/// A stored API token: only the sha256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub role: TokenRole,
    #[serde(skip_serializing)]
    pub secret_sha256: String,
    pub created_at_ms: TimestampMs,
    /// After this the token is refused; `None`: it never expires.
    #[serde(default)]
    pub expires_at_ms: Option<TimestampMs>,
    /// When it last authenticated a request, to [`TOKEN_USE_RECORD_INTERVAL_MS`]'s
    /// precision; `None` until first used.
    #[serde(default)]
    pub last_used_at_ms: Option<TimestampMs>,
}

/// A token's last-used time is written at most this often (per token), so the
/// authentication hot path reads but does not write on every request.
pub const TOKEN_USE_RECORD_INTERVAL_MS: TimestampMs = 60_000;

impl ApiToken {
    /// Whether the token is past its expiry at `now_ms` (an expiry instant is already
    /// expired).
    pub fn is_expired(&self, now_ms: TimestampMs) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// Whether a use at `now_ms` should be recorded: never recorded, or last recorded at
    /// least [`TOKEN_USE_RECORD_INTERVAL_MS`] ago.
    pub fn use_record_due(&self, now_ms: TimestampMs) -> bool {
        self.last_used_at_ms
            .is_none_or(|last| now_ms - last >= TOKEN_USE_RECORD_INTERVAL_MS)
    }
}

/// Filters for listing nodes; `None` means any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFilter {
    pub state: Option<LifecycleState>,
    pub rack: Option<String>,
    pub role: Option<NodeRole>,
    /// Return nodes whose uuid sorts after this one (keyset pagination).
    pub after: Option<NodeUuid>,
    pub limit: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub node_uuid: Option<NodeUuid>,
    /// Return events with id below this one (newest first, keyset pagination).
    pub before_id: Option<i64>,
    /// Return only events with id above this one, and of those the `limit` *oldest*
    /// (still listed newest first): a client following the trail asks again from the
    /// newest it got until a page comes back short, and misses none.
    pub after_id: Option<i64>,
    pub limit: usize,
}

/// Counts of nodes per state, for summaries.
pub type StateCounts = BTreeMap<LifecycleState, usize>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_source_is_recorded_only_when_it_changes() {
        let mut node = Node::new(
            NodeUuid::parse("4c4c4544-0000-1000-8000-000000000001").unwrap(),
            "hv-001".into(),
            NodeRole::Compute,
            0,
        );
        let peer = |text: &str| Some(text.parse::<std::net::IpAddr>().unwrap());
        let source = |text: &str, since_ms| HeartbeatSource {
            address: text.parse().unwrap(),
            since_ms,
        };
        let now = 100_000;
        let held_since = now - HEARTBEAT_SOURCE_CHANGE_INTERVAL_MS + 1;
        let due_since = now - HEARTBEAT_SOURCE_CHANGE_INTERVAL_MS;
        // (recorded before, peer, what to record)
        let cases = [
            (None, None, None),
            (None, peer("10.77.0.150"), Some(source("10.77.0.150", now))),
            (Some(source("10.77.0.150", 1)), peer("10.77.0.150"), None),
            (
                Some(source("10.77.0.150", due_since)),
                peer("10.77.0.10"),
                Some(source("10.77.0.10", now)),
            ),
            // Alternating sources: the next change waits out the interval.
            (
                Some(source("10.77.0.150", held_since)),
                peer("10.77.0.10"),
                None,
            ),
            (Some(source("10.77.0.150", 1)), None, None),
            (
                Some(source("10.77.0.10", 1)),
                peer("::ffff:10.77.0.10"),
                None,
            ),
            (None, peer("fd00::10"), Some(source("fd00::10", now))),
        ];
        for (before, from, expected) in cases {
            node.heartbeat_source = before;
            assert_eq!(
                node.heartbeat_source_change(from, now),
                expected,
                "{before:?} then {from:?}"
            );
        }
    }
}
