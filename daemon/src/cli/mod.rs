//! Command-line interface: `serve` runs the daemon; `token` works on the database
//! directly (to bootstrap the first admin); everything else is a client of the admin API.

mod args;
mod bmc;
mod client;
mod cluster;
mod config;
mod drill;
mod firmware;
mod flavor;
mod migrate;
mod node;
mod pool;
mod remediation;
mod serve;
mod table;
mod token;

use std::io::Write as _;
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

use args::*;
use bmc::*;
use client::ApiClient;
use cluster::*;
use config::{FileConfig, Overrides};
use drill::*;
use firmware::*;
use flavor::*;
use migrate::*;
use node::*;
use pool::*;
use remediation::*;
use serve::*;
use token::*;

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
    let result = runtime.block_on(run(cli));
    // Dropping a runtime waits for every blocking task it started, however long; a
    // command that has done its work must exit, so give them a bounded moment instead.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`bearman events | head`): it has what it wanted, so this
        // is not a failure. Exit 0 rather than the shell's 141 (death by SIGPIPE) so that
        // `set -o pipefail` scripts do not fail on a pipe they closed on purpose; and
        // quietly, since there is nobody to tell on stdout and nothing went wrong.
        Err(error) if table::is_broken_pipe(&error) => ExitCode::SUCCESS,
        // `migrate status` on a database a newer release migrated: 2, so a rollout
        // script tells "too new for this binary" from "could not look".
        Err(error) if error.downcast_ref::<NewerSchema>().is_some() => {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                table::escape(&format!("{error:#}"))
            );
            ExitCode::from(2)
        }
        Err(error) => {
            // The error may quote what the daemon or a BMC said; escape it like any output.
            // Writing to stderr can fail too (`2>&1 | head`): never panic over it.
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                table::escape(&format!("{error:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

/// How long a finished command waits for the runtime's blocking tasks before exiting.
const RUNTIME_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Token(command) => token(command).await,
        Command::Node(command) => node(command).await,
        Command::Flavor(command) => flavor(command).await,
        Command::Pool(command) => pool(command).await,
        Command::Firmware(command) => firmware(command).await,
        Command::Drill(command) => drill(command).await,
        Command::Remediation(command) => remediation(command).await,
        Command::Bmc(command) => bmc(command).await,
        Command::Cluster(ClusterCommand::Status { api }) => cluster_status(&api).await,
        Command::Migrate(command) => migrate(command).await,
        Command::Backup { to, force, store } => backup(&to, force, &store).await,
        Command::Restore { from, store } => restore(&from, &store).await,
        Command::Events { api, node, limit } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let mut path = format!("/events?limit={limit}");
            if let Some(node) = node {
                path.push_str(&format!("&node={node}"));
            }
            let events: Vec<Event> = client.call("GET", &path, None::<&()>).await?;
            print_events(&events, api.output)
        }
        Command::Summary { api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
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
            table::print(&["STATE", "NODES"], &rows)?;
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

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    // Exact JSON: serde escapes control characters in strings itself.
    table::out(&serde_json::to_string_pretty(value)?)?;
    Ok(())
}
