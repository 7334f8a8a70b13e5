//! The `--serve` window changes nothing: a run watched by a scraper hammering its
//! `/metrics` from another thread has the same trace hash as the same seed unwatched,
//! and what the scraper read shows the simulated daemon at work. A clustered run shows
//! the replica that leads.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bearman_sim::run::{run, run_watched, RunOptions};
use bearman_sim::scenario::Scenario;
use bearman_sim::watch::Watch;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).expect("scenario loads")
}

/// Runs `scenario` on `seed` while another thread scrapes the window as fast as it can;
/// returns the trace hash and the scrapes that answered 200.
fn watched(scenario: &Scenario, seed: u64) -> (String, Vec<String>) {
    let watch = Watch::default();
    let done = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(Mutex::new(Vec::new()));
    let scraper = std::thread::spawn({
        let (watch, done, scrapes) = (watch.clone(), done.clone(), scrapes.clone());
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            while !done.load(Ordering::Relaxed) {
                let (status, body) = runtime.block_on(watch.metrics(None));
                if status == 200 {
                    scrapes.lock().unwrap().push(body);
                }
                // What the read-only dashboard asks of the run, too.
                for path in [
                    "/api/v1/summary",
                    "/api/v1/fleet/grid",
                    "/api/v1/events?limit=50",
                ] {
                    runtime.block_on(get(&watch, path));
                }
            }
        }
    });
    let report = run_watched(
        scenario,
        &RunOptions::seed(seed),
        Some(&watch),
        &mut |_| {},
        |_, _| {},
    )
    .expect("simulation runs");
    done.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
    assert!(report.passed(), "the watched run itself must pass");
    let scrapes = std::mem::take(&mut *scrapes.lock().unwrap());
    (report.trace.hash(), scrapes)
}

/// One request to the window's dashboard side: (status, body).
async fn request(watch: &Watch, method: &str, path: &str) -> (u16, String) {
    let request = axum::extract::Request::builder()
        .method(method)
        .uri(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = watch.dashboard(request).await;
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(watch: &Watch, path: &str) -> (u16, String) {
    request(watch, "GET", path).await
}

#[test]
fn the_window_serves_the_dashboard_read_only() {
    let scenario = scenario("node-crash");
    let watch = Watch::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Before the run: nothing to show yet, said plainly.
    assert_eq!(runtime.block_on(get(&watch, "/api/v1/summary")).0, 503);
    run_watched(
        &scenario,
        &RunOptions::seed(2),
        Some(&watch),
        &mut |_| {},
        |_, _| {},
    )
    .unwrap();
    let (status, summary) = runtime.block_on(get(&watch, "/api/v1/summary"));
    assert_eq!(status, 200, "{summary}");
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(
        summary["total"],
        u64::from(scenario.node_count()),
        "{summary}"
    );
    let (status, session) = runtime.block_on(get(&watch, "/ui/session"));
    assert_eq!(status, 200);
    assert!(session.contains("\"role\":\"viewer\""), "{session}");
    let (status, page) = runtime.block_on(get(&watch, "/ui/"));
    assert_eq!(status, 200);
    assert!(page.contains("<script src=\"/ui/app.js\""), "{page}");
    // Nothing but reads: no action, no login, no admin-only read.
    let uuid = "00000000-0000-4000-8000-000000000001";
    for (method, path) in [
        ("POST", format!("/api/v1/nodes/{uuid}/maintenance")),
        ("POST", "/ui/login".to_string()),
        ("DELETE", format!("/api/v1/nodes/{uuid}/maintenance")),
    ] {
        let (status, _) = runtime.block_on(request(&watch, method, &path));
        assert_eq!(status, 405, "{method} {path}");
    }
    assert_eq!(runtime.block_on(get(&watch, "/api/v1/tokens")).0, 404);
}

fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_watched_run_is_the_same_run() {
    let scenario = scenario("node-crash");
    let plain = run(&scenario, &RunOptions::seed(7), |_, _| {}).unwrap();
    let (hash, scrapes) = watched(&scenario, 7);
    assert_eq!(hash, plain.trace.hash(), "watching changed the run");
    assert!(
        scrapes.len() > 10,
        "the scraper got {} answers",
        scrapes.len()
    );
    let last = scrapes.last().unwrap();
    // What it read is the simulated daemon at work: the fleet, its heartbeats, and the
    // two crashed nodes' remediations.
    assert!(
        value(last, "bearman_heartbeats_total").is_some_and(|n| n > 1000.0),
        "{last}"
    );
    assert!(last.contains("bearman_nodes{state=\"ready\""), "{last}");
    assert!(
        value(
            last,
            "bearman_remediations_started_total{kind=\"automatic\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{last}"
    );
    assert!(
        value(last, "bearman_controller_up").is_some_and(|n| n == 1.0),
        "{last}"
    );
}

#[test]
fn the_window_follows_the_leader_of_a_clustered_run() {
    let scenario = scenario("ha-leader-killed-mid-fence");
    let plain = run(&scenario, &RunOptions::seed(3), |_, _| {}).unwrap();
    let (hash, scrapes) = watched(&scenario, 3);
    assert_eq!(
        hash,
        plain.trace.hash(),
        "watching changed the clustered run"
    );
    let last = scrapes.last().unwrap();
    assert!(
        value(last, "bearman_controller_leader").is_some_and(|n| n == 1.0),
        "the default window shows the leading replica:\n{last}"
    );
}
