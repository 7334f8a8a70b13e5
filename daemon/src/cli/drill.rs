//! `bearman drill`: check, preview, run (confirm, start, follow, report), the kill switch,
//! history.

use std::io::BufRead as _;
use std::time::Duration;

use bearman::app::drill::{DrillOverview, DrillPlan};
use bearman::core::drill::{DrillReport, DrillSpec, Prediction};

use super::*;

/// How often `drill run` looks at the running drill.
const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// A line (or lines) on stdout; `table::out` adds the last newline itself.
fn say(text: &str) -> std::io::Result<()> {
    table::out(text.strip_suffix('\n').unwrap_or(text))
}

fn client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())
}

fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if metadata.len() > bearman::core::drill::FILE_BYTES_MAX as u64 {
        bail!(
            "{}: {} bytes; a drill file is at most {}",
            path.display(),
            metadata.len(),
            bearman::core::drill::FILE_BYTES_MAX
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn print_plan(plan: &DrillPlan) -> anyhow::Result<()> {
    let spec = &plan.spec;
    say(&format!(
        "drill {}: {} on {} target(s){}\n\n",
        spec.name,
        spec.fault.as_str(),
        plan.targets.len(),
        if spec.spacing_s > 0 {
            format!(", {} s apart", spec.spacing_s)
        } else {
            String::new()
        }
    ))?;
    let targets: Vec<Vec<String>> = plan
        .targets
        .iter()
        .map(|t| {
            vec![
                t.hostname.clone(),
                t.uuid.to_string(),
                t.rack.clone().unwrap_or_else(|| "-".into()),
                t.role.as_str().into(),
            ]
        })
        .collect();
    table::print(&["TARGET", "UUID", "RACK", "ROLE"], &targets)?;
    say("\n")?;
    let checks: Vec<Vec<String>> = plan
        .preflight
        .iter()
        .map(|c| {
            vec![
                c.uuid
                    .as_ref()
                    .and_then(|uuid| plan.targets.iter().find(|t| &t.uuid == uuid))
                    .map_or("fleet".to_string(), |t| t.hostname.clone()),
                c.check.clone(),
                if c.passed { "ok" } else { "FAILED" }.into(),
                c.detail.clone(),
            ]
        })
        .collect();
    table::print(&["FOR", "CHECK", "RESULT", "DETAIL"], &checks)?;
    say(if plan.ready {
        "\npreflight passed\n"
    } else {
        "\npreflight FAILED: the drill cannot start\n"
    })?;
    Ok(())
}

fn seconds(value: Option<f64>) -> String {
    value.map_or("-".into(), |s| format!("{s:.1} s"))
}

pub(super) fn print_report(report: &DrillReport, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(report);
    }
    let mut head = format!(
        "drill {} {}: {} ({}), started by {} at {}",
        report.id,
        report.name,
        report.outcome.to_uppercase(),
        report.fault.as_str(),
        report.started_by,
        table::timestamp(report.started_at_ms)
    );
    if let Some(finished) = report.finished_at_ms {
        head.push_str(&format!(
            ", finished after {:.0} s",
            (finished - report.started_at_ms) as f64 / 1000.0
        ));
    }
    head.push('\n');
    if let Some(abort) = &report.abort {
        head.push_str(&format!("aborted by {}: {}\n", abort.by, abort.reason));
    }
    say(&head)?;
    say(&match report.prediction_seeds {
        Some(seeds) => format!("predicted: the rehearsal's p50 / p99 over {seeds} seeds\n\n"),
        None => "predicted: no rehearsal given\n\n".to_string(),
    })?;
    let mut rows = Vec::new();
    for target in &report.targets {
        for phase in &target.phases {
            rows.push(vec![
                target.hostname.clone(),
                phase.phase.clone(),
                seconds(phase.actual_s),
                phase
                    .predicted
                    .map_or("-".into(), |p| format!("{:.1} / {:.1} s", p.p50_s, p.p99_s)),
                if phase.beyond_p99 {
                    "BEYOND p99".into()
                } else {
                    String::new()
                },
            ]);
        }
        if let Some(error) = &target.injection_error {
            rows.push(vec![
                target.hostname.clone(),
                "injection".into(),
                "failed".into(),
                "-".into(),
                error.clone(),
            ]);
        }
        if let Some(restored) = &target.restored {
            rows.push(vec![
                target.hostname.clone(),
                "restored".into(),
                restored.clone(),
                "-".into(),
                String::new(),
            ]);
        }
    }
    table::print(
        &["TARGET", "PHASE", "ACTUAL", "PREDICTED p50 / p99", ""],
        &rows,
    )?;
    say("\n")?;
    let items: Vec<Vec<String>> = report
        .hypothesis
        .iter()
        .map(|item| {
            vec![
                item.item.clone(),
                item.expected.clone(),
                item.actual.clone(),
                if item.passed { "passed" } else { "FAILED" }.into(),
            ]
        })
        .collect();
    if !items.is_empty() {
        table::print(&["HYPOTHESIS", "EXPECTED", "ACTUAL", "RESULT"], &items)?;
        say("\n")?;
    }
    for unexpected in &report.unexpected {
        say(&format!(
            "unexpected at {}: {}{}\n",
            table::timestamp(unexpected.at_ms),
            unexpected
                .uuid
                .as_ref()
                .map(|u| format!("node {u} "))
                .unwrap_or_default(),
            unexpected.what
        ))?;
    }
    if !report.divergences.is_empty() {
        say(
            "the run diverged from the rehearsal beyond its p99: the twin or the daemon is wrong; these numbers disagree:\n",
        )?;
        for divergence in &report.divergences {
            say(&format!("  {divergence}\n"))?;
        }
    }
    Ok(())
}

/// A one-line summary of where a running drill is.
fn progress_line(report: &DrillReport) -> String {
    let targets: Vec<String> = report
        .targets
        .iter()
        .map(|t| {
            let reached = t.phases.iter().rev().find(|p| p.actual_s.is_some()).map_or(
                if t.injected_at_ms.is_some() {
                    "injected"
                } else {
                    "waiting"
                },
                |p| p.phase.as_str(),
            );
            format!("{} {reached}", t.hostname)
        })
        .collect();
    format!(
        "drill {}: {} — {}",
        report.id,
        serde_json::to_value(report.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        targets.join(", ")
    )
}

fn confirm(name: &str) -> anyhow::Result<()> {
    eprint!("type the drill's name ({name}) to start it: ");
    let mut line = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if read == 0 {
        bail!("no confirmation (stdin closed): pass --yes to start without one");
    }
    if line.trim() != name {
        bail!(
            "not confirmed ({:?} is not {name:?}): nothing started",
            line.trim()
        );
    }
    Ok(())
}

async fn run_drill(
    file: &std::path::Path,
    yes: bool,
    prediction: Option<&std::path::Path>,
    no_wait: bool,
    api: &ApiArgs,
) -> anyhow::Result<()> {
    let text = read_file(file)?;
    let prediction: Option<Prediction> = prediction
        .map(|path| -> anyhow::Result<Prediction> {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let prediction: Prediction = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            prediction
                .check()
                .map_err(|error| anyhow!("{}: {error}", path.display()))?;
            Ok(prediction)
        })
        .transpose()?;
    let client = client(api)?;
    let plan: DrillPlan = client
        .call("POST", "/drills/preview", Some(&json!({ "file": text })))
        .await?;
    print_plan(&plan)?;
    if let Some(prediction) = &prediction {
        say(&format!(
            "\nthe rehearsal predicts ({} seeds, seconds from injection, p50 / p99):\n",
            prediction.seeds
        ))?;
        for phase in bearman::core::drill::PHASES {
            if let Some(spread) = prediction.phases.get(phase) {
                say(&format!(
                    "  {phase}: {:.1} / {:.1}",
                    spread.p50_s, spread.p99_s
                ))?;
            }
        }
        for broken in &prediction.broken {
            say(&format!("  the rehearsal already breaks: {broken}\n"))?;
        }
    }
    if !plan.ready {
        bail!("preflight failed: nothing started");
    }
    if !yes {
        confirm(&plan.spec.name)?;
    }
    let started: DrillReport = client
        .call(
            "POST",
            "/drills",
            Some(&json!({
                "file": text,
                "confirm": plan.spec.name,
                "prediction": prediction,
            })),
        )
        .await?;
    eprintln!("drill {} started", started.id);
    if no_wait {
        return print_report(&started, api.output);
    }
    let mut last_line = String::new();
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let shown: Value = client
            .call("GET", &format!("/drills/{}", started.id), None::<&()>)
            .await?;
        let report: DrillReport = serde_json::from_value(shown["report"].clone())
            .context("reading the drill's report")?;
        let line = progress_line(&report);
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if report.finished_at_ms.is_some() {
            print_report(&report, api.output)?;
            if report.outcome != "passed" {
                bail!("drill {} {}", report.id, report.outcome);
            }
            return Ok(());
        }
    }
}

/// The simulator binary: the one named, else `bearman-sim` beside this binary, else PATH.
fn simulator(named: Option<PathBuf>) -> PathBuf {
    if let Some(path) = named {
        return path;
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("bearman-sim")));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("bearman-sim"),
    }
}

