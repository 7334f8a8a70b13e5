//! Chaos drills in the simulator: the simulated operator (on the `ops` host) runs each
//! `[[drill]]` of a scenario through the daemon's admin API exactly as `bearman drill run
//! --yes` does — `POST /api/v1/drills/preview`, then `POST /api/v1/drills` confirming the
//! name, then `GET /api/v1/drills/{id}` until the report says it finished — and records
//! what it saw for the verdict and the rehearsal. The daemon injects the fault itself
//! (through the simulated BMC fabric, or by ignoring heartbeats for `silence`); nothing
//! here touches a node.
//!
//! The operator's token is made at setup in the store (an admin token whose secret comes
//! from the seed, so runs replay); the secret never reaches the trace.

use std::time::Duration;

use bearman::app::drill::DrillPlan;
use bearman::core::drill::DrillReport;
use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use crate::fleet::{index_of, lock, SharedWorld, World};
use crate::scenario::SimDrill;

/// The simulated operator's API token (role admin: it also records storage roles).
pub const OPERATOR_TOKEN_NAME: &str = "sim-operator";
/// One admin API exchange is given this long (connect, request, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry period of the start-up role records.
const ROLE_RETRY: Duration = Duration::from_secs(10);

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The operator's secret for a run on `seed`.
pub fn operator_secret(seed: u64) -> String {
    let mut rng = crate::rng::SimRng::derive(seed, 0x6f70_735f_746f_6b00);
    format!("bm_sim{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// One `[[drill]]` as the operator ran it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillRun {
    pub name: String,
    /// The daemon's drill id, once started.
    pub id: Option<i64>,
    /// Virtual time the daemon accepted the start, in ms.
    pub started_at_ms: Option<u64>,
    /// Why it never started: the last preview's failed checks, or the start's refusal.
    pub refused: Option<String>,
    /// The last report the operator read.
    pub report: Option<DrillReport>,
    pub finished: bool,
}

impl DrillRun {
    /// `passed`, `failed`, `aborted`, `refused`; `running` or `not started` when the run
    /// ended first.
    pub fn outcome(&self) -> String {
        if self.refused.is_some() {
            return "refused".into();
        }
        match (&self.report, self.finished) {
            (Some(report), true) => report.outcome.clone(),
            (Some(_), false) => "running".into(),
            (None, _) => "not started".into(),
        }
    }

    /// The abort's reason, or the refusal.
    pub fn abort_reason(&self) -> Option<String> {
        self.refused.clone().or_else(|| {
            self.report
                .as_ref()
                .and_then(|r| r.abort.as_ref())
                .map(|a| a.reason.clone())
        })
    }
}

/// Whether each drill came to what its `[[drill]]` expects; the failures, if not.
pub fn judge(drills: &[SimDrill], runs: &[DrillRun]) -> Vec<String> {
    let mut failures = Vec::new();
    for (index, drill) in drills.iter().enumerate() {
        let Some(run) = runs.get(index) else {
            failures.push(format!("drill[{index}]: the operator never ran it"));
            continue;
        };
        let outcome = run.outcome();
        let expected = drill.expect_outcome.as_str();
        let reason = run.abort_reason().unwrap_or_default();
        if outcome != expected {
            let broken: Vec<String> = run
                .report
                .iter()
                .flat_map(|r| r.hypothesis.iter())
                .filter(|item| !item.passed)
                .map(|item| format!("{} {} (actual {})", item.item, item.expected, item.actual))
                .collect();
            failures.push(format!(
                "drill[{index}] {}: outcome {outcome}, expected {expected}{}{}",
                run.name,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                },
                if broken.is_empty() {
                    String::new()
                } else {
                    format!("; broken: {}", broken.join("; "))
                }
            ));
            continue;
        }
        if let Some(text) = &drill.expect_abort_contains {
            if !reason.contains(text.as_str()) {
                failures.push(format!(
                    "drill[{index}] {}: {outcome} for {reason:?}, which lacks {text:?}",
                    run.name
                ));
            }
        }
    }
    failures
}

