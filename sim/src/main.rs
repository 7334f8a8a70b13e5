//! `bearman-sim`: run fleet-failure scenarios deterministically and report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use bearman_sim::report;
use bearman_sim::run::{run_watched, RunOptions};
use bearman_sim::scenario::Scenario;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bearman-sim",
    version,
    about = "Deterministic fleet simulator: runs the real Bearman daemon with racks of virtual nodes on turmoil",
    long_about = "Runs a scenario (fleet shape, timings, fault schedule, expectations) against the real daemon \
code on a virtual network and clock. The same scenario and seed always replay byte-for-byte: the trace hash \
printed at the end is the proof. Exit code 1 when an invariant or expectation fails."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file on one seed or a range of seeds
    Run {
        /// Scenario TOML file (see scenarios/)
        scenario: PathBuf,
        /// Seed (default: SIM_SEED, else 1)
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Seed range A..B, B exclusive (default: SIM_SEEDS when set)
        #[arg(long)]
        seeds: Option<String>,
        /// Resize the fleet to N nodes (whole racks), keeping nodes per rack
        #[arg(long)]
        nodes: Option<u32>,
        /// With --nodes: nodes per rack (each rack is one turmoil host; fewer, larger
        /// racks simulate faster)
        #[arg(long, requires = "nodes")]
        nodes_per_rack: Option<u32>,
        /// Write the trace to FILE (one run) or FILE.<seed> (several)
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Only the summary line per seed
        #[arg(long)]
        quiet: bool,
        /// Serve the simulated daemon's /metrics on ADDR (e.g. 127.0.0.1:9464) while the
        /// scenario runs, for Prometheus or a browser; `?daemon=NAME` picks a replica
        /// (default: the one leading). Read-only: a watched run replays byte for byte
        #[arg(long, value_name = "ADDR")]
        serve: Option<std::net::SocketAddr>,
        /// Virtual seconds per wall-clock second (1 = real time, 0.5 = slowed down, 0 =
        /// as fast as it goes). Default: 1 with --serve, else 0
        #[arg(long, value_name = "RATIO")]
        pace: Option<f64>,
    },
}

/// The `--serve` window: a plain HTTP server on its own thread, outside the simulation,
/// answering from `watch` (see `bearman_sim::watch` for why that keeps the run the same).
fn serve_window(
    address: std::net::SocketAddr,
    watch: bearman_sim::watch::Watch,
) -> anyhow::Result<()> {
    use axum::extract::{Query, State};
    use axum::response::IntoResponse;
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("--serve {address}: cannot listen there"))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("sim-window".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the window's runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("the window's listener");
                async fn metrics(
                    State(watch): State<bearman_sim::watch::Watch>,
                    Query(query): Query<std::collections::BTreeMap<String, String>>,
                ) -> axum::response::Response {
                    let (status, body) = watch.metrics(query.get("daemon").map(String::as_str)).await;
                    (
                        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK),
                        [(axum::http::header::CONTENT_TYPE, bearman::telemetry::CONTENT_TYPE)],
                        body,
                    )
                        .into_response()
                }
                async fn index(State(watch): State<bearman_sim::watch::Watch>) -> String {
                    let virtual_s = (watch.now_ms() - bearman_sim::run::EPOCH_MS).max(0) / 1000;
                    format!(
                        "bearman-sim: {} at t={virtual_s} s (virtual)\ndaemons: {}\n/metrics (?daemon=NAME)\n",
                        watch.title(),
                        watch.daemons().join(", ")
                    )
                }
                let app = axum::Router::new()
                    .route("/", axum::routing::get(index))
                    .route("/metrics", axum::routing::get(metrics))
                    .with_state(watch);
                if let Err(error) = axum::serve(listener, app).await {
                    eprintln!("bearman-sim: the --serve window stopped: {error}");
                }
            });
        })?;
    Ok(())
}

