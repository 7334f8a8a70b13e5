//! `bearman remediation` and the node remediation actions (fence, evacuate, rebuild, drain).

use super::*;

pub(super) fn print_remediations(items: &[Remediation], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&items);
    }
    let rows = items
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.node_uuid.to_string(),
                r.kind.as_str().to_string(),
                r.status.as_str().to_string(),
                r.step().map_or("-".to_string(), |s| {
                    if r.awaiting_fence_retry() {
                        format!(
                            "fence unverified: retry {} at {}",
                            r.fence_retries,
                            table::timestamp(r.next_attempt_at_ms)
                        )
                    } else {
                        format!("{} (attempt {})", s.as_str(), r.attempts)
                    }
                }),
                table::timestamp(r.created_at_ms),
                r.requested_by.clone(),
                table::or_dash(r.last_error.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &[
            "ID",
            "NODE",
            "KIND",
            "STATUS",
            "STEP",
            "CREATED",
            "BY",
            "LAST ERROR",
        ],
        &rows,
    )?;
    Ok(())
}

pub(super) async fn remediate(
    api: &ApiArgs,
    uuid: &str,
    action: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
    let created: Remediation = client
        .call(
            "POST",
            &format!("/nodes/{uuid}/{action}"),
            Some(&reason_body(reason)),
        )
        .await?;
    print_remediations(&[created], api.output)
}

pub(super) async fn remediation(command: RemediationCommand) -> anyhow::Result<()> {
    match command {
        RemediationCommand::List {
            api,
            active,
            node,
            limit,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let mut path = format!("/remediations?limit={limit}&active={active}");
            if let Some(node) = node {
                path.push_str(&format!("&node={node}"));
            }
            let items: Vec<Remediation> = client.call("GET", &path, None::<&()>).await?;
            print_remediations(&items, api.output)
        }
        RemediationCommand::Show { id, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let item: Value = client
                .call("GET", &format!("/remediations/{id}"), None::<&()>)
                .await?;
            print_json(&item)
        }
        RemediationCommand::Cancel { id, api, reason } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let item: Remediation = client
                .call(
                    "POST",
                    &format!("/remediations/{id}/cancel"),
                    Some(&reason_body(reason)),
                )
                .await?;
            print_remediations(&[item], api.output)
        }
        RemediationCommand::Guards { api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let guards: Value = client
                .call("GET", "/remediation/guards", None::<&()>)
                .await?;
            print_json(&guards)
        }
    }
}
