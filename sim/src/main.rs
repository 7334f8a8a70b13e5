//! `bearman-sim`: run fleet-failure scenarios deterministically and report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use bearman_sim::report;
use bearman_sim::run::{run_watched, RunOptions};
use bearman_sim::scenario::Scenario;
use clap::{Parser, Subcommand};

/// A simulation allocates and frees millions of small objects (tasks, buffers, requests);
/// glibc's malloc spent about a fifth of a 10,000-node run in its own bookkeeping
/// (`malloc_consolidate`, `unlink_chunk`). The allocator changes no simulated behaviour:
/// nothing in a run depends on addresses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Run(RunArgs),
    /// Rehearse a drill on a twin of the live fleet (`bearman drill twin --out`): the
    /// twin becomes a scenario, each seed runs the real daemon through the drill, and the
    /// daemon's reports give the predicted timeline (p50/p99 per phase) and a verdict
    /// per hypothesis item. Exit 1 when a seed breaks the hypothesis, the budget or the
    /// preflight refuses, or an invariant fails
    Rehearse(RehearseArgs),
    /// Merge the --json reports of shards of one sweep and print its aggregate, as the
    /// whole sweep run in one place would (exit 1 when a seed failed)
    Merge {
        /// The shards' reports
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Write the merged report as JSON to FILE
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// A fresh directory for the child runs' reports.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "bearman-sim-jobs-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[derive(clap::Args)]
struct RunArgs {
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
    /// Serve the simulated daemon's dashboard (/ui/, read-only) and /metrics on ADDR
    /// (e.g. 127.0.0.1:9464) while the scenario runs; `/metrics?daemon=NAME` picks a
    /// replica (default: the one leading). Read-only: a watched run replays byte for
    /// byte
    #[arg(long, value_name = "ADDR")]
    serve: Option<std::net::SocketAddr>,
    /// Virtual seconds per wall-clock second (1 = real time, 0.5 = slowed down, 0 =
    /// as fast as it goes). Default: 1 with --serve, else 0
    #[arg(long, value_name = "RATIO")]
    pace: Option<f64>,
    /// Run N seeds at once (0: one per core). Every seed of a multi-seed run runs in
    /// a process of its own, so its result is what `--seed S` replays; reports and
    /// the aggregate come out in seed order, whatever N. A seed's progress lines are
    /// shown when it finishes
    #[arg(long, value_name = "N", default_value_t = 1)]
    jobs: usize,
    /// Run only shard I of N of the seeds (every Nth seed from the Ith, I counted from
    /// 0), for a CI matrix or a Kubernetes Indexed Job; merge the shards' --json
    /// reports with `bearman-sim merge`
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Write the sweep's report (every seed's verdict, trace hash and recovery
    /// figures) as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run every simulated host in every tick, even one with nothing to do (turmoil's
    /// own way). Slower, and the same run to the byte: the trace hash is the one you
    /// get without it. For checking that skipping idle hosts changes nothing
    #[arg(long)]
    run_idle_hosts: bool,
}

#[derive(clap::Args)]
struct RehearseArgs {
    /// The drill file (TOML, as `bearman drill run` takes)
    drill: PathBuf,
    /// The fleet twin (JSON, from `bearman drill twin --out`)
    #[arg(long)]
    twin: PathBuf,
    /// Seed range A..B, B exclusive
    #[arg(long, default_value = "1..21")]
    seeds: String,
    /// Seeds run at once, each in a process of its own (0: one per core)
    #[arg(long, value_name = "N", default_value_t = 1)]
    jobs: usize,
    /// Write the prediction (what `bearman drill run --prediction` reads) to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Save the generated scenario to FILE: any what-if becomes a replayable
    /// `bearman-sim run FILE --seed N`
    #[arg(long, value_name = "FILE")]
    scenario_out: Option<PathBuf>,
    /// VMs per compute node (default: the twin's sample mean, rounded)
    #[arg(long, value_name = "N")]
    vms_per_node: Option<u32>,
}

fn rehearse_main(args: RehearseArgs) -> anyhow::Result<bool> {
    let twin_text = std::fs::read_to_string(&args.twin)
        .with_context(|| format!("reading the twin {}", args.twin.display()))?;
    let twin: bearman::core::drill::FleetTwin = serde_json::from_str(&twin_text)
        .with_context(|| format!("{}: not a fleet twin", args.twin.display()))?;
    let drill_text = std::fs::read_to_string(&args.drill)
        .with_context(|| format!("reading the drill {}", args.drill.display()))?;
    parse_seeds(&args.seeds)?;
    let generated =
        bearman_sim::rehearse::scenario_from_twin(&twin, &drill_text, args.vms_per_node)?;
    let dir = tempfile_dir()?;
    let scenario_path = match &args.scenario_out {
        Some(path) => path.clone(),
        None => dir.join("rehearsal.toml"),
    };
    std::fs::write(&scenario_path, &generated.text)
        .with_context(|| format!("writing {}", scenario_path.display()))?;
    let node_count: usize = twin.racks.iter().map(|r| r.nodes.len()).sum();
    eprintln!(
        "bearman-sim: rehearsing {} on a twin of {node_count} node(s) in {} rack(s) ({} kept off: not Ready in the twin), {} VM(s) per compute node ({}), seeds {}",
        args.drill.display(),
        twin.racks.len(),
        generated.nodes_off,
        generated.vms_per_node,
        generated.vms_source,
        args.seeds
    );
    for (name, sim) in &generated.racks {
        eprintln!("  rack {name} -> {sim}");
    }
    let json = dir.join("sweep.json");
    let output = std::process::Command::new(std::env::current_exe()?)
        .arg("run")
        .arg(&scenario_path)
        .arg("--seeds")
        .arg(&args.seeds)
        .arg("--jobs")
        .arg(args.jobs.to_string())
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .env_remove("SIM_SEED")
        .env_remove("SIM_SEEDS")
        .stdin(std::process::Stdio::null())
        .output()
        .context("starting the rehearsal's runs")?;
    if !matches!(output.status.code(), Some(0 | 1)) {
        bail!(
            "the rehearsal's runs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let sweep: bearman_sim::sweep::SweepReport = serde_json::from_str(&text)?;
    let _ = std::fs::remove_dir_all(&dir);
    let rehearsal = bearman_sim::rehearse::predict(&sweep);
    print!("{}", bearman_sim::rehearse::render(&rehearsal));
    if let Some(path) = &args.scenario_out {
        println!(
            "scenario saved: {} (replay a seed: bearman-sim run {} --seed {})",
            path.display(),
            path.display(),
            sweep.seeds.first().map_or(1, |s| s.seed)
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&rehearsal.prediction)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(rehearsal.passed())
}

/// `--shard I/N` → (I, N).
fn parse_shard(text: &str) -> anyhow::Result<(usize, usize)> {
    let (index, count) = text
        .split_once('/')
        .with_context(|| format!("--shard {text:?}: expected I/N, e.g. 0/4"))?;
    let index: usize = index
        .parse()
        .with_context(|| format!("--shard {text:?}: bad I"))?;
    let count: usize = count
        .parse()
        .with_context(|| format!("--shard {text:?}: bad N"))?;
    if count == 0 || count > 10_000 || index >= count {
        bail!("--shard {text:?}: need 0 <= I < N <= 10000");
    }
    Ok((index, count))
}

fn write_json(
    path: &std::path::Path,
    report: &bearman_sim::sweep::SweepReport,
) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn merge_main(reports: Vec<PathBuf>, json: Option<PathBuf>) -> anyhow::Result<bool> {
    let mut loaded = Vec::new();
    for path in &reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        loaded.push(
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a bearman-sim --json report", path.display()))?,
        );
    }
    let merged = bearman_sim::sweep::merge(loaded)?;
    print!("{}", bearman_sim::sweep::aggregate_text(&merged));
    if let Some(path) = json {
        write_json(&path, &merged)?;
    }
    Ok(merged.passed())
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
                        "bearman-sim: {} at t={virtual_s} s (virtual)\ndaemons: {}\n/ui/ the dashboard (read-only), /metrics (?daemon=NAME)\n",
                        watch.title(),
                        watch.daemons().join(", ")
                    )
                }
                async fn dashboard(
                    State(watch): State<bearman_sim::watch::Watch>,
                    request: axum::extract::Request,
                ) -> axum::response::Response {
                    watch.dashboard(request).await
                }
                let app = axum::Router::new()
                    .route("/status", axum::routing::get(index))
                    .route("/metrics", axum::routing::get(metrics))
                    .fallback(dashboard)
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

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same in its v2 and v3;
/// libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() -> ExitCode {
    // A run's heap only grows and shrinks with the fleet's traffic; mimalloc's default
    // hands freed pages back to the kernel after 10 ms, and faulting them in again
    // (zeroed) was 7 % of a 10,000-node run.
    // SAFETY: an option set before any other thread exists; mimalloc reads it lazily.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The simulator prints its own report and nothing of the code it runs logs anywhere. With
/// no subscriber at all, every span and event of the daemon and of turmoil still went
/// through `tracing`'s `log` compatibility (a dependency turns it on) to find no logger:
/// a few hundred instructions a span, several spans a request. A subscriber that takes
/// nothing turns each into a level check.
fn silence_tracing() {
    // Only fails when one is already set, which is then the one to keep.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
}

fn real_main() -> anyhow::Result<bool> {
    silence_tracing();
    let RunArgs {
        scenario: path,
        seed,
        seeds,
        nodes,
        nodes_per_rack,
        trace,
        quiet,
        serve,
        pace,
        jobs,
        shard,
        json,
        run_idle_hosts,
    } = match Cli::parse().command {
        Command::Merge { reports, json } => return merge_main(reports, json),
        Command::Rehearse(args) => return rehearse_main(args),
        Command::Run(args) => args,
    };
    let jobs = match jobs {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n.min(256),
    };
    if serve.is_some() && jobs > 1 {
        bail!("--serve watches one run at a time: leave --jobs at 1");
    }
    if pace.is_some_and(|pace| pace > 0.0) && jobs > 1 {
        bail!("--pace paces one run at a time: leave --jobs at 1");
    }
    let pace = pace.unwrap_or(if serve.is_some() { 1.0 } else { 0.0 });
    if !pace.is_finite() || pace < 0.0 {
        bail!("--pace {pace}: expected a ratio of at least 0 (1 = real time, 0 = unpaced)");
    }
    let watch = match serve {
        Some(address) => {
            let watch = bearman_sim::watch::Watch::default();
            serve_window(address, watch.clone())?;
            eprintln!(
                "bearman-sim: watching at http://{address}/ui/ (dashboard, read-only) and http://{address}/metrics (pace {pace}x real time)"
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
    let seeds = match &shard {
        Some(text) => {
            let (index, count) = parse_shard(text)?;
            bearman_sim::sweep::shard(&seeds, index, count)
        }
        None => seeds,
    };
    if seeds.is_empty() {
        bail!("no seeds to run in this shard");
    }
    let replay_command = |seed: u64| {
        let mut replay = format!("bearman-sim run {} --seed {seed}", path.display());
        if let Some(nodes) = nodes {
            replay.push_str(&format!(" --nodes {nodes}"));
        }
        if let Some(per_rack) = nodes_per_rack {
            replay.push_str(&format!(" --nodes-per-rack {per_rack}"));
        }
        replay
    };
    // One seed's run, start to end; `show_progress` only when nothing runs beside it.
    let run_one = |seed: u64,
                   show_progress: bool|
     -> anyhow::Result<(bearman_sim::run::Report, std::time::Duration)> {
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
            &RunOptions {
                seed,
                run_idle_hosts,
            },
            watch.as_ref(),
            &mut paced,
            |sample, fraction| {
                if show_progress && !quiet {
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
        Ok((report, started.elapsed()))
    };
    // What is printed of one finished seed, in seed order whatever order they finish in.
    let mut outcomes = Vec::new();
    let mut finish = |seed: u64,
                      report: bearman_sim::run::Report,
                      wall: std::time::Duration|
     -> anyhow::Result<()> {
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
        if !report.passed() {
            eprintln!(
                "FAILED: {} seed {seed} (tick {} ms, {} racks x {} nodes). Replay: {}",
                scenario.name,
                scenario.tick_ms,
                scenario.fleet.racks,
                scenario.fleet.nodes_per_rack,
                replay_command(seed)
            );
        }
        outcomes.push(bearman_sim::sweep::SeedOutcome::of(seed, &report, wall));
        Ok(())
    };
    // One seed (or a watched run) runs here; several run each in a process of its own,
    // `jobs` at a time, so that every seed's result is exactly what its replay command
    // (`--seed N`) gives. Runs that share a process are not always identical to
    // standalone ones: a clustered scenario's seed 20 gave another trace after seed 19
    // had run in the same process (found 2026-12-06; likely tokio's process-wide task
    // ids deciding the order a crashed host's tasks are dropped in, not yet confirmed).
    if seeds.len() == 1 || watch.is_some() {
        for seed in &seeds {
            let (report, wall) = run_one(*seed, true)?;
            finish(*seed, report, wall)?;
        }
    } else {
        // Each seed runs in a child process of its own (this binary, `--seed S`), `jobs`
        // at a time; results are printed in seed order whatever order they finish in.
        let dir = tempfile_dir()?;
        let child_run = |seed: u64| -> anyhow::Result<(std::process::Output, PathBuf)> {
            let json = dir.join(format!("seed-{seed}.json"));
            let mut command = std::process::Command::new(std::env::current_exe()?);
            command
                .arg("run")
                .arg(&path)
                .arg("--seed")
                .arg(seed.to_string())
                .arg("--json")
                .arg(&json);
            if let Some(nodes) = nodes {
                command.arg("--nodes").arg(nodes.to_string());
            }
            if let Some(per_rack) = nodes_per_rack {
                command.arg("--nodes-per-rack").arg(per_rack.to_string());
            }
            if let Some(trace_path) = &trace {
                command
                    .arg("--trace")
                    .arg(format!("{}.{seed}", trace_path.display()));
            }
            if quiet {
                command.arg("--quiet");
            }
            if run_idle_hosts {
                command.arg("--run-idle-hosts");
            }
            let output = command
                .env_remove("SIM_SEED")
                .env_remove("SIM_SEEDS")
                .stdin(std::process::Stdio::null())
                .output()
                .with_context(|| format!("starting the run of seed {seed}"))?;
            Ok((output, json))
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (done, results) = std::sync::mpsc::channel();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            for _ in 0..jobs.min(seeds.len()) {
                let done = done.clone();
                let (next, seeds, child_run) = (&next, &seeds, &child_run);
                // These threads only wait for child processes.
                scope.spawn(move || loop {
                    let position = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(seed) = seeds.get(position) else {
                        return;
                    };
                    if done.send((position, child_run(*seed))).is_err() {
                        return;
                    }
                });
            }
            drop(done);
            let mut waiting = std::collections::BTreeMap::new();
            let mut printed = 0;
            for (position, result) in results {
                waiting.insert(position, result);
                while let Some(result) = waiting.remove(&printed) {
                    let seed = seeds[printed];
                    let (output, json) = result?;
                    // Exit 0: passed, 1: a verdict failed (its report is still written).
                    if !matches!(output.status.code(), Some(0 | 1)) {
                        bail!(
                            "the run of seed {seed} failed ({}): {}",
                            output.status,
                            String::from_utf8_lossy(&output.stderr).trim()
                        );
                    }
                    print!("{}", String::from_utf8_lossy(&output.stdout));
                    for line in String::from_utf8_lossy(&output.stderr).lines() {
                        // The child's banner is ours to print; its verdicts are not.
                        if !line.starts_with("bearman-sim: ") {
                            eprintln!("{line}");
                        }
                    }
                    let text = std::fs::read_to_string(&json)
                        .with_context(|| format!("reading {}", json.display()))?;
                    let report: bearman_sim::sweep::SweepReport = serde_json::from_str(&text)?;
                    outcomes.extend(report.seeds);
                    printed += 1;
                }
            }
            if printed < seeds.len() {
                bail!("{} seed(s) did not finish", seeds.len() - printed);
            }
            Ok(())
        })?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let sweep = bearman_sim::sweep::SweepReport::new(
        &scenario.name,
        scenario.node_count(),
        scenario.fleet.racks,
        outcomes,
    );
    if seeds.len() > 1 {
        print!("{}", bearman_sim::sweep::aggregate_text(&sweep));
    }
    if let Some(path) = json {
        write_json(&path, &sweep)?;
    }
    Ok(sweep.passed())
}