fn parse_seeds(text: &str) -> anyhow::Result<Vec<u64>> {
    let (start, end) = text
        .split_once("..")
        .with_context(|| format!("--seeds {text:?}: expected A..B, e.g. 1..5"))?;
    let start: u64 = start
        .trim()
        .parse()
        .with_context(|| format!("--seeds {text:?}: bad start"))?;
    let end: u64 = end
        .trim()
        .parse()
        .with_context(|| format!("--seeds {text:?}: bad end"))?;
    if end <= start || end - start > 10_000 {
        bail!("--seeds {text:?}: need A < B and at most 10,000 seeds");
    }
    Ok((start..end).collect())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let Command::Run {
        scenario: path,
        seed,
        seeds,
        nodes,
        nodes_per_rack,
        trace,
        quiet,
        serve,
        pace,
    } = Cli::parse().command;
    let pace = pace.unwrap_or(if serve.is_some() { 1.0 } else { 0.0 });
    if !pace.is_finite() || pace < 0.0 {
        bail!("--pace {pace}: expected a ratio of at least 0 (1 = real time, 0 = unpaced)");
    }
    let watch = match serve {
        Some(address) => {
            let watch = bearman_sim::watch::Watch::default();
            serve_window(address, watch.clone())?;
            eprintln!(
                "bearman-sim: serving the simulated daemon's metrics at http://{address}/metrics (pace {pace}x real time)"
            );
            Some(watch)
        }
        None => None,
    };
    let mut scenario = Scenario::load(&path)?;
    if let Some(nodes) = nodes {
        scenario = scenario.with_nodes(nodes, nodes_per_rack)?;
    }
    let seeds = match (seed, seeds) {
        (Some(seed), _) => vec![seed],
        (None, Some(range)) => parse_seeds(&range)?,
        (None, None) => match (std::env::var("SIM_SEED"), std::env::var("SIM_SEEDS")) {
            (Ok(seed), _) => vec![seed.parse().with_context(|| format!("SIM_SEED={seed:?}"))?],
            (Err(_), Ok(range)) => parse_seeds(&range)?,
            _ => vec![1],
        },
    };
    let mut all_passed = true;
    let mut all_recoveries: Vec<bearman_sim::recovery::Recovery> = Vec::new();
    let mut fences_total = 0usize;
    let mut all_takeovers: Vec<std::time::Duration> = Vec::new();
    let mut clustered = false;
    let mut actions_judged = 0u64;
    for seed in &seeds {
        eprintln!(
            "bearman-sim: {} seed {seed}: {} nodes ({} racks x {}), {} s virtual, tick {} ms",
            scenario.name,
            scenario.node_count(),
            scenario.fleet.racks,
            scenario.fleet.nodes_per_rack,
            scenario.duration_s,
            scenario.tick_ms
        );
        let started = Instant::now();
        let mut paced = |virtual_elapsed: std::time::Duration| {
            if pace > 0.0 {
                let due = virtual_elapsed.div_f64(pace);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        };
        let report = run_watched(
            &scenario,
            &RunOptions { seed: *seed },
            watch.as_ref(),
            &mut paced,
            |sample, fraction| {
                if !quiet {
                    let ready = sample
                        .counts
                        .get(&bearman::core::LifecycleState::Ready)
                        .copied()
                        .unwrap_or(0);
                    eprintln!(
                        "  [{:>3.0}%] t={}s wall={:.1}s ready={ready} running={} vms_down={}",
                        fraction * 100.0,
                        sample.at.as_secs(),
                        started.elapsed().as_secs_f64(),
                        sample.machines_running,
                        sample.vms_down
                    );
                }
            },
        )?;
        let wall = started.elapsed();
        if let Some(trace_path) = &trace {
            let target = if seeds.len() == 1 {
                trace_path.clone()
            } else {
                PathBuf::from(format!("{}.{seed}", trace_path.display()))
            };
            std::fs::write(&target, report.trace.lines().join("\n") + "\n")
                .with_context(|| format!("writing trace {}", target.display()))?;
        }
        if quiet {
            println!(
                "{} seed {seed}: {} trace {} virtual/wall {:.1}x",
                scenario.name,
                if report.passed() { "PASS" } else { "FAIL" },
                report.trace.hash(),
                report.virtual_time.as_secs_f64() / wall.as_secs_f64().max(1e-9)
            );
        } else {
            println!("{}", report::render(&report, wall));
        }
        all_recoveries.extend(report.recoveries.iter().cloned());
        fences_total += report.fences;
        all_takeovers.extend(report.takeovers.iter().copied());
        clustered |= report.lease_terms > 0;
        actions_judged += report.actions_judged;
        if !report.passed() {
            all_passed = false;
            let mut replay = format!("bearman-sim run {} --seed {seed}", path.display());
            if let Some(nodes) = nodes {
                replay.push_str(&format!(" --nodes {nodes}"));
            }
            if let Some(per_rack) = nodes_per_rack {
                replay.push_str(&format!(" --nodes-per-rack {per_rack}"));
            }
            eprintln!(
                "FAILED: {} seed {seed} (tick {} ms, {} racks x {} nodes). Replay: {replay}",
                scenario.name,
                scenario.tick_ms,
                scenario.fleet.racks,
                scenario.fleet.nodes_per_rack
            );
        }
    }
    if seeds.len() > 1 {
        print_aggregate(&scenario.name, seeds.len(), &all_recoveries, fences_total);
        if clustered {
            println!(
                "  leader lost -> new lease term {}  ({} takeover(s)); {actions_judged} action(s) judged against the lease",
                distribution(&all_takeovers),
                all_takeovers.len()
            );
        }
    }
    Ok(all_passed)
}

/// "p50 … p99 … max …" of `values` (seconds, one decimal; "-" when empty).
fn distribution(values: &[std::time::Duration]) -> String {
    use bearman_sim::recovery::percentile;
    let fmt = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
    };
    format!(
        "p50 {}  p99 {}  max {}",
        fmt(percentile(values, 50)),
        fmt(percentile(values, 99)),
        fmt(values.iter().max().copied())
    )
}

/// Recovery figures over every crashed node of every seed.
fn print_aggregate(
    name: &str,
    runs: usize,
    recoveries: &[bearman_sim::recovery::Recovery],
    fences: usize,
) {
    println!(
        "{name}: {runs} seeds, {} crashed node(s), {fences} fence(s) started",
        recoveries.len()
    );
    let show = |label: &str, values: Vec<std::time::Duration>, missing: usize| {
        if values.is_empty() && missing == 0 {
            return;
        }
        println!(
            "  {label:<28} {}{}",
            distribution(&values),
            if missing > 0 {
                format!("  ({missing} never)")
            } else {
                String::new()
            }
        );
    };
    let split = |f: fn(&bearman_sim::recovery::Recovery) -> Option<std::time::Duration>| {
        let values: Vec<_> = recoveries.iter().filter_map(f).collect();
        let missing = recoveries.len() - values.len();
        (values, missing)
    };
    let (v, m) = split(|r| r.detected_after);
    show("crash -> detected", v, m);
    let (v, m) = split(|r| r.fenced_after);
    show("crash -> fence verified", v, m);
    let (v, m) = split(|r| r.vms_elsewhere_after);
    show("crash -> VMs running elsewhere", v, m);
    // A recovery cut short by the node's next crash has no Ready time of its own.
    let (v, m) = split(|r| r.ready_after);
    let interrupted = recoveries.iter().filter(|r| r.interrupted()).count();
    show("crash -> node Ready again", v, m - interrupted);
}
