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
    /// Firmware compliance: drift across the fleet, update bundles, the rollout
    #[command(
        subcommand,
        long_about = "Firmware compliance.\n\n\
Each node reports its BIOS, BMC and NIC firmware versions when stage 1 registers it; its \
flavor's `firmware_expected` says what they should be. `bearman firmware status` shows which \
nodes drift and which bundle can fix them. A bundle (`bearman firmware bundle add FILE`) is a \
file and an updater command that bring one component to one version; stage 1 downloads it, \
verifies its sha256, runs the updater and restarts onto the new firmware, and the daemon \
records the version flashed. The rollout lets at most `firmware.updates_max` nodes (and \
`firmware.updates_per_rack_max` per rack) flash at once, gives a new bundle to \
`firmware.canary_nodes` nodes first, and pauses itself when more than \
`firmware.failure_pause_percent` % of a bundle's updates fail (see the README, \"Firmware\")."
    )]
    Firmware(FirmwareCommand),
    /// Chaos drills: break chosen nodes on purpose, out of band, and watch the fleet heal
    #[command(
        subcommand,
        long_about = "Chaos drills.\n\n\
A drill file (TOML; see the README, \"Chaos drills\") names the fault (`power_loss`: a hard \
power-off through the BMC; `kernel_panic`: an NMI through the BMC; `silence`: the daemon \
ignores the node's heartbeats), the targets (uuids, or a rack/role/state selector with a count \
or percent), the hypothesis (VMs elsewhere within, Ready again within, fences at most, no \
other node touched), the blast-radius budget, the abort conditions and the allowed window.\n\n\
`bearman drill check FILE` validates it offline; `preview` chooses the targets and runs the \
preflight without touching anything; `run` shows the plan, asks you to type the drill's name \
(or `--yes`), starts it, follows it and prints the report. The daemon aborts the drill on any \
abort condition and restores what it did; `bearman drill abort` is the kill switch, which also \
blocks new drills until `bearman drill unblock`."
    )]
    Drill(DrillCommand),
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
    /// Show or apply the database schema's migrations (for upgrading before a rolling restart)
    #[command(
        subcommand,
        long_about = "Show or apply the database schema's migrations.\n\n\
`bearman serve` applies pending migrations itself at start; run `bearman migrate run` first \
when several replicas share a PostgreSQL database, so the schema is upgraded once, before any \
replica restarts on the new release. Migrations are expand-only within a release (see the \
README, \"Upgrades\"), so replicas of the previous release keep running on the migrated schema."
    )]
    Migrate(MigrateCommand),
    /// Copy the SQLite database to a file while the daemon keeps serving (PostgreSQL: use pg_dump)
    #[command(
        long_about = "Copy the SQLite database to FILE, consistently, while `bearman serve` \
keeps running on it (SQLite's VACUUM INTO: the database as of one instant, compacted). \
Restore it with `bearman restore --from FILE`. Run it as the daemon's user \
(`sudo -u bearman …`): files SQLite creates beside the database must stay the daemon's.\n\n\
PostgreSQL databases are refused: back them up with `pg_dump -Fc` and restore with `pg_restore` \
(see the README, \"Backups\")."
    )]
    Backup {
        /// The backup file to write; it must not exist (see --force)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Replace the SQLite database with a backup (the daemon must be stopped)
    #[command(
        long_about = "Replace the SQLite database with a file made by `bearman backup`.\n\n\
Refused while a `bearman serve` runs on the database (stop it first: `systemctl stop bearman`). \
The file must be an SQLite database with Bearman's migrations table that passes SQLite's \
integrity check, and must not carry migrations newer than this binary. The database is \
replaced atomically (a copy written and synced beside it, then renamed over it); the \
database it replaces is kept as <database>.before-restore. Run it as the daemon's user \
(`sudo -u bearman …`), so the restored file is the daemon's."
    )]
    Restore {
        /// The backup file to restore
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
pub(super) enum MigrateCommand {
    /// List this binary's migrations and whether the database has applied each; exit 2 if
    /// the database has one this binary does not know (a newer release migrated it)
    Status {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Apply the pending migrations and print each one applied
    Run {
        #[command(flatten)]
        store: StoreArgs,
    },
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

/// Where the database lives, as given (see [`StoreArgs`]).
#[derive(Args, Clone)]
pub(super) struct StoreArgsRaw {
    /// Directory for the embedded SQLite database and boot images
    #[arg(long, env = "BEARMAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: postgres://user@host/db (production) or sqlite://PATH. A password
    /// here is visible in `ps`: use --database-url-file or BEARMAN_DATABASE_URL instead
    #[arg(long, env = "BEARMAN_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the database URL (trimmed), so its password stays off the command line
    #[arg(long, env = "BEARMAN_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// TOML configuration file (flags and BEARMAN_* variables override it)
    #[arg(long, env = "BEARMAN_CONFIG")]
    config: Option<PathBuf>,
}

/// Where the database lives, resolved: `--database-url-file` read into `database_url`.
#[derive(Clone)]
pub(super) struct StoreArgs {
    pub(super) data_dir: Option<PathBuf>,
    pub(super) database_url: Option<String>,
    pub(super) config: Option<PathBuf>,
}

impl clap::FromArgMatches for StoreArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let raw = StoreArgsRaw::from_arg_matches(matches)?;
        if raw
            .database_url
            .as_deref()
            .is_some_and(|url| bearman::store::sql::redact_url(url) != url)
            && matches.value_source("database_url") == Some(clap::parser::ValueSource::CommandLine)
        {
            warn_secret_on_argv(
                "--database-url with a password",
                "--database-url-file PATH or BEARMAN_DATABASE_URL",
            );
        }
        let database_url = match (raw.database_url, raw.database_url_file) {
            (Some(_), Some(_)) => {
                return Err(usage_error(
                    "give --database-url (BEARMAN_DATABASE_URL) or --database-url-file \
                     (BEARMAN_DATABASE_URL_FILE), not both",
                ))
            }
            (Some(url), None) => Some(url),
            (None, Some(path)) => {
                Some(read_secret_file(&path, "database URL").map_err(|e| usage_error(&e))?)
            }
            (None, None) => None,
        };
        Ok(StoreArgs {
            data_dir: raw.data_dir,
            database_url,
            config: raw.config,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for StoreArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        StoreArgsRaw::augment_args(command)
    }
    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        StoreArgsRaw::augment_args_for_update(command)
    }
}

/// A clap error that prints as `error: MESSAGE` and exits 2.
fn usage_error(message: &str) -> clap::Error {
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{message}\n"),
    )
}

/// Tells the user a secret on the command line is visible to every local user.
fn warn_secret_on_argv(what: &str, instead: &str) {
    eprintln!(
        "warning: {what} on the command line is visible to every user of this machine \
         (`ps`, /proc/PID/cmdline); use {instead} instead"
    );
}

/// The trimmed content of a secret file: an error naming the file when it is missing,
/// unreadable or empty; a warning when other users may read it.
pub(super) fn read_secret_file(path: &std::path::Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the {what} file {}: {error}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("the {what} file {} is empty", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(metadata) = std::fs::metadata(path) {
            if metadata.permissions().mode() & 0o004 != 0 {
                eprintln!(
                    "warning: the {what} file {} is readable by every user; `chmod o-r` it",
                    path.display()
                );
            }
        }
    }
    Ok(secret.to_string())
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

/// How to reach the admin API, as given (see [`ApiArgs`]).
#[derive(Args, Clone)]
pub(super) struct ApiArgsRaw {
    /// Daemon URL: http://HOST[:PORT] or https://HOST[:PORT] (see --ca-file)
    #[arg(long, env = "BEARMAN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API token (see `bearman token create`). On the command line it is visible in
    /// `ps`: prefer BEARMAN_TOKEN or --token-file
    #[arg(long, env = "BEARMAN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token (trimmed)
    #[arg(long, env = "BEARMAN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA(s) that signed the daemon's certificate, trusted instead of the
    /// public CAs for an https:// --url
    #[arg(long, env = "BEARMAN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output format
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How to reach the admin API, resolved: `--token-file` read into `token`.
#[derive(Clone)]
pub(super) struct ApiArgs {
    pub(super) url: String,
    pub(super) token: Option<String>,
    /// The CA bundle for an https:// `url` (read by the client, which names it in errors).
    pub(super) ca_file: Option<PathBuf>,
    pub(super) output: Output,
}

impl clap::FromArgMatches for ApiArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let raw = ApiArgsRaw::from_arg_matches(matches)?;
        if raw.token.is_some()
            && matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine)
        {
            warn_secret_on_argv("--token", "--token-file PATH or BEARMAN_TOKEN");
        }
        let token =
            match (raw.token, raw.token_file) {
                (Some(_), Some(_)) => return Err(usage_error(
                    "give --token (BEARMAN_TOKEN) or --token-file (BEARMAN_TOKEN_FILE), not both",
                )),
                (Some(token), None) => Some(token),
                (None, Some(path)) => {
                    Some(read_secret_file(&path, "token").map_err(|e| usage_error(&e))?)
                }
                (None, None) => None,
            };
        Ok(ApiArgs {
            url: raw.url,
            token,
            ca_file: raw.ca_file,
            output: raw.output,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ApiArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        ApiArgsRaw::augment_args(command)
    }
    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        ApiArgsRaw::augment_args_for_update(command)
    }
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
        /// Refuse the token after this long: 90s, 30m, 12h, 30d, 2w
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Refuse the token from this instant: RFC 3339, e.g. 2027-01-31T00:00:00Z
        #[arg(long)]
        expires_at: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List tokens (names, roles, expiry, last use; secrets are never stored)
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
pub(super) enum FirmwareCommand {
    /// Drift across the fleet: component, expected, actual, how many nodes, which; and the rollout
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Firmware update bundles
    #[command(subcommand)]
    Bundle(FirmwareBundleCommand),
    /// The rollout: who is flashing, each bundle's tally, pause and resume
    #[command(subcommand)]
    Rollout(FirmwareRolloutCommand),
    /// Clear a node's failed update attempts and release it from the maintenance they put it in
    Retry {
        uuid: String,
        #[command(flatten)]
        api: ApiArgs,
        /// Why (kept in the audit trail)
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum DrillCommand {
    /// Validate a drill file offline (no daemon needed); prints it as understood
    Check { file: PathBuf },
    /// Choose the targets and run every preflight check; nothing is injected or written
    Preview {
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Preview, confirm, start the drill, follow it to the end and print the report
    /// (exit 0 only when every hypothesis item passed)
    Run {
        file: PathBuf,
        /// Start without asking to type the drill's name (for automation)
        #[arg(long)]
        yes: bool,
        /// The rehearsal's prediction (JSON: seeds, phases.{detected,fence_verified,
        /// vms_elsewhere,ready}.{p50_s,p99_s}), kept with the drill and set beside the
        /// actual timeline in the report
        #[arg(long)]
        prediction: Option<PathBuf>,
        /// Start it and return; follow it later with `bearman drill show ID`
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Rehearse a drill on a twin of the live fleet: fetches the twin, runs the drill in
    /// the simulator (`bearman-sim rehearse`, the real daemon code) over many seeds, prints
    /// the predicted timeline (p50/p99) and a verdict per hypothesis item; exits non-zero
    /// when the prediction breaks the hypothesis or the budget
    Rehearse {
        file: PathBuf,
        /// Seeds to run, A..B (B excluded)
        #[arg(long, default_value = "1..21")]
        seeds: String,
        /// Seeds run at once (child processes)
        #[arg(long, default_value_t = 2)]
        jobs: u32,
        /// Write the prediction (JSON) here, for `bearman drill run --prediction`
        #[arg(long)]
        prediction_out: Option<PathBuf>,
        /// Also save the twin-made scenario, so the what-if becomes a replayable
        /// `bearman-sim run`
        #[arg(long)]
        scenario_out: Option<PathBuf>,
        /// The simulator binary (default: $BEARMAN_SIM, else bearman-sim beside this
        /// binary, else on PATH)
        #[arg(long, env = "BEARMAN_SIM")]
        sim: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Save a twin of the live fleet (racks, nodes, remediation settings, VMs per compute
    /// node sampled from the cloud) as JSON, for `bearman-sim rehearse`
    Twin {
        /// Where to write it (default: stdout)
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The kill switch: abort the running drill (the daemon restores what it did) and
    /// block new drills until `bearman drill unblock`
    Abort {
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Allow drills again after `bearman drill abort`
    Unblock {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The running drill, the kill switch and past drills
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One drill's report: per target the actual phase times beside the prediction, each
    /// hypothesis item, anything unexpected
    Show {
        id: i64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
pub(super) enum FirmwareBundleCommand {
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Add a bundle from a TOML or JSON file (see the README, "Firmware bundles")
    Add {
        /// The bundle file: name, component, version, artifact {url, sha256}, size_bytes,
        /// applies_to, command, timeout_s, success_exit_codes, restart
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a bundle: nodes flashing it finish, no node is ordered it again
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
pub(super) enum FirmwareRolloutCommand {
    /// Who is flashing now, each bundle's tally, whether the rollout is paused
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop new updates (those flashing finish); nodes that need one wait in stage 1
    Pause {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let updates start again (after an automatic pause too)
    Resume {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        reason: Option<String>,
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