/// The simulator's name of a node (`r0n3`), or its uuid when it is not a simulated one.
fn node_name(world: &World, uuid: &NodeUuid) -> String {
    match index_of(uuid).filter(|i| (*i as usize) < world.nodes.len()) {
        Some(index) => world.node_name(index),
        None => uuid.to_string(),
    }
}

fn phase_seconds(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |s| format!("{s:.1}"))
}

/// One line per target: its phases as seconds from injection.
fn target_lines(world: &World, report: &DrillReport) -> Vec<String> {
    report
        .targets
        .iter()
        .map(|target| {
            let phases: Vec<String> = target
                .phases
                .iter()
                .map(|p| format!("{}={}", p.phase, phase_seconds(p.actual_s)))
                .collect();
            format!(
                "{} {}{}{}",
                node_name(world, &target.uuid),
                phases.join(" "),
                target
                    .injection_error
                    .as_ref()
                    .map(|e| format!(" injection_error={e:?}"))
                    .unwrap_or_default(),
                target
                    .restored
                    .as_ref()
                    .map(|r| format!(" restored={r:?}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// What the trace says of the drill's progress: a new line whenever this changes.
fn progress(world: &World, report: &DrillReport) -> String {
    format!(
        "phase={:?} outcome={} {}{}",
        report.phase,
        report.outcome,
        target_lines(world, report).join("; "),
        report
            .abort
            .as_ref()
            .map(|a| format!(" abort={:?}", a.reason))
            .unwrap_or_default()
    )
}

/// The operator's HTTP client to the daemon (each replica in turn when clustered).
#[derive(Clone)]
pub struct Operator {
    pub world: SharedWorld,
    pub secret: String,
    pub daemons: Vec<String>,
    pub port: u16,
}

impl Operator {
    /// One request; `(status, body)`, or why no answer came.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        attempt: usize,
    ) -> Result<(u16, String), String> {
        let body = body.map(|b| b.to_string());
        let auth = format!("Bearer {}", self.secret);
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let mut last = String::from("no daemon");
        for offset in 0..self.daemons.len() {
            let host = &self.daemons[(attempt + offset) % self.daemons.len()];
            let exchange = async {
                let mut stream = turmoil::net::TcpStream::connect((host.as_str(), self.port))
                    .await
                    .map_err(|e| format!("connect {host}: {e}"))?;
                bearman_proto::http::send(
                    &mut stream,
                    method,
                    host,
                    &format!("/api/v1{path}"),
                    &headers,
                    body.as_deref().map(str::as_bytes),
                )
                .await
                .map_err(|e| format!("{method} {path}: {e}"))
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(response)) => return Ok((response.status, response.text())),
                Ok(Err(error)) => last = error,
                Err(_) => last = format!("{method} {path}: no answer in {REQUEST_TIMEOUT:?}"),
            }
        }
        Err(last)
    }

    fn trace(&self, line: String) {
        lock(&self.world).trace.record(now(), line);
    }

    /// Records `role = storage` for the storage nodes, as an operator does once they
    /// are enrolled (the simulated nodes register as compute): retried until each is
    /// known to the daemon.
    pub async fn record_storage_roles(self, nodes: Vec<NodeUuid>) {
        let mut left = nodes;
        let mut attempt = 0;
        let body = serde_json::json!({ "role": "storage" });
        while !left.is_empty() {
            let mut still = Vec::new();
            for uuid in left {
                attempt += 1;
                match self
                    .request("PATCH", &format!("/nodes/{uuid}"), Some(&body), attempt)
                    .await
                {
                    Ok((200, _)) => {}
                    _ => still.push(uuid),
                }
            }
            left = still;
            if !left.is_empty() {
                tokio::time::sleep(ROLE_RETRY).await;
            }
        }
        self.trace("ops: storage roles recorded".into());
    }

    /// Runs drill `index` of the scenario: previews until the preflight passes (or
    /// `start_within_s` runs out), starts it, and polls it until it finishes.
    pub async fn run_drill(self, index: usize, drill: SimDrill) {
        let file = drill.file_text().expect("validated with the scenario");
        let name = drill.name();
        lock(&self.world).drills[index].name = name.clone();
        let at = Duration::from_secs(drill.at_s);
        tokio::time::sleep(at.saturating_sub(now())).await;
        let poll = Duration::from_secs(drill.poll_s);
        let give_up = at + Duration::from_secs(drill.start_within_s);
        let mut attempt = 0;
        let mut last_refusal;
        let report = loop {
            attempt += 1;
            last_refusal = match self
                .request(
                    "POST",
                    "/drills/preview",
                    Some(&serde_json::json!({ "file": file })),
                    attempt,
                )
                .await
            {
                Ok((200, body)) => match serde_json::from_str::<DrillPlan>(&body) {
                    Ok(plan) if plan.ready => {
                        let start = serde_json::json!({ "file": file, "confirm": name });
                        match self.request("POST", "/drills", Some(&start), attempt).await {
                            Ok((201, body)) => match serde_json::from_str::<DrillReport>(&body) {
                                Ok(report) => break report,
                                Err(error) => format!("start: unreadable report: {error}"),
                            },
                            Ok((status, body)) => format!("start: {status} {body}"),
                            Err(error) => error,
                        }
                    }
                    Ok(plan) => {
                        let failed: Vec<String> = plan
                            .preflight
                            .iter()
                            .filter(|c| !c.passed)
                            .map(|c| format!("{}: {}", c.check, c.detail))
                            .collect();
                        format!("preflight: {}", failed.join("; "))
                    }
                    Err(error) => format!("preview: unreadable plan: {error}"),
                },
                Ok((status, body)) => format!("preview: {status} {body}"),
                Err(error) => error,
            };
            if now() + poll > give_up {
                self.trace(format!(
                    "drill {name} refused after {attempt} preview(s): {last_refusal}"
                ));
                lock(&self.world).drills[index].refused = Some(last_refusal);
                return;
            }
            tokio::time::sleep(poll).await;
        };
        let id = report.id;
        {
            let mut world = lock(&self.world);
            let targets: Vec<String> = report
                .targets
                .iter()
                .map(|t| {
                    format!(
                        "{}({})",
                        node_name(&world, &t.uuid),
                        t.rack.as_deref().unwrap_or("-")
                    )
                })
                .collect();
            let line = format!(
                "drill {name} id={id} started after {attempt} preview(s): {} on [{}]",
                report.fault.as_str(),
                targets.join(", ")
            );
            world.trace.record(now(), line);
            let run = &mut world.drills[index];
            run.id = Some(id);
            run.started_at_ms = Some(now().as_millis() as u64);
            run.report = Some(report);
        }
        let mut last_progress = String::new();
        loop {
            tokio::time::sleep(poll).await;
            attempt += 1;
            let Ok((200, body)) = self
                .request("GET", &format!("/drills/{id}"), None, attempt)
                .await
            else {
                continue;
            };
            #[derive(Deserialize)]
            struct Show {
                report: DrillReport,
            }
            let Ok(Show { report }) = serde_json::from_str::<Show>(&body) else {
                continue;
            };
            let mut world = lock(&self.world);
            let line = progress(&world, &report);
            if line != last_progress {
                world
                    .trace
                    .record(now(), format!("drill {name} id={id} {line}"));
                last_progress = line;
            }
            let finished = report.finished_at_ms.is_some();
            if finished {
                let mut lines = vec![format!(
                    "drill {name} id={id} finished: {}{}",
                    report.outcome,
                    report
                        .abort
                        .as_ref()
                        .map(|a| format!(" (aborted by {}: {})", a.by, a.reason))
                        .unwrap_or_default()
                )];
                for target in target_lines(&world, &report) {
                    lines.push(format!("drill {name} id={id} target {target}"));
                }
                for item in &report.hypothesis {
                    lines.push(format!(
                        "drill {name} id={id} hypothesis {} {} expected {} actual {}",
                        item.item,
                        if item.passed { "passed" } else { "FAILED" },
                        item.expected,
                        item.actual
                    ));
                }
                for line in lines {
                    world.trace.record(now(), line);
                }
            }
            let run = &mut world.drills[index];
            run.report = Some(report);
            run.finished = finished;
            if finished {
                return;
            }
        }
    }
}

/// A drill's phase times as the report gives them, per target (seconds from injection).
pub fn phase_times(report: &DrillReport) -> Vec<Vec<(String, Option<f64>)>> {
    report
        .targets
        .iter()
        .map(|t| {
            t.phases
                .iter()
                .map(|p| (p.phase.clone(), p.actual_s))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drill(expect: &str, contains: Option<&str>) -> SimDrill {
        let text = format!(
            "at_s = 300\nexpect_outcome = \"{expect}\"\n{}spec = \"\"\"\nname = \"d\"\nfault = \"power_loss\"\n[targets]\ncount = 1\n[budget]\nnodes_max = 1\n\"\"\"\n",
            contains
                .map(|c| format!("expect_abort_contains = \"{c}\"\n"))
                .unwrap_or_default()
        );
        toml::from_str(&text).unwrap()
    }

    fn run(outcome: &str, reason: Option<&str>, finished: bool) -> DrillRun {
        use bearman::core::drill::{Abort, DrillPhase, FaultKind};
        let report = DrillReport {
            id: 1,
            name: "d".into(),
            fault: FaultKind::PowerLoss,
            outcome: outcome.to_string(),
            phase: if finished {
                DrillPhase::Finished
            } else {
                DrillPhase::Watching
            },
            started_by: "token:sim-operator".into(),
            started_at_ms: 0,
            finished_at_ms: finished.then_some(20),
            abort: reason.map(|reason| Abort {
                at_ms: 10,
                by: "drill".into(),
                reason: reason.into(),
            }),
            targets: Vec::new(),
            hypothesis: Vec::new(),
            unexpected: Vec::new(),
            divergences: Vec::new(),
            prediction_seeds: None,
        };
        DrillRun {
            name: "d".into(),
            id: Some(1),
            started_at_ms: Some(0),
            refused: None,
            report: Some(report),
            finished,
        }
    }

    #[test]
    fn the_verdict_fails_a_drill_whose_outcome_or_abort_reason_differs() {
        let passed = [drill("passed", None)];
        assert!(judge(&passed, &[run("passed", None, true)]).is_empty());
        let failures = judge(&passed, &[run("failed", None, true)]);
        assert!(
            failures[0].contains("outcome failed, expected passed"),
            "{failures:?}"
        );
        let failures = judge(&passed, &[run("running", None, false)]);
        assert!(failures[0].contains("outcome running"), "{failures:?}");
        assert!(judge(&passed, &[]).len() == 1, "never ran");
        let aborted = [drill("aborted", Some("other_node_suspect"))];
        let reason = "abort.other_node_suspect: node x went suspect";
        assert!(judge(&aborted, &[run("aborted", Some(reason), true)]).is_empty());
        let failures = judge(&aborted, &[run("aborted", Some("abort.deadline_s"), true)]);
        assert!(
            failures[0].contains("lacks \"other_node_suspect\""),
            "{failures:?}"
        );
        let refused = DrillRun {
            refused: Some("preflight: budget".into()),
            ..DrillRun::default()
        };
        let failures = judge(&passed, &[refused]);
        assert!(failures[0].contains("outcome refused"), "{failures:?}");
    }
}
