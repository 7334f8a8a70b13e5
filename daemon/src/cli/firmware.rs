//! `bearman firmware`: drift across the fleet, update bundles, the rollout.

use bearman::core::firmware::{DriftReport, FirmwareBundle, FirmwareRollout, RolloutPolicy};

use super::*;

#[derive(serde::Deserialize, serde::Serialize)]
struct FirmwareStatus {
    drift: DriftReport,
    rollout: FirmwareRollout,
    policy: RolloutPolicy,
}

fn client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
    ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())
}

fn print_bundles(bundles: &[FirmwareBundle], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&bundles);
    }
    let rows: Vec<Vec<String>> = bundles
        .iter()
        .map(|bundle| {
            let applies = [
                bundle.applies_to.vendor.clone(),
                bundle.applies_to.model.clone(),
                match (
                    &bundle.applies_to.from_version_min,
                    &bundle.applies_to.from_version_max,
                ) {
                    (None, None) => None,
                    (min, max) => Some(format!(
                        "from {}..{}",
                        min.as_deref().unwrap_or(""),
                        max.as_deref().unwrap_or("")
                    )),
                },
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
            vec![
                bundle.name.clone(),
                bundle.component.clone(),
                bundle.version.clone(),
                if applies.is_empty() {
                    "any".into()
                } else {
                    applies
                },
                bundle.size_bytes.to_string(),
                bundle.restart.as_str().into(),
                format!("{} s", bundle.timeout_s),
            ]
        })
        .collect();
    table::print(
        &[
            "NAME",
            "COMPONENT",
            "VERSION",
            "APPLIES TO",
            "BYTES",
            "RESTART",
            "TIMEOUT",
        ],
        &rows,
    )?;
    Ok(())
}

fn print_rollout(rollout: &FirmwareRollout, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(rollout);
    }
    let mut out = String::new();
    match &rollout.paused {
        Some(pause) => out.push_str(&format!(
            "rollout: PAUSED by {} at {}: {}\n",
            pause.by,
            table::timestamp(pause.at_ms),
            pause.reason
        )),
        None => out.push_str("rollout: running\n"),
    }
    table::out(&out)?;
    let tallies: Vec<Vec<String>> = rollout
        .tallies
        .iter()
        .map(|(bundle, tally)| {
            vec![
                bundle.clone(),
                tally.started.to_string(),
                tally.succeeded.to_string(),
                tally.failed.to_string(),
                rollout
                    .slots
                    .iter()
                    .filter(|slot| &slot.bundle == bundle)
                    .count()
                    .to_string(),
            ]
        })
        .collect();
    table::print(
        &["BUNDLE", "STARTED", "SUCCEEDED", "FAILED", "FLASHING"],
        &tallies,
    )?;
    if !rollout.slots.is_empty() {
        table::out("\n")?;
        let slots: Vec<Vec<String>> = rollout
            .slots
            .iter()
            .map(|slot| {
                vec![
                    slot.uuid.to_string(),
                    slot.rack.clone().unwrap_or_else(|| "-".into()),
                    slot.bundle.clone(),
                    table::timestamp(slot.started_at_ms),
                    table::timestamp(slot.deadline_ms),
                ]
            })
            .collect();
        table::print(&["FLASHING", "RACK", "BUNDLE", "SINCE", "DEADLINE"], &slots)?;
    }
    Ok(())
}

