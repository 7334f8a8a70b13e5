//! Command-line interface: `serve` runs the daemon; `token` works on the database
//! directly (to bootstrap the first admin); everything else is a client of the admin API.

mod client;
mod config;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use bearman::app::nodes::Summary;
use bearman::app::pools::PoolDetail;
use bearman::app::tokens::NewToken;
use bearman::app::{App, Settings};
use bearman::core::model::{ApiToken, Event, Flavor, IpPool, Node, PoolPurpose, TokenRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::core::remediation::Remediation;
use bearman::images::DirImages;
use bearman::runtime::system::SystemClock;
use bearman::server::ServiceConfig;
use bearman_proto::Artifact;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use client::ApiClient;
use config::{FileConfig, Overrides};

#[derive(Parser)]
#[command(
    name = "bearman",
    version,
    about = "Bare-metal fleet manager for diskless hypervisor clouds",
    long_about = "Bearman keeps the inventory of physical servers, hands out their addresses, serves the \
network-boot endpoints (/ipxe, /ipxe/{uuid}, …/profile, …/detail, …/installed) and records every \
state change. `bearman serve` runs the daemon; the other commands manage it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Args, Clone)]
struct BmcArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// TOML configuration file; its [bmc] table sets secrets_file, timeouts and limits
    #[arg(long, env = "BEARMAN_CONFIG")]
    config: Option<PathBuf>,
    /// Secrets file for file:KEY credentials (overrides [bmc] secrets_file)
    #[arg(long, env = "BEARMAN_BMC_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BmcCommand {
    /// Read a node's power state from its BMC
    Status {
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
    },
    /// Power a node on, off (hard) or cycle it; done only when read back from the BMC
    Power {
        #[arg(value_parser = ["on", "off", "cycle"])]
        action: String,
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
    },
    /// Network-boot (PXE) a node at its next boot only
    Pxe {
        uuid: String,
        #[command(flatten)]
        bmc: BmcArgs,
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
struct StoreArgs {
    /// Directory for the embedded SQLite database and boot images
    #[arg(long, env = "BEARMAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: postgres://user@host/db (production) or sqlite://PATH
    #[arg(long, env = "BEARMAN_DATABASE_URL")]
    database_url: Option<String>,
    /// TOML configuration file (flags and BEARMAN_* variables override it)
    #[arg(long, env = "BEARMAN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on
    #[arg(
        long,
        env = "BEARMAN_LISTEN",
        help = "Address to listen on [default: 127.0.0.1:8080]"
    )]
    listen: Option<String>,
    /// Base URL nodes use to reach this daemon (put in iPXE scripts); defaults to http://LISTEN
    #[arg(long, env = "BEARMAN_PUBLIC_URL")]
    public_url: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Log format: text or json
    #[arg(long, env = "BEARMAN_LOG_FORMAT")]
    log_format: Option<String>,
    /// Flavor given to nodes that register without one
    #[arg(long, env = "BEARMAN_DEFAULT_FLAVOR")]
    default_flavor: Option<String>,
}

