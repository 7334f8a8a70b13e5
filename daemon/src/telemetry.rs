//! The daemon's Prometheus metrics: one [`Metrics`] per daemon, recorded where things
//! happen (HTTP service, BMC guard, application layer) and rendered in the OpenMetrics
//! text format by `GET /metrics`.
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client, speaks
//! OpenMetrics, and keeps each registry a plain value — several daemons in one process
//! (the simulator's replicas, parallel tests) each own theirs. The older `prometheus`
//! crate keeps a global default registry and is described by its users as unmaintained.
//!
//! Label cardinality is bounded by construction: no series carries a node uuid,
//! hostname or address. The labels that vary are lifecycle states, roles, rack names
//! (bounded by the fleet's racks), route templates (bounded by the route table), HTTP
//! status codes, BMC drivers and operations, remediation kinds, steps and outcomes.
//!
//! Architecture invariant: recording never fails and never blocks on I/O; it changes
//! nothing the daemon decides, so the simulator's runs are the same with or without a
//! scrape. This module names no other module of the daemon.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScriptLabels {
    script: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BmcCallLabels {
    driver: &'static str,
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BmcOperationLabels {
    driver: &'static str,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleOutcomeLabels {
    bundle: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindOutcomeLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    state: &'static str,
    rack: String,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadingLabels {
    reading: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RackLabels {
    rack: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// HTTP latency: 0.5 ms .. ~16 s.
fn http_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// BMC call latency: 50 ms .. ~205 s (a call is bounded by the guard's call timeout).
fn bmc_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.05, 2.0, 13,
    ))
}

/// Remediation phases: 1 s .. ~4.5 h.
fn phase_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 15,
    ))
}

/// What a scrape reads of the fleet at that moment (gauges, recomputed every scrape).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetSnapshot {
    /// Nodes by (state, rack or "", role).
    pub nodes: Vec<((&'static str, String, &'static str), u64)>,
    /// Remediations in progress by kind.
    pub remediations_active: Vec<(&'static str, u64)>,
    /// Age of the oldest remediation in progress, in seconds (0 when none).
    pub oldest_active_remediation_s: u64,
    /// What the controller last published; `None` when this replica runs no controller
    /// (a standby) or before its first tick.
    pub guards: Option<GuardSnapshot>,
    /// The controller task runs in this process.
    pub controller_up: bool,
    /// This replica acts for the fleet (alone, or holding the lease).
    pub leader: bool,
    /// The firmware rollout: nodes flashing now, whether it is paused, and each bundle's
    /// (started, succeeded, failed) attempts.
    pub firmware_flashing: u64,
    pub firmware_paused: bool,
    pub firmware_tallies: Vec<(String, [u64; 3])>,
    /// A chaos drill runs now; the drill kill switch is set.
    pub drill_running: bool,
    pub drills_blocked: bool,
}

/// The controller's guard board, as gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuardSnapshot {
    pub automatic: bool,
    pub fleet_fencing_stopped: bool,
    pub racks_paused: Vec<String>,
    pub monitored: u64,
    pub silent: u64,
    /// Monitored nodes by last BMC power reading (`on`, `off`, `unknown`, `none`).
    pub power_readings: Vec<(String, u64)>,
    pub fences_unverified: u64,
    pub boots_stalled: u64,
}

/// Every metric one daemon exports.
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    scripts_served: Family<ScriptLabels, Counter>,
    registrations: Family<OutcomeLabels, Counter>,
    installed: Counter,
    heartbeats: Counter,
    bmc_calls: Family<BmcCallLabels, Counter>,
    bmc_duration: HistogramFamily<BmcOperationLabels>,
    remediations_started: Family<KindLabels, Counter>,
    remediations_finished: Family<KindOutcomeLabels, Counter>,
    phase_duration: HistogramFamily<PhaseLabels>,
    store_errors: Family<ErrorKindLabels, Counter>,
    nodes: Family<NodeLabels, Gauge>,
    remediations_active: Family<KindLabels, Gauge>,
    oldest_active: Gauge,
    power_readings: Family<ReadingLabels, Gauge>,
    rack_paused: Family<RackLabels, Gauge>,
    fleet_fencing_stopped: Gauge,
    automatic: Gauge,
    monitored: Gauge,
    silent: Gauge,
    fences_unverified: Gauge,
    boots_stalled: Gauge,
    controller_up: Gauge,
    leader: Gauge,
    firmware_flashing: Gauge,
    firmware_paused: Gauge,
    drill_running: Gauge,
    drills_blocked: Gauge,
    firmware_updates: Family<BundleOutcomeLabels, Gauge>,
    /// The series of [`HOT_ANSWERS`], held once first used.
    hot: [std::sync::OnceLock<HotSeries>; HOT_ANSWERS.len()],
    /// One scrape at a time: a scrape clears and refills the fleet gauges.
    scrape: tokio::sync::Mutex<()>,
}