struct Rehearsal<'a> {
    file: &'a std::path::Path,
    seeds: &'a str,
    jobs: u32,
    prediction_out: Option<&'a std::path::Path>,
    scenario_out: Option<&'a std::path::Path>,
    sim: PathBuf,
}

async fn rehearse(rehearsal: Rehearsal<'_>, api: &ApiArgs) -> anyhow::Result<()> {
    // Checked here first, so a bad file is named before the daemon or the simulator.
    let text = read_file(rehearsal.file)?;
    DrillSpec::parse(&text).map_err(|error| anyhow!("{}: {error}", rehearsal.file.display()))?;
    let twin: bearman::core::drill::FleetTwin = client(api)?
        .call("GET", "/drills/twin", None::<&()>)
        .await?;
    let twin_path = std::env::temp_dir().join(format!("bearman-twin-{}.json", std::process::id()));
    std::fs::write(&twin_path, serde_json::to_vec_pretty(&twin)?)
        .with_context(|| format!("writing {}", twin_path.display()))?;
    // Removed however the rehearsal ends.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(twin_path.clone());
    let nodes: usize = twin.racks.iter().map(|r| r.nodes.len()).sum();
    eprintln!(
        "rehearsing {} on a twin of {nodes} node(s) in {} rack(s), seeds {}",
        rehearsal.file.display(),
        twin.racks.len(),
        rehearsal.seeds
    );
    let mut command = std::process::Command::new(&rehearsal.sim);
    command
        .arg("rehearse")
        .arg("--twin")
        .arg(&twin_path)
        .arg(rehearsal.file)
        .arg("--seeds")
        .arg(rehearsal.seeds)
        .arg("--jobs")
        .arg(rehearsal.jobs.to_string());
    if let Some(path) = rehearsal.prediction_out {
        command.arg("--json").arg(path);
    }
    if let Some(path) = rehearsal.scenario_out {
        command.arg("--scenario-out").arg(path);
    }
    let sim = rehearsal.sim.clone();
    let status = tokio::task::spawn_blocking(move || command.status())
        .await
        .context("waiting for the simulator")?
        .with_context(|| {
            format!(
                "running {} (install bearman-sim beside bearman, or pass --sim / BEARMAN_SIM)",
                sim.display()
            )
        })?;
    if !status.success() {
        bail!("the rehearsal says the drill breaks its hypothesis or budget ({status})");
    }
    Ok(())
}