#[derive(Args, Clone)]
struct ApiArgs {
    /// Daemon URL
    #[arg(long, env = "BEARMAN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API token (see `bearman token create`)
    #[arg(long, env = "BEARMAN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum TokenCommand {
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
enum NodeCommand {
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
enum RemediationCommand {
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
enum FlavorCommand {
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
enum PoolCommand {
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Token(command) => token(command).await,
        Command::Node(command) => node(command).await,
        Command::Flavor(command) => flavor(command).await,
        Command::Pool(command) => pool(command).await,
        Command::Remediation(command) => remediation(command).await,
        Command::Bmc(command) => bmc(command).await,
        Command::Events { api, node, limit } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let mut path = format!("/events?limit={limit}");
            if let Some(node) = node {
                path.push_str(&format!("&node={node}"));
            }
            let events: Vec<Event> = client.call("GET", &path, None::<&()>).await?;
            print_events(&events, api.output)
        }
        Command::Summary { api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let summary: Summary = client.call("GET", "/summary", None::<&()>).await?;
            if api.output == Output::Json {
                return print_json(&summary);
            }
            let mut rows: Vec<Vec<String>> = summary
                .by_state
                .iter()
                .map(|(state, n)| vec![state.clone(), n.to_string()])
                .collect();
            rows.push(vec!["total".into(), summary.total.to_string()]);
            table::print(&["STATE", "NODES"], &rows);
            Ok(())
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = FileConfig::load(args.store.config.as_deref())?;
    let config = config::resolve(
        Overrides {
            listen: args.listen,
            public_url: args.public_url,
            data_dir: args.store.data_dir,
            database_url: args.store.database_url,
            log_format: args.log_format,
            default_flavor: args.default_flavor,
        },
        file,
    )?;
    init_logging(config.log_json);
    std::fs::create_dir_all(config.data_dir.join("images"))
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let store = bearman::server::open_sql_store(&config.database_url)
        .await
        .map_err(|e| anyhow!("opening the database: {e}"))?;
    if store
        .token_list()
        .await
        .map_err(|e| anyhow!("{e}"))?
        .is_empty()
    {
        tracing::warn!(
            "no API tokens exist yet; create the first admin token with \
             `bearman token create --name admin --role admin` (same --data-dir / --database-url)"
        );
    }
    let listener = bearman::runtime::system::bind_tcp(&config.listen.to_string())
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(
        listen = %bound,
        public_url = %config.public_url,
        store = store.backend_name(),
        database = %bearman::store::sql::redact_url(&config.database_url),
        "bearman serving; DHCP should point iPXE at {}/ipxe",
        config.public_url
    );
    // Without BMC drivers remediation detects and guards but cannot fence: every fence
    // fails (reported) and nothing is ever evacuated on a guess. Without a cloud, fenced
    // nodes are rebuilt but no VM is moved.
    let cloud: Option<Arc<dyn bearman::cloud::Cloud>> = match config.nova.clone() {
        Some(nova) => {
            let cloud =
                bearman::cloud::nova::NovaCloud::new(nova, bearman::cloud::nova::TcpConnector)
                    .map_err(|e| anyhow!("nova configuration: {e}"))?;
            tracing::info!("evacuation through OpenStack Nova enabled");
            Some(Arc::new(cloud))
        }
        None => {
            tracing::warn!("no [nova] section: remediation will not evacuate VMs");
            None
        }
    };
    let bmcs = bearman::bmc::provider::DriverBmcs::new(config.bmc.clone())
        .map_err(|e| anyhow!("bmc configuration: {e}"))?;
    let parts = bearman::server::DaemonParts {
        store,
        clock: Arc::new(SystemClock),
        images: Arc::new(DirImages::new(config.data_dir.join("images"))),
        service: ServiceConfig {
            public_url: config.public_url.clone(),
            stage1: config.stage1.clone(),
            defaults: RegistrationDefaults {
                role: config.default_role,
                flavor: config.default_flavor.clone(),
            },
            body_limit_bytes: config.body_limit_bytes,
            heartbeat_fresh_ms: config.heartbeat_fresh_s as i64 * 1000,
        },
        bmcs: Arc::new(bmcs),
        cloud,
        remediation: config.remediation.clone(),
    };
    bearman::server::run_daemon(listener, parts, shutdown_signal()).await?;
    tracing::info!("bearman stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            biased;
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested; finishing in-flight requests");
}

async fn open_store_for_cli(store: &StoreArgs) -> anyhow::Result<Arc<dyn bearman::store::Store>> {
    let file = FileConfig::load(store.config.as_deref())?;
    let data_dir = store
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(config::DATA_DIR_DEFAULT));
    let url = match store.database_url.clone().or(file.database_url) {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            config::sqlite_url(&data_dir)?
        }
    };
    bearman::server::open_sql_store(&url)
        .await
        .map_err(|e| anyhow!("opening the database: {e}"))
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            store,
            output,
        } => {
            let store = open_store_for_cli(&store).await?;
            let role = TokenRole::parse(&role).ok_or_else(|| anyhow!("unknown role {role}"))?;
            // The first admin token is made here, on the store, before any daemon runs.
            let token: NewToken = offline_app(store)
                .token_create("cli", &name, role)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if output == Output::Json {
                return print_json(&token);
            }
            println!("{}", token.secret);
            eprintln!(
                "token {} (role {}) created; the secret above is shown only once. Use it as BEARMAN_TOKEN.",
                token.name,
                token.role.as_str()
            );
            Ok(())
        }
        TokenCommand::List { store, output } => {
            let store = open_store_for_cli(&store).await?;
            let tokens: Vec<ApiToken> = store.token_list().await.map_err(|e| anyhow!("{e}"))?;
            if output == Output::Json {
                return print_json(&tokens);
            }
            let rows = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.as_str().to_string(),
                        table::timestamp(t.created_at_ms),
                    ]
                })
                .collect::<Vec<_>>();
            table::print(&["NAME", "ROLE", "CREATED"], &rows);
            Ok(())
        }
        TokenCommand::Revoke { name, store } => {
            let store = open_store_for_cli(&store).await?;
            // Audited like a revocation over the API, as `token create` here is.
            offline_app(store)
                .token_delete("cli", &name)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            eprintln!("token {name} revoked");
            Ok(())
        }
    }
}

