//! `bearman bmc`: checks straight through the BMC drivers, and power control straight
//! through them for a daemon that is down — refused without `--direct-bypassing-audit`,
//! since it skips the daemon's audit, its maintenance hold and its per-BMC guard.

use super::*;

/// BMC drivers for `bearman bmc`: the [bmc] table of --config, --secrets-file over it.
pub(super) fn bmc_drivers(args: &BmcArgs) -> anyhow::Result<bearman::bmc::provider::DriverBmcs> {
    let file = FileConfig::load(args.config.as_deref())?;
    let mut settings = file.bmc.unwrap_or_default();
    if let Some(path) = &args.secrets_file {
        settings.secrets_file = Some(path.clone());
    }
    bearman::bmc::provider::DriverBmcs::new(settings).map_err(|e| anyhow!("bmc configuration: {e}"))
}

/// Every node, page by page (bounded: a million nodes is a thousand pages).
pub(super) async fn all_nodes(client: &ApiClient) -> anyhow::Result<Vec<Node>> {
    let page_size = bearman::store::LIST_LIMIT_MAX;
    let mut nodes = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1000 {
        let mut path = format!("/nodes?limit={page_size}");
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let page: Vec<Node> = client.call("GET", &path, None::<&()>).await?;
        let full = page.len() == page_size;
        after = page.last().map(|n| n.uuid.to_string());
        nodes.extend(page);
        if !full {
            break;
        }
    }
    Ok(nodes)
}

pub(super) async fn bmc(command: BmcCommand) -> anyhow::Result<()> {
    use bearman::bmc::ops::{self, PowerAction};
    let (uuid, action, args) = match command {
        BmcCommand::Check {
            bmc: args,
            parallelism,
        } => {
            let drivers = bmc_drivers(&args)?;
            let client = ApiClient::new(
                &args.api.url,
                args.api.token.clone(),
                args.api.ca_file.as_deref(),
            )?;
            let nodes = all_nodes(&client).await?;
            let rows = ops::check_all(&drivers, &nodes, parallelism).await;
            if args.api.output == Output::Json {
                print_json(&rows)?;
            } else {
                table::print(&ops::CHECK_HEADERS, &ops::check_rows_table(&rows))?;
            }
            let failed = rows.iter().filter(|row| row.error.is_some()).count();
            if failed > 0 {
                bail!("{failed} of {} BMCs did not answer", rows.len());
            }
            return Ok(());
        }
        BmcCommand::Status { uuid, bmc } => (uuid, PowerAction::Status, bmc),
        BmcCommand::Pxe {
            uuid,
            bmc,
            direct_bypassing_audit,
        } => {
            direct_bypass(direct_bypassing_audit, "pxe", "pxe", &uuid)?;
            (uuid, PowerAction::Pxe, bmc)
        }
        BmcCommand::Power {
            action,
            uuid,
            bmc,
            direct_bypassing_audit,
        } => {
            direct_bypass(
                direct_bypassing_audit,
                &format!("power {action}"),
                &action,
                &uuid,
            )?;
            let action = match action.as_str() {
                "on" => PowerAction::On,
                "off" => PowerAction::Off,
                _ => PowerAction::Cycle,
            };
            (uuid, action, bmc)
        }
    };
    let drivers = bmc_drivers(&args)?;
    let client = ApiClient::new(
        &args.api.url,
        args.api.token.clone(),
        args.api.ca_file.as_deref(),
    )?;
    let node: Node = client
        .call("GET", &format!("/nodes/{uuid}"), None::<&()>)
        .await?;
    let report = ops::act_on_node(&drivers, &node, action).await?;
    if args.api.output == Output::Json {
        return print_json(&report);
    }
    table::out(&table::escape(&report.summary()))?;
    Ok(())
}

/// Refuses a direct power change unless the operator said they mean to bypass the
/// daemon, and says loudly what that skips when they did.
fn direct_bypass(allowed: bool, command: &str, action: &str, uuid: &str) -> anyhow::Result<()> {
    if !allowed {
        bail!(
            "`bearman bmc {command}` talks to the BMC directly, bypassing the daemon's audit trail, \
             maintenance hold and BMC guard; use `bearman node power {uuid} {action} --reason TEXT` \
             (or, only while the daemon is down, add --direct-bypassing-audit)"
        );
    }
    eprintln!(
        "warning: bypassing the daemon: this power change is not audited, does not put the node \
         in maintenance (the controller may fence it) and skips the daemon's per-BMC guard"
    );
    Ok(())
}