pub(super) async fn drill(command: DrillCommand) -> anyhow::Result<()> {
    match command {
        DrillCommand::Check { file } => {
            let text = read_file(&file)?;
            let spec =
                DrillSpec::parse(&text).map_err(|error| anyhow!("{}: {error}", file.display()))?;
            say(&format!("{}: valid\n", file.display()))?;
            print_json(&spec)
        }
        DrillCommand::Preview { file, api } => {
            let text = read_file(&file)?;
            let plan: DrillPlan = client(&api)?
                .call("POST", "/drills/preview", Some(&json!({ "file": text })))
                .await?;
            if api.output == Output::Json {
                return print_json(&plan);
            }
            print_plan(&plan)
        }
        DrillCommand::Run {
            file,
            yes,
            prediction,
            no_wait,
            api,
        } => run_drill(&file, yes, prediction.as_deref(), no_wait, &api).await,
        DrillCommand::Abort { reason, api } => {
            let overview: DrillOverview = client(&api)?
                .call("POST", "/drills/abort", Some(&json!({ "reason": reason })))
                .await?;
            eprintln!(
                "drills blocked{}",
                overview
                    .active
                    .map(|a| format!("; drill {} aborted, the daemon restores what it did", a.id))
                    .unwrap_or_default()
            );
            Ok(())
        }
        DrillCommand::Rehearse {
            file,
            seeds,
            jobs,
            prediction_out,
            scenario_out,
            sim,
            api,
        } => {
            rehearse(
                Rehearsal {
                    file: &file,
                    seeds: &seeds,
                    jobs,
                    prediction_out: prediction_out.as_deref(),
                    scenario_out: scenario_out.as_deref(),
                    sim: simulator(sim),
                },
                &api,
            )
            .await
        }
        DrillCommand::Twin { out, api } => {
            let twin: bearman::core::drill::FleetTwin = client(&api)?
                .call("GET", "/drills/twin", None::<&()>)
                .await?;
            let nodes: usize = twin.racks.iter().map(|r| r.nodes.len()).sum();
            match out {
                Some(path) => {
                    let text = serde_json::to_string_pretty(&twin)?;
                    std::fs::write(&path, text + "\n")
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "twin of {nodes} node(s) in {} rack(s) written to {}{}",
                        twin.racks.len(),
                        path.display(),
                        match &twin.vms {
                            Some(vms) => format!(
                                "; {:.1} VMs per compute node (mean of {} asked)",
                                vms.mean_per_host, vms.answered
                            ),
                            None =>
                                "; no VM counts (no cloud configured, or it did not answer)".into(),
                        }
                    );
                    Ok(())
                }
                None => print_json(&twin),
            }
        }
        DrillCommand::Unblock { api } => {
            let _: DrillOverview = client(&api)?
                .call("POST", "/drills/unblock", None::<&()>)
                .await?;
            eprintln!("drills allowed again");
            Ok(())
        }
        DrillCommand::List { api } => {
            let overview: DrillOverview = client(&api)?.call("GET", "/drills", None::<&()>).await?;
            if api.output == Output::Json {
                return print_json(&overview);
            }
            if let Some(block) = &overview.blocked {
                say(&format!(
                    "drills BLOCKED by {} at {}: {}\n",
                    block.by,
                    table::timestamp(block.at_ms),
                    block.reason
                ))?;
            }
            if let Some(active) = &overview.active {
                say(&format!("running: {}\n", progress_line(active)))?;
            }
            let rows: Vec<Vec<String>> = overview
                .history
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.name.clone(),
                        r.fault.as_str().into(),
                        r.targets.len().to_string(),
                        table::timestamp(r.started_at_ms),
                        r.outcome.clone(),
                    ]
                })
                .collect();
            table::print(
                &["ID", "NAME", "FAULT", "TARGETS", "STARTED", "OUTCOME"],
                &rows,
            )?;
            Ok(())
        }
        DrillCommand::Show { id, api } => {
            let shown: Value = client(&api)?
                .call("GET", &format!("/drills/{id}"), None::<&()>)
                .await?;
            if api.output == Output::Json {
                return print_json(&shown);
            }
            let report: DrillReport = serde_json::from_value(shown["report"].clone())
                .context("reading the drill's report")?;
            print_report(&report, api.output)
        }
    }
}