/// The application on a store opened by the CLI itself (token commands, run on the
/// database before or beside a daemon), so those writes are audited like the API's.
fn offline_app(store: Arc<dyn bearman::store::Store>) -> App {
    App::new(
        store,
        Arc::new(SystemClock),
        Settings {
            defaults: RegistrationDefaults {
                role: bearman::core::model::NodeRole::Compute,
                flavor: None,
            },
            heartbeat_fresh_ms: 0,
        },
    )
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_nodes(nodes: &[Node], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&nodes);
    }
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.uuid.to_string(),
                n.hostname.clone(),
                n.state.as_str().to_string(),
                n.role.as_str().to_string(),
                table::or_dash(n.rack.as_deref()),
                table::or_dash(n.flavor.as_deref()),
                table::or_dash(n.network.bond0_addresses.first().map(String::as_str)),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "UUID", "HOSTNAME", "STATE", "ROLE", "RACK", "FLAVOR", "ADDRESS",
        ],
        &rows,
    );
    Ok(())
}

fn print_events(events: &[Event], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&events);
    }
    let rows = events
        .iter()
        .map(|e| {
            let change = match (&e.from_state, &e.to_state) {
                (Some(from), Some(to)) => format!("{from} -> {to}"),
                _ => "-".into(),
            };
            vec![
                e.id.to_string(),
                table::timestamp(e.at_ms),
                e.node_uuid.as_ref().map_or("-".into(), |u| u.to_string()),
                e.actor.clone(),
                e.action.to_string(),
                change,
                e.reason.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &["ID", "AT", "NODE", "ACTOR", "ACTION", "STATE", "WHY"],
        &rows,
    );
    Ok(())
}

fn reason_body(reason: Option<String>) -> Value {
    json!({ "reason": reason })
}

async fn node(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List {
            api,
            state,
            rack,
            role,
            limit,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let mut path = format!("/nodes?limit={limit}");
            for (key, value) in [("state", state), ("rack", rack), ("role", role)] {
                if let Some(value) = value {
                    path.push_str(&format!("&{key}={value}"));
                }
            }
            let nodes: Vec<Node> = client.call("GET", &path, None::<&()>).await?;
            print_nodes(&nodes, api.output)
        }
        NodeCommand::Show { uuid, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let mut node: Value = client
                .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
                .await?;
            // The last BMC power reading (power sync) is kept apart from the node record;
            // show it alongside.
            let power: Value = client
                .call("GET", &format!("/nodes/{uuid}/power"), None::<&()>)
                .await?;
            if let Some(fields) = node.as_object_mut() {
                fields.insert("last_power_reading".into(), power["power"].clone());
            }
            // A node has nested hardware facts; JSON is the readable form either way.
            print_json(&node)
        }
        NodeCommand::Enroll {
            uuid,
            api,
            hostname,
            role,
            rack,
            flavor,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let body = json!({ "uuid": uuid, "hostname": hostname, "role": role, "rack": rack, "flavor": flavor });
            let node: Node = client.call("POST", "/nodes", Some(&body)).await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Update {
            uuid,
            api,
            hostname,
            role,
            rack,
            flavor,
            bmc_address,
            bmc_driver,
            bmc_credentials_ref,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let mut body =
                json!({ "hostname": hostname, "role": role, "rack": rack, "flavor": flavor });
            if bmc_address.is_some() || bmc_driver.is_some() || bmc_credentials_ref.is_some() {
                let current: Node = client
                    .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
                    .await?;
                let mut bmc = serde_json::to_value(&current.bmc)?;
                if let Some(address) = bmc_address {
                    bmc["address"] = json!(address);
                }
                if let Some(driver) = bmc_driver {
                    bmc["driver"] = json!(driver);
                }
                if let Some(reference) = bmc_credentials_ref {
                    bmc["credentials_ref"] = json!(reference);
                }
                body["bmc"] = bmc;
                body["generation"] = json!(current.generation);
            }
            let node: Node = client
                .call("PATCH", &format!("/nodes/{uuid}"), Some(&body))
                .await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Maintenance {
            uuid,
            mode,
            api,
            reason,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let method = if mode == "on" { "POST" } else { "DELETE" };
            let node: Node = client
                .call(
                    method,
                    &format!("/nodes/{uuid}/maintenance"),
                    Some(&reason_body(reason)),
                )
                .await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Rebuild { uuid, api, reason } => {
            remediate(&api, &uuid, "rebuild", reason).await
        }
        NodeCommand::Fence { uuid, api, reason } => remediate(&api, &uuid, "fence", reason).await,
        NodeCommand::Evacuate { uuid, api, reason } => {
            remediate(&api, &uuid, "evacuate", reason).await
        }
        NodeCommand::Drain { uuid, api, reason } => remediate(&api, &uuid, "drain", reason).await,
        NodeCommand::Retire { uuid, api, reason } => node_post(&api, &uuid, "retire", reason).await,
        NodeCommand::AcceptIdentity { uuid, api, reason } => {
            node_post(&api, &uuid, "accept-identity", reason).await
        }
        NodeCommand::Events { uuid, api, limit } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let events: Vec<Event> = client
                .call(
                    "GET",
                    &format!("/nodes/{uuid}/events?limit={limit}"),
                    None::<&()>,
                )
                .await?;
            print_events(&events, api.output)
        }
    }
}

async fn node_post(
    api: &ApiArgs,
    uuid: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let client = ApiClient::new(&api.url, api.token.clone())?;
    let node: Node = client
        .call(
            "POST",
            &format!("/nodes/{uuid}/{action}"),
            Some(&reason_body(reason)),
        )
        .await?;
    print_nodes(&[node], api.output)
}

fn print_remediations(items: &[Remediation], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&items);
    }
    let rows = items
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.node_uuid.to_string(),
                r.kind.as_str().to_string(),
                r.status.as_str().to_string(),
                r.step().map_or("-".to_string(), |s| {
                    format!("{} (attempt {})", s.as_str(), r.attempts)
                }),
                table::timestamp(r.created_at_ms),
                r.requested_by.clone(),
                table::or_dash(r.last_error.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "ID",
            "NODE",
            "KIND",
            "STATUS",
            "STEP",
            "CREATED",
            "BY",
            "LAST ERROR",
        ],
        &rows,
    );
    Ok(())
}