/// The answers a fleet asks for most — a node's target script in a boot storm, and
/// every node's heartbeat — as (route, method, status). Their series are found in the
/// families once and then held: each such answer costs a few atomic adds instead of three
/// label-set lookups (a hash and a lock each, about 1,100 instructions a request). The
/// series still appear only once first used, as the families' do.
const HOT_ANSWERS: [(&str, &str, u16); 2] = [
    ("/ipxe/{uuid}", "GET", 200),
    ("/ipxe/{uuid}/heartbeat", "POST", 200),
];

/// Handles onto one hot answer's series (they share their values with the families).
struct HotSeries {
    requests: Counter,
    duration: Histogram,
    script: Option<Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bearman");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            http_requests.clone(),
        );
        let http_duration = HistogramFamily::<RouteLabels>::new_with_constructor(
            http_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response, by route template",
            http_duration.clone(),
        );
        let scripts_served = Family::<ScriptLabels, Counter>::default();
        registry.register(
            "boot_scripts_served",
            "iPXE scripts served: stage1 (GET /ipxe) and target (GET /ipxe/{uuid})",
            scripts_served.clone(),
        );
        let registrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "registrations",
            "Hardware registrations from stage 1, by outcome",
            registrations.clone(),
        );
        let installed = Counter::default();
        registry.register(
            "installed_reports",
            "Installed reports accepted (a node reached its target OS)",
            installed.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Heartbeats accepted from nodes",
            heartbeats.clone(),
        );
        let bmc_calls = Family::<BmcCallLabels, Counter>::default();
        registry.register(
            "bmc_calls",
            "BMC calls through the guard, by driver, operation and outcome (ok, error, timeout, not_started, not_sent)",
            bmc_calls.clone(),
        );
        let bmc_duration = HistogramFamily::<BmcOperationLabels>::new_with_constructor(
            bmc_histogram as fn() -> Histogram,
        );
        registry.register(
            "bmc_call_duration_seconds",
            "Time a BMC call took once it had its turn, by driver and operation",
            bmc_duration.clone(),
        );
        let remediations_started = Family::<KindLabels, Counter>::default();
        registry.register(
            "remediations_started",
            "Remediations started, by kind",
            remediations_started.clone(),
        );
        let remediations_finished = Family::<KindOutcomeLabels, Counter>::default();
        registry.register(
            "remediations_finished",
            "Remediations finished, by kind and outcome (done, failed, cancelled)",
            remediations_finished.clone(),
        );
        let phase_duration = HistogramFamily::<PhaseLabels>::new_with_constructor(
            phase_histogram as fn() -> Histogram,
        );
        registry.register(
            "remediation_phase_duration_seconds",
            "Remediation phases: detect (node last heard to automatic remediation started), fence (start to verified off), evacuate (verified off to VMs elsewhere), recover (to Ready), total",
            phase_duration.clone(),
        );
        let store_errors = Family::<ErrorKindLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Database errors seen by requests and the controller, by kind",
            store_errors.clone(),
        );
        let nodes = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "nodes",
            "Nodes by lifecycle state, rack (empty when unknown) and role",
            nodes.clone(),
        );
        let remediations_active = Family::<KindLabels, Gauge>::default();
        registry.register(
            "remediations_active",
            "Remediations in progress, by kind",
            remediations_active.clone(),
        );
        let oldest_active = Gauge::default();
        registry.register(
            "remediation_oldest_active_age_seconds",
            "Age of the oldest remediation in progress (0 when none): a rebuild or evacuation that does not finish",
            oldest_active.clone(),
        );
        let power_readings = Family::<ReadingLabels, Gauge>::default();
        registry.register(
            "node_power_readings",
            "Nodes the controller watches (Ready, Suspect) by their last BMC power reading; leader only",
            power_readings.clone(),
        );
        let rack_paused = Family::<RackLabels, Gauge>::default();
        registry.register(
            "guard_rack_paused",
            "1 for each rack whose automatic fencing the rack guard paused; leader only",
            rack_paused.clone(),
        );
        let fleet_fencing_stopped = Gauge::default();
        registry.register(
            "guard_fleet_fencing_stopped",
            "1 when the fleet guard stopped every automatic fence; leader only",
            fleet_fencing_stopped.clone(),
        );
        let automatic = Gauge::default();
        registry.register(
            "remediation_automatic",
            "1 when automatic remediation is enabled; leader only",
            automatic.clone(),
        );
        let monitored = Gauge::default();
        registry.register(
            "nodes_monitored",
            "Nodes the health judgement watches; leader only",
            monitored.clone(),
        );
        let silent = Gauge::default();
        registry.register(
            "nodes_silent",
            "Watched nodes past their heartbeat grace; leader only",
            silent.clone(),
        );
        let fences_unverified = Gauge::default();
        registry.register(
            "fences_unverified",
            "Automatic fences not verified yet and being retried; leader only",
            fences_unverified.clone(),
        );
        let boots_stalled = Gauge::default();
        registry.register(
            "boots_stalled",
            "Nodes whose boot stalled and are not being power-cycled; leader only",
            boots_stalled.clone(),
        );
        let controller_up = Gauge::default();
        registry.register(
            "controller_up",
            "1 when this daemon's controller task runs (a standby replica's too)",
            controller_up.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "controller_leader",
            "1 when this daemon acts for the fleet: alone, or holding the controller lease",
            leader.clone(),
        );
        let firmware_flashing = Gauge::default();
        registry.register(
            "firmware_updates_in_flight",
            "Nodes holding a firmware rollout slot (flashing or restarting onto new firmware)",
            firmware_flashing.clone(),
        );
        let firmware_paused = Gauge::default();
        registry.register(
            "firmware_rollout_paused",
            "1 while the firmware rollout is paused (by an operator, or by itself)",
            firmware_paused.clone(),
        );
        let drill_running = Gauge::default();
        registry.register(
            "drill_running",
            "1 while a chaos drill runs (injecting, watching or restoring)",
            drill_running.clone(),
        );
        let drills_blocked = Gauge::default();
        registry.register(
            "drills_blocked",
            "1 while the drill kill switch blocks new drills (`bearman drill unblock` clears it)",
            drills_blocked.clone(),
        );
        let firmware_updates = Family::<BundleOutcomeLabels, Gauge>::default();
        registry.register(
            "firmware_updates",
            "Firmware update attempts per bundle since it was added: started, succeeded, failed",
            firmware_updates.clone(),
        );
        let build = Family::<VersionLabels, Gauge>::default();
        registry.register("build_info", "The daemon's version", build.clone());
        build
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        Metrics {
            registry,
            http_requests,
            http_duration,
            scripts_served,
            registrations,
            installed,
            heartbeats,
            bmc_calls,
            bmc_duration,
            remediations_started,
            remediations_finished,
            phase_duration,
            store_errors,
            nodes,
            remediations_active,
            oldest_active,
            power_readings,
            rack_paused,
            fleet_fencing_stopped,
            automatic,
            monitored,
            silent,
            fences_unverified,
            boots_stalled,
            controller_up,
            leader,
            firmware_flashing,
            firmware_paused,
            drill_running,
            drills_blocked,
            firmware_updates,
            hot: Default::default(),
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// One HTTP request answered. `route` is a template from a fixed set
    /// (the boot routes and the API's route table), never the raw path.
    pub fn http_request(
        &self,
        route: &'static str,
        method: &'static str,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        if let Some(slot) = HOT_ANSWERS
            .iter()
            .position(|hot| *hot == (route, method, status))
        {
            let hot = self.hot[slot].get_or_init(|| HotSeries {
                requests: self
                    .http_requests
                    .get_or_create(&HttpLabels {
                        route,
                        method,
                        status,
                    })
                    .clone(),
                duration: self
                    .http_duration
                    .get_or_create(&RouteLabels { route })
                    .clone(),
                script: (route == "/ipxe/{uuid}").then(|| {
                    self.scripts_served
                        .get_or_create(&ScriptLabels { script: "target" })
                        .clone()
                }),
            });
            hot.requests.inc();
            hot.duration.observe(elapsed.as_secs_f64());
            if let Some(script) = &hot.script {
                script.inc();
            }
            return;
        }
        self.http_requests
            .get_or_create(&HttpLabels {
                route,
                method,
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
        if status == 200 && method == "GET" {
            match route {
                "/ipxe" => self.script_served("stage1"),
                "/ipxe/{uuid}" => self.script_served("target"),
                _ => {}
            }
        }
    }

    fn script_served(&self, script: &'static str) {
        self.scripts_served
            .get_or_create(&ScriptLabels { script })
            .inc();
    }

    /// A registration's outcome: `registered`, `awaiting_acceptance` or `refused`.
    pub fn registration(&self, outcome: &'static str) {
        self.registrations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn installed(&self) {
        self.installed.inc();
    }

    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// One BMC call through the guard. `elapsed` is `None` for a call that was never
    /// sent (its turn did not come, or leadership was lost while it waited).
    pub fn bmc_call(
        &self,
        driver: &'static str,
        operation: &'static str,
        outcome: &'static str,
        elapsed: Option<std::time::Duration>,
    ) {
        self.bmc_calls
            .get_or_create(&BmcCallLabels {
                driver,
                operation,
                outcome,
            })
            .inc();
        if let Some(elapsed) = elapsed {
            self.bmc_duration
                .get_or_create(&BmcOperationLabels { driver, operation })
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn remediation_started(&self, kind: &'static str) {
        self.remediations_started
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// A remediation reached a final status; `phases` are the durations (seconds) of
    /// the phases it went through (`core::remediation::Remediation::phase_durations_ms`).
    pub fn remediation_finished(
        &self,
        kind: &'static str,
        outcome: &'static str,
        phases: &[(&'static str, f64)],
    ) {
        self.remediations_finished
            .get_or_create(&KindOutcomeLabels { kind, outcome })
            .inc();
        for (phase, seconds) in phases {
            self.phase_duration
                .get_or_create(&PhaseLabels { phase })
                .observe(seconds.max(0.0));
        }
    }

    /// One phase's duration observed on its own (the detection phase, when an automatic
    /// remediation starts).
    pub fn phase_observed(&self, phase: &'static str, seconds: f64) {
        self.phase_duration
            .get_or_create(&PhaseLabels { phase })
            .observe(seconds.max(0.0));
    }

    /// A database error reached a caller (`unavailable`, `backend`, `corrupt`, …).
    pub fn store_error(&self, kind: &'static str) {
        self.store_errors
            .get_or_create(&ErrorKindLabels { kind })
            .inc();
    }

    /// Sets the fleet gauges from `snapshot` and renders every metric.
    pub async fn render(&self, snapshot: &FleetSnapshot) -> String {
        let _one_at_a_time = self.scrape.lock().await;
        self.nodes.clear();
        for ((state, rack, role), count) in &snapshot.nodes {
            self.nodes
                .get_or_create(&NodeLabels {
                    state,
                    rack: rack.clone(),
                    role,
                })
                .set(gauge_value(*count));
        }
        self.remediations_active.clear();
        for (kind, count) in &snapshot.remediations_active {
            self.remediations_active
                .get_or_create(&KindLabels { kind })
                .set(gauge_value(*count));
        }
        self.oldest_active
            .set(gauge_value(snapshot.oldest_active_remediation_s));
        self.power_readings.clear();
        self.rack_paused.clear();
        let guards = snapshot.guards.clone().unwrap_or_default();
        for (reading, count) in &guards.power_readings {
            self.power_readings
                .get_or_create(&ReadingLabels {
                    reading: reading.clone(),
                })
                .set(gauge_value(*count));
        }
        for rack in &guards.racks_paused {
            self.rack_paused
                .get_or_create(&RackLabels { rack: rack.clone() })
                .set(1);
        }
        self.fleet_fencing_stopped
            .set(i64::from(guards.fleet_fencing_stopped));
        self.automatic.set(i64::from(guards.automatic));
        self.monitored.set(gauge_value(guards.monitored));
        self.silent.set(gauge_value(guards.silent));
        self.fences_unverified
            .set(gauge_value(guards.fences_unverified));
        self.boots_stalled.set(gauge_value(guards.boots_stalled));
        self.controller_up.set(i64::from(snapshot.controller_up));
        self.leader.set(i64::from(snapshot.leader));
        self.firmware_flashing
            .set(gauge_value(snapshot.firmware_flashing));
        self.firmware_paused
            .set(i64::from(snapshot.firmware_paused));
        self.drill_running.set(i64::from(snapshot.drill_running));
        self.drills_blocked.set(i64::from(snapshot.drills_blocked));
        self.firmware_updates.clear();
        for (bundle, counts) in &snapshot.firmware_tallies {
            for (outcome, count) in ["started", "succeeded", "failed"].into_iter().zip(counts) {
                self.firmware_updates
                    .get_or_create(&BundleOutcomeLabels {
                        bundle: bundle.clone(),
                        outcome,
                    })
                    .set(gauge_value(*count));
            }
        }
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn gauge_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A shared handle, as the HTTP service, the BMC guard and the application hold it.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn render_names_every_family_and_sets_fleet_gauges() {
        let metrics = Metrics::new();
        metrics.http_request(
            "/ipxe/{uuid}",
            "GET",
            200,
            std::time::Duration::from_millis(2),
        );
        metrics.bmc_call(
            "ipmi",
            "power_state",
            "ok",
            Some(std::time::Duration::from_millis(120)),
        );
        metrics.remediation_finished("automatic", "done", &[("fence", 12.0)]);
        let snapshot = FleetSnapshot {
            nodes: vec![(("ready", "r1".into(), "compute"), 3)],
            guards: Some(GuardSnapshot {
                racks_paused: vec!["r7".into()],
                ..GuardSnapshot::default()
            }),
            controller_up: true,
            leader: true,
            firmware_flashing: 2,
            firmware_paused: true,
            firmware_tallies: vec![("bios-2".into(), [5, 2, 1])],
            drill_running: true,
            ..FleetSnapshot::default()
        };
        let text = metrics.render(&snapshot).await;
        for line in [
            "bearman_nodes{state=\"ready\",rack=\"r1\",role=\"compute\"} 3",
            "bearman_guard_rack_paused{rack=\"r7\"} 1",
            "bearman_boot_scripts_served_total{script=\"target\"} 1",
            "bearman_http_requests_total{route=\"/ipxe/{uuid}\",method=\"GET\",status=\"200\"} 1",
            "bearman_bmc_calls_total{driver=\"ipmi\",operation=\"power_state\",outcome=\"ok\"} 1",
            "bearman_remediations_finished_total{kind=\"automatic\",outcome=\"done\"} 1",
            "bearman_controller_up 1",
            "bearman_controller_leader 1",
            "bearman_firmware_updates_in_flight 2",
            "bearman_firmware_rollout_paused 1",
            "bearman_firmware_updates{bundle=\"bios-2\",outcome=\"failed\"} 1",
            "bearman_drill_running 1",
            "bearman_drills_blocked 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // A later scrape forgets what is gone (a rack unpaused, nodes moved on).
        let text = metrics.render(&FleetSnapshot::default()).await;
        assert!(!text.contains("bearman_guard_rack_paused{"), "{text}");
        assert!(!text.contains("bearman_nodes{"), "{text}");
        assert!(text.contains("bearman_controller_up 0"), "{text}");
    }

    #[tokio::test]
    async fn hot_answers_count_into_the_same_series_as_the_rest() {
        let metrics = Metrics::new();
        let before = metrics.render(&FleetSnapshot::default()).await;
        // Not there before first use, as any family's series.
        assert!(
            !before.contains("route=\"/ipxe/{uuid}/heartbeat\""),
            "{before}"
        );
        let ms = std::time::Duration::from_millis(3);
        for _ in 0..3 {
            metrics.http_request("/ipxe/{uuid}", "GET", 200, ms);
            metrics.http_request("/ipxe/{uuid}/heartbeat", "POST", 200, ms);
        }
        // The same routes with another status or method go the general way.
        metrics.http_request("/ipxe/{uuid}", "GET", 404, ms);
        metrics.http_request("/ipxe/{uuid}/heartbeat", "POST", 503, ms);
        let text = metrics.render(&FleetSnapshot::default()).await;
        for line in [
            "bearman_http_requests_total{route=\"/ipxe/{uuid}\",method=\"GET\",status=\"200\"} 3",
            "bearman_http_requests_total{route=\"/ipxe/{uuid}\",method=\"GET\",status=\"404\"} 1",
            "bearman_http_requests_total{route=\"/ipxe/{uuid}/heartbeat\",method=\"POST\",status=\"200\"} 3",
            "bearman_http_requests_total{route=\"/ipxe/{uuid}/heartbeat\",method=\"POST\",status=\"503\"} 1",
            "bearman_boot_scripts_served_total{script=\"target\"} 3",
            "bearman_http_request_duration_seconds_count{route=\"/ipxe/{uuid}\"} 4",
            "bearman_http_request_duration_seconds_count{route=\"/ipxe/{uuid}/heartbeat\"} 4",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