fn print_status(status: &FirmwareStatus, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(status);
    }
    let drift = &status.drift;
    table::out(&format!(
        "nodes: {} compliant, {} drifting, {} updating, {} out of service after failed updates\n\n",
        drift.compliant_nodes, drift.drifting_nodes, drift.updating_nodes, drift.failed_nodes
    ))?;
    let rows: Vec<Vec<String>> = drift
        .lines
        .iter()
        .map(|line| {
            let listed = line
                .uuids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ");
            let more = line.nodes as usize - line.uuids.len().min(line.nodes as usize);
            vec![
                line.component.clone(),
                line.flavor.clone(),
                line.expected.clone(),
                line.actual.clone().unwrap_or_else(|| "unknown".into()),
                line.nodes.to_string(),
                line.bundle.clone().unwrap_or_else(|| "none".into()),
                if more > 0 {
                    format!("{listed} (+{more} more)")
                } else {
                    listed
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        table::out("no drift: every node reads what its flavor expects\n")?;
    } else {
        table::print(
            &[
                "COMPONENT",
                "FLAVOR",
                "EXPECTED",
                "ACTUAL",
                "NODES",
                "BUNDLE",
                "WHICH",
            ],
            &rows,
        )?;
    }
    table::out("\n")?;
    print_rollout(&status.rollout, output)
}

pub(super) fn load_bundle_file(path: &std::path::Path) -> anyhow::Result<FirmwareBundle> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn reason_body(reason: Option<String>) -> Value {
    json!({ "reason": reason })
}

pub(super) async fn firmware(command: FirmwareCommand) -> anyhow::Result<()> {
    match command {
        FirmwareCommand::Status { api } => {
            let status: FirmwareStatus = client(&api)?
                .call("GET", "/firmware/status", None::<&()>)
                .await?;
            print_status(&status, api.output)
        }
        FirmwareCommand::Retry { uuid, api, reason } => {
            let node: Node = client(&api)?
                .call(
                    "POST",
                    &format!("/nodes/{uuid}/firmware/retry"),
                    Some(&reason_body(reason)),
                )
                .await?;
            eprintln!(
                "node {uuid}: failed firmware attempts cleared; it is {} and tries the update at its next registration",
                node.state
            );
            Ok(())
        }
        FirmwareCommand::Bundle(command) => bundle(command).await,
        FirmwareCommand::Rollout(command) => rollout(command).await,
    }
}

async fn bundle(command: FirmwareBundleCommand) -> anyhow::Result<()> {
    match command {
        FirmwareBundleCommand::List { api } => {
            let bundles: Vec<FirmwareBundle> = client(&api)?
                .call("GET", "/firmware/bundles", None::<&()>)
                .await?;
            print_bundles(&bundles, api.output)
        }
        FirmwareBundleCommand::Show { name, api } => {
            let bundle: FirmwareBundle = client(&api)?
                .call("GET", &format!("/firmware/bundles/{name}"), None::<&()>)
                .await?;
            print_json(&bundle)
        }
        FirmwareBundleCommand::Add { file, api } => {
            let bundle = load_bundle_file(&file)?;
            let created: FirmwareBundle = client(&api)?
                .call("POST", "/firmware/bundles", Some(&bundle))
                .await?;
            print_bundles(&[created], api.output)
        }
        FirmwareBundleCommand::Delete { name, api, reason } => {
            let _: Value = client(&api)?
                .call(
                    "DELETE",
                    &format!("/firmware/bundles/{name}"),
                    Some(&reason_body(reason)),
                )
                .await?;
            eprintln!("firmware bundle {name} deleted");
            Ok(())
        }
    }
}

async fn rollout(command: FirmwareRolloutCommand) -> anyhow::Result<()> {
    match command {
        FirmwareRolloutCommand::Status { api } => {
            let rollout: FirmwareRollout = client(&api)?
                .call("GET", "/firmware/rollout", None::<&()>)
                .await?;
            print_rollout(&rollout, api.output)
        }
        FirmwareRolloutCommand::Pause { api, reason } => {
            let rollout: FirmwareRollout = client(&api)?
                .call(
                    "POST",
                    "/firmware/rollout/pause",
                    Some(&reason_body(reason)),
                )
                .await?;
            print_rollout(&rollout, api.output)
        }
        FirmwareRolloutCommand::Resume { api, reason } => {
            let rollout: FirmwareRollout = client(&api)?
                .call(
                    "POST",
                    "/firmware/rollout/resume",
                    Some(&reason_body(reason)),
                )
                .await?;
            print_rollout(&rollout, api.output)
        }
    }
}