async fn remediate(
    api: &ApiArgs,
    uuid: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let client = ApiClient::new(&api.url, api.token.clone())?;
    let created: Remediation = client
        .call(
            "POST",
            &format!("/nodes/{uuid}/{action}"),
            Some(&reason_body(reason)),
        )
        .await?;
    print_remediations(&[created], api.output)
}

async fn remediation(command: RemediationCommand) -> anyhow::Result<()> {
    match command {
        RemediationCommand::List {
            api,
            active,
            node,
            limit,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let mut path = format!("/remediations?limit={limit}&active={active}");
            if let Some(node) = node {
                path.push_str(&format!("&node={node}"));
            }
            let items: Vec<Remediation> = client.call("GET", &path, None::<&()>).await?;
            print_remediations(&items, api.output)
        }
        RemediationCommand::Show { id, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let item: Value = client
                .call("GET", &format!("/remediations/{id}"), None::<&()>)
                .await?;
            print_json(&item)
        }
        RemediationCommand::Cancel { id, api, reason } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let item: Remediation = client
                .call(
                    "POST",
                    &format!("/remediations/{id}/cancel"),
                    Some(&reason_body(reason)),
                )
                .await?;
            print_remediations(&[item], api.output)
        }
        RemediationCommand::Guards { api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let guards: Value = client
                .call("GET", "/remediation/guards", None::<&()>)
                .await?;
            print_json(&guards)
        }
    }
}

