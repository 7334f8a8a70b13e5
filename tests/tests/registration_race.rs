//! Registration under contention, through the real `POST /ipxe/{uuid}/register` endpoint
//! on SQLite and on PostgreSQL: many registrations of one uuid and of distinct uuids at
//! once, against pools too small for all of them. Whatever wins or loses, every address
//! must end up held by exactly one node, recorded by that node, and told to it alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use bearman::core::model::{Node, NodeFilter, PoolPurpose};
use bearman_e2e::{register_body, Options, TestDaemon};
use bearman_proto::uuid::NodeUuid;
use serde_json::json;

/// Independent runs per backend, each on a fresh database.
const RUNS: usize = 8;
/// Concurrent registrations of the one shared uuid per run.
const SAME_UUID_REGISTRATIONS: u64 = 20;
/// Concurrent registrations of distinct uuids per run (one more node than the BMC pool
/// has addresses, counting the shared uuid: someone must be refused).
const DISTINCT_REGISTRATIONS: u64 = 20;
/// Addresses in the BMC pool.
const BMC_POOL_SIZE: u32 = 20;
/// Namespace of the uuids this test registers.
const UUID_NAMESPACE: u32 = 0x7ace;

/// What one registration was answered.
struct Answer {
    uuid: NodeUuid,
    status: u16,
    bmc_address: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_never_share_an_address_on_sqlite() {
    let mut violations = Vec::new();
    let mut statuses = BTreeMap::new();
    for run in 0..RUNS {
        let daemon = TestDaemon::sqlite(Options::default()).await;
        violations.extend(race_once(daemon, run, &mut statuses).await);
    }
    report("sqlite", violations, statuses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_never_share_an_address_on_postgres() {
    let mut violations = Vec::new();
    let mut statuses = BTreeMap::new();
    for run in 0..RUNS {
        let daemon = TestDaemon::postgres(Options::default()).await;
        violations.extend(race_once(daemon, run, &mut statuses).await);
    }
    report("postgres", violations, statuses);
}

/// Registrations answered, by (shared uuid or not, status).
type StatusCounts = BTreeMap<(&'static str, u16), usize>;

fn report(backend: &str, violations: Vec<(usize, String)>, statuses: StatusCounts) {
    let runs_broken: std::collections::BTreeSet<usize> =
        violations.iter().map(|(run, _)| *run).collect();
    let duplicates = violations
        .iter()
        .filter(|(_, v)| v.contains("two machines") || v.contains("recorded by"))
        .count();
    let listing: Vec<String> = violations
        .iter()
        .map(|(run, v)| format!("run {run}: {v}"))
        .collect();
    eprintln!(
        "{backend}: {RUNS} runs, {} with violations, {duplicates} address(es) used by two \
         machines, {} violation(s) in all; answers {statuses:?}",
        runs_broken.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{backend}: {} of {RUNS} runs broke the address invariants:\n{}",
        runs_broken.len(),
        listing.join("\n")
    );
}

/// One run: the pools, the burst of registrations, then every invariant checked against
/// what the store holds. Returns the violations found, tagged with `run`.
async fn race_once(
    daemon: TestDaemon,
    run: usize,
    statuses: &mut StatusCounts,
) -> Vec<(usize, String)> {
    let daemon = Arc::new(daemon);
    let (status, body) = daemon
        .admin(
            "POST",
            "/pools",
            Some(json!({
                "name": "race-node", "purpose": "node", "cidr": "10.30.0.0/24",
                "range_start": "10.30.0.10", "range_end": "10.30.0.40",
                "gateway": "10.30.0.1", "dns": ["10.30.0.2"], "mtu": 9000,
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = daemon
        .admin(
            "POST",
            "/pools",
            Some(json!({
                "name": "race-bmc", "purpose": "bmc", "cidr": "10.31.0.0/24",
                "range_start": "10.31.0.10",
                "range_end": format!("10.31.0.{}", 10 + BMC_POOL_SIZE - 1),
                "gateway": "10.31.0.1",
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let shared = NodeUuid::from_index(UUID_NAMESPACE, 0);
    // Interleaved, so registrations of the shared uuid and of others collide.
    let mut registrations = Vec::new();
    for index in 0..SAME_UUID_REGISTRATIONS.max(DISTINCT_REGISTRATIONS) {
        if index < SAME_UUID_REGISTRATIONS {
            registrations.push((shared.clone(), 0u32));
        }
        if index < DISTINCT_REGISTRATIONS {
            let node_index = index + 1;
            registrations.push((
                NodeUuid::from_index(UUID_NAMESPACE, node_index),
                node_index as u32,
            ));
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (uuid, body_index) in registrations {
        let daemon = daemon.clone();
        tasks.spawn(async move {
            let body = serde_json::to_vec(&register_body(body_index)).unwrap();
            let response = daemon
                .request("POST", &format!("/ipxe/{uuid}/register"), None, Some(&body))
                .await;
            let answer: serde_json::Value =
                serde_json::from_slice(&response.body).unwrap_or_default();
            Answer {
                uuid,
                status: response.status,
                bmc_address: answer["bmc"]["address"].as_str().map(str::to_string),
            }
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        let answer = answer.expect("registration task");
        let kind = if answer.uuid == shared {
            "same"
        } else {
            "distinct"
        };
        *statuses.entry((kind, answer.status)).or_default() += 1;
        answers.push(answer);
    }
    check_invariants(&daemon, &answers)
        .await
        .into_iter()
        .map(|violation| (run, violation))
        .collect()
}

/// The address as a node records it: bond0 addresses carry their prefix length.
fn bare(address: &str) -> &str {
    address.split('/').next().unwrap_or(address)
}

async fn check_invariants(daemon: &TestDaemon, answers: &[Answer]) -> Vec<String> {
    let mut violations = Vec::new();
    for answer in answers {
        // 200, or a clear refusal: 503 for the exhausted pool, 409 for a lost race after
        // the handler's bounded retries. Never a 500.
        if ![200, 409, 503].contains(&answer.status) {
            violations.push(format!(
                "registration of {} answered {}",
                answer.uuid, answer.status
            ));
        }
    }
    let nodes: Vec<Node> = daemon
        .store
        .node_list(&NodeFilter::default())
        .await
        .expect("list nodes");
    let nodes: BTreeMap<NodeUuid, Node> = nodes.into_iter().map(|n| (n.uuid.clone(), n)).collect();
    let allocations = daemon.store.ip_list(None, None).await.expect("list");

    // Every allocation belongs to a node that exists and records it.
    for allocation in &allocations {
        let Some(node) = nodes.get(&allocation.node_uuid) else {
            violations.push(format!(
                "{} ({}) is allocated to {}, which does not exist",
                allocation.address,
                allocation.purpose.as_str(),
                allocation.node_uuid
            ));
            continue;
        };
        let recorded = match allocation.purpose {
            PoolPurpose::Node => node
                .network
                .bond0_addresses
                .iter()
                .any(|a| bare(a) == allocation.address),
            PoolPurpose::Bmc => node.bmc.address.as_deref() == Some(&allocation.address),
        };
        if !recorded {
            violations.push(format!(
                "{} is allocated to {} but its record does not have it",
                allocation.address, allocation.node_uuid
            ));
        }
    }

    // Every address a node records is allocated to it, and to no one else.
    let mut recorded_by: BTreeMap<String, Vec<NodeUuid>> = BTreeMap::new();
    for node in nodes.values() {
        let mut addresses: Vec<(PoolPurpose, &str)> = node
            .network
            .bond0_addresses
            .iter()
            .map(|a| (PoolPurpose::Node, bare(a)))
            .collect();
        if let Some(address) = &node.bmc.address {
            addresses.push((PoolPurpose::Bmc, address));
        }
        for (purpose, address) in addresses {
            recorded_by
                .entry(address.to_string())
                .or_default()
                .push(node.uuid.clone());
            let held = allocations
                .iter()
                .find(|a| a.address == address)
                .map(|a| &a.node_uuid);
            if held != Some(&node.uuid) {
                violations.push(format!(
                    "{} records {} address {address}, allocated to {}",
                    node.uuid,
                    purpose.as_str(),
                    held.map_or("no one".to_string(), |u| u.to_string())
                ));
            }
        }
    }
    for (address, holders) in &recorded_by {
        if holders.len() > 1 {
            let holders: Vec<String> = holders.iter().map(|u| u.to_string()).collect();
            violations.push(format!(
                "{address} is recorded by {} nodes: {}",
                holders.len(),
                holders.join(", ")
            ));
        }
    }

    // No address was told to one machine and given to another: both would configure it.
    for answer in answers.iter().filter(|a| a.status == 200) {
        let Some(told) = &answer.bmc_address else {
            continue;
        };
        let held = allocations
            .iter()
            .find(|a| &a.address == told)
            .map(|a| &a.node_uuid);
        if held != Some(&answer.uuid) {
            violations.push(format!(
                "BMC address {told} was told to {} and is allocated to {}: two machines use it",
                answer.uuid,
                held.map_or("no one".to_string(), |u| u.to_string())
            ));
        }
    }

    // Every successful answer for a uuid names the BMC address its record has.
    for answer in answers.iter().filter(|a| a.status == 200) {
        let recorded = nodes.get(&answer.uuid).and_then(|n| n.bmc.address.clone());
        if answer.bmc_address != recorded {
            violations.push(format!(
                "{} was told BMC address {:?}, its record has {:?}",
                answer.uuid, answer.bmc_address, recorded
            ));
        }
    }
    let successes = answers.iter().filter(|a| a.status == 200).count();
    assert!(successes > 0, "no registration succeeded at all");
    violations
}
