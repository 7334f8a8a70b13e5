//! The smoke's chaos drills (issue 14), after its power-kill → fence → rebuild step, on the
//! same daemon and VMs, through the operator's own commands:
//!
//! 1. `bearman drill rehearse` (a twin of this fleet in the simulator, a few seeds), then
//!    `bearman drill run --yes --prediction` of a `kernel_panic` on vm1: a real NMI through
//!    the QMP "BMC" (`inject-nmi`), a real guest panic (stage 2 runs with
//!    `unknown_nmi_panic=1`), silence, fence, rebuild, Ready — and the report with actual
//!    beside predicted. It must pass, touch no other VM, and the panic must be on vm1's
//!    serial console after the injection.
//! 2. A `power_loss` drill on vm1 whose abort condition trips mid-way: vm2 (not a target)
//!    has its power cut just before, timed from the nodes' own heartbeats so that vm2 goes
//!    Suspect first. The drill must abort naming vm2, power vm1 back on (nothing had
//!    remediated it yet), and every VM must come back Ready.

use super::*;

/// The panic line a kernel prints for an NMI it was told to panic on.
const NMI_PANIC: &str = "Kernel panic - not syncing: NMI";
/// Seeds the smoke's rehearsal runs (a real operator would run more).
const REHEARSAL_SEEDS: &str = "1..5";

fn drill_file(name: &str, fault: &str, target: &str, deadline_s: u64, hypothesis: &str) -> String {
    format!(
        r#"# Written by cargo xtask qemu-smoke.
name = "{name}"
fault = "{fault}"
[targets]
uuids = ["{target}"]
[hypothesis]
{hypothesis}
[budget]
nodes_max = 1
[abort]
deadline_s = {deadline_s}
"#
    )
}

/// The bearman CLI against the smoke's daemon.
fn cli(setup: &Setup, api: &Api) -> Command {
    let mut command = daemon_command(&setup.daemon);
    command
        .env("BEARMAN_URL", format!("http://{}", api.addr))
        .env("BEARMAN_TOKEN", &api.token);
    command
}

/// The simulator for the rehearsal: `--sim`, else built here.
fn simulator(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.sim {
        ensure!(path.is_file(), "--sim {}: no such file", path.display());
        return fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()));
    }
    let (workspace, _) = crate::process::workspace_dirs()?;
    progress("building the simulator for the rehearsal: cargo build -p bearman-sim");
    cargo_build(
        &workspace,
        &["-p", "bearman-sim", "--bin", "bearman-sim"],
        &[],
        "bearman-sim",
    )
}