fn print_flavors(flavors: &[Flavor], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&flavors);
    }
    let rows = flavors
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.kernel.url.clone(),
                f.initrds.len().to_string(),
                f.cmdline_template.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table::print(&["NAME", "KERNEL", "INITRDS", "CMDLINE"], &rows);
    Ok(())
}

fn load_flavor_file(path: &std::path::Path) -> anyhow::Result<Flavor> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

async fn flavor(command: FlavorCommand) -> anyhow::Result<()> {
    match command {
        FlavorCommand::List { api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let flavors: Vec<Flavor> = client.call("GET", "/flavors", None::<&()>).await?;
            print_flavors(&flavors, api.output)
        }
        FlavorCommand::Show { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let flavor: Flavor = client
                .call("GET", &format!("/flavors/{name}"), None::<&()>)
                .await?;
            print_json(&flavor)
        }
        FlavorCommand::Create {
            api,
            file,
            name,
            kernel,
            kernel_sha256,
            initrd,
            initrd_sha256,
            cmdline,
            replace,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let flavor = match file {
                Some(path) => load_flavor_file(&path)?,
                None => {
                    if initrd.len() != initrd_sha256.len() {
                        bail!(
                            "{} --initrd but {} --initrd-sha256: give one checksum per initrd",
                            initrd.len(),
                            initrd_sha256.len()
                        );
                    }
                    Flavor {
                        name: name.unwrap_or_default(),
                        kernel: Artifact {
                            url: kernel.unwrap_or_default(),
                            sha256: kernel_sha256.unwrap_or_default(),
                        },
                        initrds: initrd
                            .into_iter()
                            .zip(initrd_sha256)
                            .map(|(url, sha256)| Artifact { url, sha256 })
                            .collect(),
                        cmdline_template: cmdline,
                        firmware_expected: Default::default(),
                    }
                }
            };
            let created: Flavor = if replace {
                client
                    .call("PUT", &format!("/flavors/{}", flavor.name), Some(&flavor))
                    .await?
            } else {
                client.call("POST", "/flavors", Some(&flavor)).await?
            };
            print_flavors(&[created], api.output)
        }
        FlavorCommand::Delete { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let _: Value = client
                .call("DELETE", &format!("/flavors/{name}"), None::<&()>)
                .await?;
            eprintln!("flavor {name} deleted");
            Ok(())
        }
    }
}

fn print_pools(pools: &[IpPool], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&pools);
    }
    let rows = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.purpose.as_str().to_string(),
                p.vlan.map_or("-".into(), |v| v.to_string()),
                p.cidr.clone(),
                format!("{}-{}", p.range_start, p.range_end),
                table::or_dash(p.gateway.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &["NAME", "PURPOSE", "VLAN", "CIDR", "RANGE", "GATEWAY"],
        &rows,
    );
    Ok(())
}

