//! Rendering a run's report for people: states over virtual time, invariant verdicts,
//! counters, and the trace hash.

use std::fmt::Write;
use std::time::Duration;

use bearman::core::lifecycle::LifecycleState;

use crate::run::Report;

pub fn render(report: &Report, wall: Duration) -> String {
    let mut out = String::new();
    let virtual_s = report.virtual_time.as_secs_f64();
    let _ = writeln!(
        out,
        "scenario {} seed {}: {} nodes in {} racks, {:.0} s virtual",
        report.scenario, report.seed, report.nodes, report.racks, virtual_s
    );
    let states: Vec<LifecycleState> = LifecycleState::ALL
        .into_iter()
        .filter(|state| {
            report
                .samples
                .iter()
                .any(|s| s.counts.get(state).copied().unwrap_or(0) > 0)
        })
        .collect();
    let _ = write!(
        out,
        "\nnodes per state (daemon's view) over virtual time\n{:>8}",
        "t(s)"
    );
    for state in &states {
        let _ = write!(out, " {:>12}", state.as_str());
    }
    let _ = writeln!(out, " {:>9} {:>8}", "running", "vms_down");
    let mut last_line = String::new();
    for sample in &report.samples {
        let mut line = String::new();
        for state in &states {
            let _ = write!(
                line,
                " {:>12}",
                sample.counts.get(state).copied().unwrap_or(0)
            );
        }
        let _ = write!(
            line,
            " {:>9} {:>8}",
            sample.machines_running, sample.vms_down
        );
        // Consecutive identical rows say nothing new.
        if line != last_line {
            let _ = writeln!(out, "{:>8}{line}", sample.at.as_secs());
            last_line = line;
        }
    }
    if !report.recoveries.is_empty() || report.fences > 0 {
        let secs = |d: Option<Duration>| {
            d.map_or("never".to_string(), |d| format!("{:.1}", d.as_secs_f64()))
        };
        let _ = writeln!(
            out,
            "\nrecovery (seconds after the crash; fences started: {})\n{:>10} {:>9} {:>9} {:>9} {:>13} {:>9}",
            report.fences, "node", "crash_at", "detected", "fenced", "vms_elsewhere", "ready"
        );
        for r in &report.recoveries {
            let _ = writeln!(
                out,
                "{:>10} {:>9.1} {:>9} {:>9} {:>13} {:>9}",
                r.node,
                r.crashed_at.as_secs_f64(),
                secs(r.detected_after),
                secs(r.fenced_after),
                secs(r.vms_elsewhere_after),
                if r.interrupted() {
                    "re-crash".to_string()
                } else {
                    secs(r.ready_after)
                }
            );
        }
        if report.recoveries.iter().any(|r| r.interrupted()) {
            let _ = writeln!(
                out,
                "  re-crash: the node crashed again before it was Ready; see its next row"
            );
        }
        if let Some(heal) = report.last_heal {
            for r in &report.recoveries {
                let line = match r.vms_elsewhere_after.map(|after| r.crashed_at + after) {
                    None => "VMs never ran elsewhere after the last heal".to_string(),
                    Some(at) if at >= heal => format!(
                        "VMs elsewhere {:.1} s after the last heal",
                        (at - heal).as_secs_f64()
                    ),
                    Some(at) => format!(
                        "VMs elsewhere {:.1} s before the last heal",
                        (heal - at).as_secs_f64()
                    ),
                };
                let _ = writeln!(out, "  {}: {line} (t={})", r.node, heal.as_secs());
            }
        }
        let collect = |f: fn(&crate::recovery::Recovery) -> Option<Duration>| -> Vec<Duration> {
            report.recoveries.iter().filter_map(f).collect()
        };
        for (label, values) in [
            ("detect", collect(|r| r.detected_after)),
            ("vms elsewhere", collect(|r| r.vms_elsewhere_after)),
            ("ready again", collect(|r| r.ready_after)),
        ] {
            if !values.is_empty() {
                let _ = writeln!(
                    out,
                    "  {label:<14} p50 {} s, p99 {} s over {} node(s)",
                    secs(crate::recovery::percentile(&values, 50)),
                    secs(crate::recovery::percentile(&values, 99)),
                    values.len()
                );
            }
        }
    }
    if report.lease_terms > 0 {
        let takeovers: Vec<String> = report
            .takeovers
            .iter()
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .collect();
        let _ = writeln!(
            out,
            "\ncluster: {} lease term(s); new term after each leader fault: {}",
            report.lease_terms,
            if takeovers.is_empty() {
                "-".to_string()
            } else {
                takeovers.join(", ")
            }
        );
    }
    if let Some(firmware) = &report.firmware {
        let _ = writeln!(
            out,
            "\nfirmware: {} node(s) recorded flashed; updater runs {} ok, {} failed, {} cut short; \
             at most {} flashing at once ({} in one rack); {} board(s) still behind",
            firmware.flashed_recorded,
            firmware.flashes_ok,
            firmware.flashes_failed,
            firmware.flashes_interrupted,
            firmware.most_flashing,
            firmware.most_flashing_in_rack,
            firmware.behind_at_end
        );
        match (&firmware.paused_at, &firmware.pause_reason) {
            (Some(at), Some(reason)) => {
                let _ = writeln!(
                    out,
                    "  rollout paused at t={:.0} s: {reason}",
                    at.as_secs_f64()
                );
            }
            _ => {
                let _ = writeln!(out, "  rollout running at the end");
            }
        }
    }
    for run in &report.drills {
        let _ = writeln!(
            out,
            "\ndrill {}: {}{}",
            run.name,
            run.outcome(),
            run.abort_reason()
                .map(|reason| format!(" ({reason})"))
                .unwrap_or_default()
        );
        if let Some(drill_report) = &run.report {
            for target in &drill_report.targets {
                let phases: Vec<String> = target
                    .phases
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {}",
                            p.phase,
                            p.actual_s.map_or("-".to_string(), |s| format!("{s:.1} s"))
                        )
                    })
                    .collect();
                let _ = writeln!(out, "  {}: {}", target.hostname, phases.join(", "));
            }
            for item in &drill_report.hypothesis {
                let _ = writeln!(
                    out,
                    "  {:<24} {:<6} expected {}, actual {}",
                    item.item,
                    if item.passed { "ok" } else { "BROKEN" },
                    item.expected,
                    item.actual
                );
            }
        }
    }
    let _ = writeln!(out, "\ninvariants");
    for verdict in report.checker.verdicts() {
        let _ = writeln!(
            out,
            "  {:<9} {:<52} {} ({} checks)",
            verdict.kind,
            verdict.name,
            if verdict.passed() { "ok" } else { "FAILED" },
            verdict.checks
        );
        for failure in &verdict.failures {
            let _ = writeln!(out, "            {failure}");
        }
    }
    let ratio = if wall.as_secs_f64() > 0.0 {
        virtual_s / wall.as_secs_f64()
    } else {
        f64::INFINITY
    };
    let _ = writeln!(
        out,
        "\ndaemon events {}, heartbeats {} ({} failed), agent request failures {}, turmoil steps {}",
        report.daemon_events, report.heartbeats_sent, report.heartbeats_failed, report.requests_failed, report.steps
    );
    let host_ticks = report.host_ticks_run + report.host_ticks_skipped;
    let _ = writeln!(
        out,
        "host ticks {host_ticks}: {} run, {} skipped as idle ({:.1} %)",
        report.host_ticks_run,
        report.host_ticks_skipped,
        100.0 * report.host_ticks_skipped as f64 / host_ticks.max(1) as f64
    );
    let _ = writeln!(
        out,
        "virtual {:.0} s, wall {:.1} s, ratio {:.1}x real time",
        virtual_s,
        wall.as_secs_f64(),
        ratio
    );
    let _ = writeln!(
        out,
        "trace hash {} ({} lines)",
        report.trace.hash(),
        report.trace.len()
    );
    out
}
