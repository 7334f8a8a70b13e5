//! The command line: every subcommand and flag, with the help text operators read.

use super::*;

#[derive(Parser)]
#[command(
    name = "bearman",
    version,
    about = "Bare-metal fleet manager for diskless hypervisor clouds",
    long_about = "Bearman keeps the inventory of physical servers, hands out their addresses, serves the \
network-boot endpoints (/ipxe, /ipxe/{uuid}, …/profile, …/detail, …/installed) and records every \
state change. `bearman serve` runs the daemon; the other commands manage it."
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Run the daemon (SQLite in --data-dir by default; PostgreSQL with --database-url)
    Serve(ServeArgs),
    /// Manage API tokens directly in the database (works without a running daemon)
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect and act on nodes
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage flavors (boot profiles)
    #[command(subcommand)]
    Flavor(FlavorCommand),
    /// Manage IP pools
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Remediations (fence, evacuate, rebuild sagas) and their guards
    #[command(subcommand)]
    Remediation(RemediationCommand),
    /// Show the audit trail, newest first
    Events {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this node's events
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Count nodes per lifecycle state
    Summary {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Talk to nodes' BMCs directly from this machine (IPMI, Redfish): power, PXE, checks
    #[command(subcommand)]
    Bmc(BmcCommand),
    /// Several replicas on one PostgreSQL database: who leads, who is alive
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand)]
pub(super) enum ClusterCommand {
    /// Each replica (name, address, version, last seen), which one holds the controller's
    /// lease, its epoch and expiry, and what the replica answering does
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Args, Clone)]
pub(super) struct BmcArgs {
    #[command(flatten)]
    pub(super) api: ApiArgs,
    /// TOML configuration file; its [bmc] table sets secrets_file, timeouts and limits
    #[arg(long, env = "BEARMAN_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// Secrets file for file:KEY credentials (overrides [bmc] secrets_file)
    #[arg(long, env = "BEARMAN_BMC_SECRETS_FILE")]
    pub(super) secrets_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum BmcCommand {
    /// Read a node's power state from its BMC
    Status {
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
    },
    /// Power a node on, off (hard) or cycle it straight from this machine, bypassing the
    /// daemon's audit and BMC guard: only for a daemon that is down, and only with
    /// --direct-bypassing-audit (use `bearman node power` otherwise)
    Power {
        #[arg(value_parser = ["on", "off", "cycle"])]
        action: String,
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
        /// Talk to the BMC directly although nothing is audited and the daemon's per-BMC
        /// guard is bypassed (the daemon is down)
        #[arg(long)]
        direct_bypassing_audit: bool,
    },
    /// Network-boot (PXE) a node at its next boot only, straight from this machine (as
    /// `bmc power`: needs --direct-bypassing-audit)
    Pxe {
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
        /// Talk to the BMC directly although nothing is audited and the daemon's per-BMC
        /// guard is bypassed (the daemon is down)
        #[arg(long)]
        direct_bypassing_audit: bool,
    },
    /// Probe every node's BMC: power state or error, and latency
    Check {
        #[command(flatten)]
        bmc: BmcArgs,
        /// BMCs probed at once
        #[arg(long, default_value_t = 16)]
        parallelism: usize,
    },
}

#[derive(Args, Clone)]
pub(super) struct StoreArgs {
    /// Directory for the embedded SQLite database and boot images
    #[arg(long, env = "BEARMAN_DATA_DIR")]
    pub(super) data_dir: Option<PathBuf>,
    /// Database URL: postgres://user@host/db (production) or sqlite://PATH
    #[arg(long, env = "BEARMAN_DATABASE_URL")]
    pub(super) database_url: Option<String>,
    /// TOML configuration file (flags and BEARMAN_* variables override it)
    #[arg(long, env = "BEARMAN_CONFIG")]
    pub(super) config: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Address to listen on
    #[arg(
        long,
        env = "BEARMAN_LISTEN",
        help = "Address to listen on [default: 127.0.0.1:8080]"
    )]
    pub(super) listen: Option<String>,
    /// Base URL nodes use to reach this daemon (put in iPXE scripts); defaults to http://LISTEN
    #[arg(long, env = "BEARMAN_PUBLIC_URL")]
    pub(super) public_url: Option<String>,
    #[command(flatten)]
    pub(super) store: StoreArgs,
    /// Log format: text or json
    #[arg(long, env = "BEARMAN_LOG_FORMAT")]
    pub(super) log_format: Option<String>,
    /// Flavor given to nodes that register without one
    #[arg(long, env = "BEARMAN_DEFAULT_FLAVOR")]
    pub(super) default_flavor: Option<String>,
}

