//! `bearman node`: listing, enrolment, edits, events and lifecycle actions over the API.

use super::*;
use bearman::core::lifecycle::LifecycleState;
use bearman::runtime::Clock;

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// The node's state, and for one in maintenance who holds it: an operator (by name) or
/// the controller, which parked it.
fn state_text(node: &Node) -> String {
    match &node.maintenance {
        Some(hold) if node.state == LifecycleState::Maintenance => {
            if hold.parked_by_controller() {
                "maintenance (parked by controller)".to_string()
            } else {
                format!("maintenance (held by {})", hold.by)
            }
        }
        _ if node.pending_acceptance.is_some() => {
            format!("{} (awaiting acceptance)", node.state.as_str())
        }
        _ => node.state.as_str().to_string(),
    }
}

/// "stage1 for 2m 13s" (boot milestone and how long the node has been at it).
fn boot_phase_text(node: &Node, now_ms: i64) -> Option<String> {
    let boot = node.boot?;
    let seconds = (now_ms - boot.at_ms).max(0) / 1000;
    Some(format!(
        "{} for {}m {:02}s",
        boot.phase.as_str(),
        seconds / 60,
        seconds % 60
    ))
}

pub(super) fn print_nodes(nodes: &[Node], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&nodes);
    }
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.uuid.to_string(),
                n.hostname.clone(),
                state_text(n),
                n.role.as_str().to_string(),
                table::or_dash(n.rack.as_deref()),
                table::or_dash(n.flavor.as_deref()),
                table::or_dash(n.network.bond0_addresses.first().map(String::as_str)),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "UUID", "HOSTNAME", "STATE", "ROLE", "RACK", "FLAVOR", "ADDRESS",
        ],
        &rows,
    )?;
    Ok(())
}