/// Runs a CLI command to its end within `limit`, its stdout into `out` and stderr
/// inherited, while watching that the daemon lives and scanning `watch`'s serial log
/// (from `offset`) for `needle`; returns the exit status and when the needle was seen.
async fn run_watching(
    mut command: Command,
    out: &Path,
    limit: Duration,
    bearman: &mut ChildGuard,
    daemon_log: &Path,
    watch: Option<(&Vm, usize, &str)>,
) -> anyhow::Result<(std::process::ExitStatus, Option<f64>)> {
    let started = Instant::now();
    let stdout = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = ChildGuard::spawn(
        "bearman drill",
        command.stdout(stdout).stdin(std::process::Stdio::null()),
    )?;
    let mut seen = None;
    loop {
        if let Some(status) = child.exit_status()? {
            return Ok((status, seen));
        }
        if let Some(status) = bearman.exit_status()? {
            bail!("bearman exited ({status}); {}", log_tail(daemon_log));
        }
        if let (None, Some((vm, offset, needle))) = (seen, watch) {
            let log = fs::read(&vm.serial_log).unwrap_or_default();
            if find(log.get(offset..).unwrap_or_default(), needle.as_bytes()).is_some() {
                let at = started.elapsed().as_secs_f64();
                progress(format!(
                    "{} {at:>6.1} s  {needle:?} on its serial console",
                    vm.name
                ));
                seen = Some(at);
            }
        }
        ensure!(
            started.elapsed() < limit,
            "the drill did not end within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The newest drill's report, from `bearman drill list -o json`.
async fn last_report(api: &Api) -> anyhow::Result<Value> {
    let overview = api.get("/api/v1/drills").await?;
    overview["history"]
        .get(0)
        .cloned()
        .context("no drill in the history")
}

async fn last_heartbeat(api: &Api, uuid: &str) -> anyhow::Result<i64> {
    let node = api.get(&format!("/api/v1/nodes/{uuid}")).await?;
    node["last_heartbeat_at_ms"]
        .as_i64()
        .with_context(|| format!("node {uuid} has no heartbeat"))
}

/// Waits for `uuid`'s next heartbeat after `after_ms` (polled every 200 ms); returns it.
async fn next_heartbeat(api: &Api, uuid: &str, after_ms: i64) -> anyhow::Result<i64> {
    let deadline = Instant::now() + HEARTBEAT_WAIT;
    loop {
        let heard = last_heartbeat(api, uuid).await?;
        if heard > after_ms {
            return Ok(heard);
        }
        ensure!(
            Instant::now() < deadline,
            "node {uuid}: no heartbeat after {after_ms} within {} s",
            HEARTBEAT_WAIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn phase_line(report: &Value) -> String {
    let Some(phases) = report["targets"][0]["phases"].as_array() else {
        return String::new();
    };
    phases
        .iter()
        .map(|phase| {
            let actual = phase["actual_s"]
                .as_f64()
                .map_or("-".to_string(), |s| format!("{s:.1} s"));
            let predicted = match (
                phase["predicted"]["p50_s"].as_f64(),
                phase["predicted"]["p99_s"].as_f64(),
            ) {
                (Some(p50), Some(p99)) => format!(" (predicted {p50:.1} / {p99:.1})"),
                _ => String::new(),
            };
            format!(
                "{} {actual}{predicted}",
                phase["phase"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) async fn drill_phase(
    args: &Args,
    setup: &Setup,
    api: &Api,
    bearman: &mut ChildGuard,
    vms: &mut [Vm],
    daemon_log: &Path,
) -> anyhow::Result<()> {
    ensure!(vms.len() >= 2, "the drills need at least 2 VMs (--nodes 2)");
    let sim = simulator(args)?;
    let limit = Duration::from_secs(args.phase_timeout_s);
    let target = vms[0].uuid.clone();
    let other = vms[1].uuid.clone();

    // 1. Rehearse, then run a kernel panic on vm1.
    let panic_file = setup.work.join("drill-kernel-panic.toml");
    fs::write(
        &panic_file,
        drill_file(
            "smoke-kernel-panic",
            "kernel_panic",
            &target,
            args.phase_timeout_s,
            &format!("ready_within_s = {}\nfences_max = 1", args.phase_timeout_s),
        ),
    )?;
    let prediction = setup.work.join("drill-prediction.json");
    progress(format!(
        "drill 1: bearman drill rehearse {} --seeds {REHEARSAL_SEEDS} (a twin of this fleet in the simulator)",
        panic_file.display()
    ));
    let rehearsal = cli(setup, api)
        .args(["drill", "rehearse"])
        .arg(&panic_file)
        .args([
            "--seeds",
            REHEARSAL_SEEDS,
            "--jobs",
            "2",
            "--prediction-out",
        ])
        .arg(&prediction)
        .arg("--sim")
        .arg(&sim)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running bearman drill rehearse")?;
    print!("{}", String::from_utf8_lossy(&rehearsal.stdout));
    ensure!(
        rehearsal.status.success(),
        "bearman drill rehearse failed ({}): {}",
        rehearsal.status,
        String::from_utf8_lossy(&rehearsal.stderr)
    );
    let offset = file_len(&vms[0].serial_log);
    let injected_after_ms = now_ms();
    progress(format!(
        "drill 1: bearman drill run --yes --prediction: an NMI to {} through QMP; waiting for its panic, fence, rebuild and Ready",
        vms[0].name
    ));
    let mut run = cli(setup, api);
    run.args(["drill", "run"])
        .arg(&panic_file)
        .args(["--yes", "--prediction"])
        .arg(&prediction);
    let out = setup.work.join("drill-1.out");
    let (status, panic_seen) = run_watching(
        run,
        &out,
        limit,
        bearman,
        daemon_log,
        Some((&vms[0], offset, NMI_PANIC)),
    )
    .await?;
    print!("{}", fs::read_to_string(&out).unwrap_or_default());
    ensure!(
        status.success(),
        "drill 1 did not pass ({status}); its report is above"
    );
    ensure!(
        panic_seen.is_some(),
        "{}: no {NMI_PANIC:?} on its serial console after the injection",
        vms[0].name
    );
    let report = last_report(api).await?;
    ensure!(report["outcome"] == json!("passed"), "drill 1: {report}");
    let phases = report["targets"][0]["phases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        phases.len() == 4 && phases.iter().all(|p| p["actual_s"].as_f64().is_some()),
        "drill 1: every phase has an actual time: {report}"
    );
    for vm in &vms[1..] {
        let touched = api
            .get(&format!("/api/v1/remediations?node={}", vm.uuid))
            .await?;
        let since: Vec<&Value> = touched
            .as_array()
            .map(|list| {
                list.iter()
                    .filter(|r| r["created_at_ms"].as_i64().unwrap_or(0) >= injected_after_ms)
                    .collect()
            })
            .unwrap_or_default();
        ensure!(since.is_empty(), "drill 1 touched {}: {since:?}", vm.name);
    }
    println!(
        "drill 1 (kernel_panic on {}): {}",
        vms[0].name,
        phase_line(&report)
    );

    // 2. A power loss on vm1 that aborts: vm2's power is cut just before, right after its
    // heartbeat, and the drill starts right after a heartbeat of vm1 at least 3 s later,
    // so vm2 is missed (and goes Suspect) first.
    let abort_file = setup.work.join("drill-abort.toml");
    fs::write(
        &abort_file,
        drill_file(
            "smoke-abort",
            "power_loss",
            &target,
            args.phase_timeout_s,
            "",
        ),
    )?;
    let offsets: Vec<usize> = vms.iter().map(|vm| file_len(&vm.serial_log)).collect();
    let heard = last_heartbeat(api, &other).await?;
    let cut_after = next_heartbeat(api, &other, heard).await?;
    let cut = Instant::now();
    progress(format!(
        "drill 2: cutting {}'s power (QMP stop), then a power_loss drill on {} that must abort",
        vms[1].name, vms[0].name
    ));
    qmp_command(&vms[1].qmp, "stop")?;
    next_heartbeat(api, &target, cut_after + 3_000).await?;
    let lead_s = cut.elapsed().as_secs_f64();
    let mut run = cli(setup, api);
    run.args(["drill", "run"]).arg(&abort_file).arg("--yes");
    let out = setup.work.join("drill-2.out");
    let (status, _) = run_watching(run, &out, limit, bearman, daemon_log, None).await?;
    print!("{}", fs::read_to_string(&out).unwrap_or_default());
    ensure!(
        !status.success(),
        "drill 2 should have aborted, yet it exited {status}"
    );
    let report = last_report(api).await?;
    ensure!(report["outcome"] == json!("aborted"), "drill 2: {report}");
    let reason = report["abort"]["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.starts_with("abort.other_node_suspect") && reason.contains(&other),
        "drill 2 aborted for another reason: {reason}"
    );
    ensure!(
        report["targets"][0]["restored"] == json!("powered on"),
        "drill 2: {} was not powered back on: {report}",
        vms[0].name
    );
    println!(
        "drill 2 (power_loss on {}, started {lead_s:.1} s after {}'s power cut): aborted — {reason}; {} powered back on",
        vms[0].name,
        vms[1].name,
        vms[0].name
    );
    // Everyone back: vm1 boots from its restored power, vm2 through its remediation.
    let restarted = Instant::now();
    let mut cycles: Vec<Option<Cycle>> = offsets
        .iter()
        .enumerate()
        .map(|(index, offset)| (index < 2).then(|| Cycle::new(*offset, restarted)))
        .collect();
    watch_until_ready(args, api, bearman, vms, &mut cycles, daemon_log).await?;
    progress(format!(
        "drills done: {} and {} Ready again",
        vms[0].name, vms[1].name
    ));
    Ok(())
}