#[derive(Args, Clone)]
pub(super) struct ApiArgs {
    /// Daemon URL
    #[arg(long, env = "BEARMAN_URL", default_value = "http://127.0.0.1:8080")]
    pub(super) url: String,
    /// API token (see `bearman token create`)
    #[arg(long, env = "BEARMAN_TOKEN", hide_env_values = true)]
    pub(super) token: Option<String>,
    /// Output format
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub(super) output: Output,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(super) enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// Create a token and print its secret (shown only this once)
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "operator", "viewer"])]
        role: String,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List tokens (names and roles; secrets are never stored)
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke a token by name
    Revoke {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
pub(super) enum NodeCommand {
    /// List nodes, optionally filtered
    List {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        rack: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one node in full
    Show {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Enroll a node by uuid before it first boots
    Enroll {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        rack: Option<String>,
        #[arg(long)]
        flavor: Option<String>,
    },
    /// Change a node's hostname, role, rack, flavor or BMC settings
    Update {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        rack: Option<String>,
        /// Flavor name; an empty string clears it
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        bmc_address: Option<String>,
        #[arg(long, value_parser = ["ipmi", "redfish", "qmp", "sim"])]
        bmc_driver: Option<String>,
        /// Where the BMC password lives: env:VARIABLE or file:KEY (never the password)
        #[arg(long)]
        bmc_credentials_ref: Option<String>,
    },
    /// Put a node into maintenance (automation leaves it alone) or take it out
    Maintenance {
        uuid: String,
        #[arg(value_parser = ["on", "off"])]
        mode: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Power a node on, off, soft-off, cycle or PXE-boot through the daemon (its BMC
    /// guard, verified by readback, audited); all but `on` put the node in maintenance first
    Power {
        uuid: String,
        #[arg(value_parser = ["on", "off", "soft-off", "cycle", "pxe"])]
        action: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Why (required; recorded in the audit trail and the maintenance hold)
        #[arg(long)]
        reason: String,
    },
    /// Power a node off through its BMC and verify it is off (STONITH)
    Fence {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Fence a node, then evacuate its VMs to healthy nodes
    Evacuate {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Fence, evacuate, then leave the node in maintenance
    Drain {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Fence, evacuate and rebuild a node from PXE back to Ready
    Rebuild {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Retire a node for good (its addresses are released; it will not boot)
    Retire {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Accept a machine that registered by itself and waits (state discovered,
    /// awaiting acceptance): its next registration gets addresses and boot files.
    /// Check its serial and MACs first (`bearman node show UUID`): the identity it
    /// reports next is the one bound.
    Accept {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Accept new hardware (serial/MACs) for a uuid at its next registration
    AcceptIdentity {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// A node's audit trail
    Events {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand)]
pub(super) enum RemediationCommand {
    /// List remediations, newest first
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only active ones
        #[arg(long)]
        active: bool,
        #[arg(long)]
        node: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one remediation in full
    Show {
        id: i64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel an active remediation (not while a power-off is in flight)
    Cancel {
        id: i64,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// What the guards say: silent nodes, paused racks, fleet stop, rate limits, and power
    /// sync (readings by state, nodes whose BMC reads Off)
    Guards {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(super) enum FlavorCommand {
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Create (or with --replace, replace) a flavor from flags or a JSON/TOML file
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// A JSON or TOML file holding the whole flavor
        #[arg(long, conflicts_with_all = ["name", "kernel", "kernel_sha256", "initrd", "initrd_sha256", "cmdline"])]
        file: Option<PathBuf>,
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// Kernel URL (absolute, or /path served by this daemon)
        #[arg(long, required_unless_present = "file")]
        kernel: Option<String>,
        #[arg(long, required_unless_present = "file")]
        kernel_sha256: Option<String>,
        /// Initrd URL; repeat for several, each with its --initrd-sha256
        #[arg(long)]
        initrd: Vec<String>,
        #[arg(long)]
        initrd_sha256: Vec<String>,
        /// Kernel command line; {hostname} {uuid} {url} {ip} {gateway} {vlan} are substituted
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Replace an existing flavor of that name
        #[arg(long)]
        replace: bool,
    },
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(super) enum PoolCommand {
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a pool and its allocations
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    Create {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long, value_parser = ["node", "bmc"])]
        purpose: String,
        /// Subnet, e.g. 10.1.0.0/24
        #[arg(long)]
        cidr: String,
        /// Assignable range, e.g. 10.1.0.10-10.1.0.250
        #[arg(long)]
        range: String,
        #[arg(long)]
        gateway: Option<String>,
        /// DNS server; repeat for several
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        vlan: Option<u16>,
        #[arg(long, default_value_t = bearman::core::model::MTU_DEFAULT)]
        mtu: u32,
    },
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}