async fn pool(command: PoolCommand) -> anyhow::Result<()> {
    match command {
        PoolCommand::List { api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let pools: Vec<IpPool> = client.call("GET", "/pools", None::<&()>).await?;
            print_pools(&pools, api.output)
        }
        PoolCommand::Show { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let detail: PoolDetail = client
                .call("GET", &format!("/pools/{name}"), None::<&()>)
                .await?;
            if api.output == Output::Json {
                return print_json(&detail);
            }
            print_pools(std::slice::from_ref(&detail.pool), Output::Table)?;
            println!(
                "\n{} of {} addresses allocated",
                detail.allocations.len(),
                detail.size
            );
            let rows = detail
                .allocations
                .iter()
                .map(|a| {
                    vec![
                        a.address.clone(),
                        a.node_uuid.to_string(),
                        a.purpose.as_str().to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            table::print(&["ADDRESS", "NODE", "PURPOSE"], &rows);
            Ok(())
        }
        PoolCommand::Create {
            name,
            api,
            purpose,
            cidr,
            range,
            gateway,
            dns,
            vlan,
            mtu,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let (start, end) = range.split_once('-').ok_or_else(|| {
                anyhow!("--range {range:?}: expected START-END, e.g. 10.1.0.10-10.1.0.250")
            })?;
            let pool = IpPool {
                name,
                purpose: PoolPurpose::parse(&purpose)
                    .ok_or_else(|| anyhow!("--purpose {purpose}"))?,
                vlan,
                cidr,
                range_start: start.trim().to_string(),
                range_end: end.trim().to_string(),
                gateway,
                dns,
                mtu,
            };
            let created: IpPool = client.call("POST", "/pools", Some(&pool)).await?;
            print_pools(&[created], api.output)
        }
        PoolCommand::Delete { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone())?;
            let _: Value = client
                .call("DELETE", &format!("/pools/{name}"), None::<&()>)
                .await?;
            eprintln!("pool {name} deleted");
            Ok(())
        }
    }
}

/// BMC drivers for `bearman bmc`: the [bmc] table of --config, --secrets-file over it.
fn bmc_drivers(args: &BmcArgs) -> anyhow::Result<bearman::bmc::provider::DriverBmcs> {
    let file = FileConfig::load(args.config.as_deref())?;
    let mut settings = file.bmc.unwrap_or_default();
    if let Some(path) = &args.secrets_file {
        settings.secrets_file = Some(path.clone());
    }
    bearman::bmc::provider::DriverBmcs::new(settings).map_err(|e| anyhow!("bmc configuration: {e}"))
}

/// Every node, page by page (bounded: a million nodes is a thousand pages).
async fn all_nodes(client: &ApiClient) -> anyhow::Result<Vec<Node>> {
    let page_size = bearman::store::LIST_LIMIT_MAX;
    let mut nodes = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/nodes?limit={page_size}");
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let page: Vec<Node> = client.call("GET", &path, None::<&()>).await?;
        let full = page.len() == page_size;
        after = page.last().map(|n| n.uuid.to_string());
        nodes.extend(page);
        if !full {
            break;
        }
    }
    Ok(nodes)
}

async fn bmc(command: BmcCommand) -> anyhow::Result<()> {
    use bearman::bmc::ops::{self, PowerAction};
    let (uuid, action, args) = match command {
        BmcCommand::Check {
            bmc: args,
            parallelism,
        } => {
            let drivers = bmc_drivers(&args)?;
            let client = ApiClient::new(&args.api.url, args.api.token.clone())?;
            let nodes = all_nodes(&client).await?;
            let rows = ops::check_all(&drivers, &nodes, parallelism).await;
            if args.api.output == Output::Json {
                print_json(&rows)?;
            } else {
                table::print(&ops::CHECK_HEADERS, &ops::check_rows_table(&rows));
            }
            let failed = rows.iter().filter(|row| row.error.is_some()).count();
            if failed > 0 {
                bail!("{failed} of {} BMCs did not answer", rows.len());
            }
            return Ok(());
        }
        BmcCommand::Status { uuid, bmc } => (uuid, PowerAction::Status, bmc),
        BmcCommand::Pxe { uuid, bmc } => (uuid, PowerAction::Pxe, bmc),
        BmcCommand::Power { action, uuid, bmc } => {
            let action = match action.as_str() {
                "on" => PowerAction::On,
                "off" => PowerAction::Off,
                _ => PowerAction::Cycle,
            };
            (uuid, action, bmc)
        }
    };
    let drivers = bmc_drivers(&args)?;
    let client = ApiClient::new(&args.api.url, args.api.token.clone())?;
    let node: Node = client
        .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
        .await?;
    let report = ops::act_on_node(&drivers, &node, action).await?;
    if args.api.output == Output::Json {
        return print_json(&report);
    }
    println!("{}", report.summary());
    Ok(())
}