pub(super) fn print_events(events: &[Event], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&events);
    }
    let rows = events
        .iter()
        .map(|e| {
            let change = match (&e.from_state, &e.to_state) {
                (Some(from), Some(to)) => format!("{from} -> {to}"),
                _ => "-".into(),
            };
            vec![
                e.id.to_string(),
                table::timestamp(e.at_ms),
                e.node_uuid.as_ref().map_or("-".into(), |u| u.to_string()),
                e.actor.clone(),
                e.action.to_string(),
                change,
                e.reason.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &["ID", "AT", "NODE", "ACTOR", "ACTION", "STATE", "WHY"],
        &rows,
    )?;
    Ok(())
}

pub(super) fn reason_body(reason: Option<String>) -> Value {
    json!({ "reason": reason })
}

pub(super) async fn node(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::List {
            api,
            state,
            rack,
            role,
            limit,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let mut path = format!("/nodes?limit={limit}");
            for (key, value) in [("state", state), ("rack", rack), ("role", role)] {
                if let Some(value) = value {
                    path.push_str(&format!("&{key}={value}"));
                }
            }
            let nodes: Vec<Node> = client.call("GET", &path, None::<&()>).await?;
            print_nodes(&nodes, api.output)
        }
        NodeCommand::Show { uuid, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let mut node: Value = client
                .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
                .await?;
            // The last BMC power reading (power sync) is kept apart from the node record;
            // show it alongside.
            let power: Value = client
                .call("GET", &format!("/nodes/{uuid}/power"), None::<&()>)
                .await?;
            let phase = serde_json::from_value::<Node>(node.clone())
                .ok()
                .and_then(|n| boot_phase_text(&n, now_ms()));
            // Each firmware component against what the node's flavor expects.
            let firmware: Value = client
                .call("GET", &format!("/nodes/{uuid}/firmware"), None::<&()>)
                .await?;
            if let Some(fields) = node.as_object_mut() {
                fields.insert("last_power_reading".into(), power["power"].clone());
                fields.insert("boot_phase".into(), phase.into());
                fields.insert("firmware_status".into(), firmware["components"].clone());
            }
            // A node has nested hardware facts; JSON is the readable form either way.
            print_json(&node)
        }
        NodeCommand::Enroll {
            uuid,
            api,
            hostname,
            role,
            rack,
            flavor,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let body = json!({ "uuid": uuid, "hostname": hostname, "role": role, "rack": rack, "flavor": flavor });
            let node: Node = client.call("POST", "/nodes", Some(&body)).await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Update {
            uuid,
            api,
            hostname,
            role,
            rack,
            flavor,
            bmc_address,
            bmc_driver,
            bmc_credentials_ref,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let mut body =
                json!({ "hostname": hostname, "role": role, "rack": rack, "flavor": flavor });
            if bmc_address.is_some() || bmc_driver.is_some() || bmc_credentials_ref.is_some() {
                let current: Node = client
                    .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
                    .await?;
                let mut bmc = serde_json::to_value(&current.bmc)?;
                if let Some(address) = bmc_address {
                    bmc["address"] = json!(address);
                }
                if let Some(driver) = bmc_driver {
                    bmc["driver"] = json!(driver);
                }
                if let Some(reference) = bmc_credentials_ref {
                    bmc["credentials_ref"] = json!(reference);
                }
                body["bmc"] = bmc;
                body["generation"] = json!(current.generation);
            }
            let node: Node = client
                .call("PATCH", &format!("/nodes/{uuid}"), Some(&body))
                .await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Maintenance {
            uuid,
            mode,
            api,
            reason,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let method = if mode == "on" { "POST" } else { "DELETE" };
            let node: Node = client
                .call(
                    method,
                    &format!("/nodes/{uuid}/maintenance"),
                    Some(&reason_body(reason)),
                )
                .await?;
            print_nodes(&[node], api.output)
        }
        NodeCommand::Power {
            uuid,
            action,
            api,
            reason,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let body = json!({ "action": action.replace('-', "_"), "reason": reason });
            let outcome: Value = client
                .call_within(
                    super::client::POWER_REQUEST_TIMEOUT,
                    "POST",
                    &format!("/nodes/{uuid}/power"),
                    Some(&body),
                )
                .await?;
            if api.output == Output::Json {
                return print_json(&outcome);
            }
            let mut line = format!(
                "{uuid}: power {action} done; power reads {} (verified after {} readbacks, {} ms); node is {}",
                outcome["power"].as_str().unwrap_or("?"),
                outcome["readbacks"],
                outcome["elapsed_ms"],
                outcome["state"].as_str().unwrap_or("?"),
            );
            if let Some(note) = outcome["note"].as_str().filter(|n| !n.is_empty()) {
                line.push_str("; ");
                line.push_str(note);
            }
            if outcome["state"] == "maintenance" {
                line.push_str("; release it with `bearman node maintenance UUID off` when done");
            }
            table::out(&table::escape(&line))?;
            Ok(())
        }
        NodeCommand::Rebuild { uuid, api, reason } => {
            remediate(&api, &uuid, "rebuild", reason).await
        }
        NodeCommand::Fence { uuid, api, reason } => remediate(&api, &uuid, "fence", reason).await,
        NodeCommand::Evacuate { uuid, api, reason } => {
            remediate(&api, &uuid, "evacuate", reason).await
        }
        NodeCommand::Drain { uuid, api, reason } => remediate(&api, &uuid, "drain", reason).await,
        NodeCommand::Retire { uuid, api, reason } => node_post(&api, &uuid, "retire", reason).await,
        NodeCommand::Accept { uuid, api, reason } => node_post(&api, &uuid, "accept", reason).await,
        NodeCommand::AcceptIdentity { uuid, api, reason } => {
            node_post(&api, &uuid, "accept-identity", reason).await
        }
        NodeCommand::Events { uuid, api, limit } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let events: Vec<Event> = client
                .call(
                    "GET",
                    &format!("/nodes/{uuid}/events?limit={limit}"),
                    None::<&()>,
                )
                .await?;
            print_events(&events, api.output)
        }
    }
}

pub(super) async fn node_post(
    api: &ApiArgs,
    uuid: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
    let node: Node = client
        .call(
            "POST",
            &format!("/nodes/{uuid}/{action}"),
            Some(&reason_body(reason)),
        )
        .await?;
    print_nodes(&[node], api.output)
}
