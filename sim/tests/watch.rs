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
            }
        }
    });
    let report = run_watched(
        scenario,
        &RunOptions { seed },
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

fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_watched_run_is_the_same_run() {
    let scenario = scenario("node-crash");
    let plain = run(&scenario, &RunOptions { seed: 7 }, |_, _| {}).unwrap();
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
    let plain = run(&scenario, &RunOptions { seed: 3 }, |_, _| {}).unwrap();
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
