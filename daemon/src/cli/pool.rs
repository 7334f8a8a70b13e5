//! `bearman pool`: IP pools.

use super::*;

pub(super) fn print_pools(pools: &[IpPool], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&pools);
    }
    let rows = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.purpose.as_str().to_string(),
                p.vlan.map_or("-".into(), |v| v.to_string()),
                p.cidr.clone(),
                format!("{}-{}", p.range_start, p.range_end),
                table::or_dash(p.gateway.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table::print(
        &["NAME", "PURPOSE", "VLAN", "CIDR", "RANGE", "GATEWAY"],
        &rows,
    )?;
    Ok(())
}

pub(super) async fn pool(command: PoolCommand) -> anyhow::Result<()> {
    match command {
        PoolCommand::List { api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let pools: Vec<IpPool> = client.call("GET", "/pools", None::<&()>).await?;
            print_pools(&pools, api.output)
        }
        PoolCommand::Show { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let detail: PoolDetail = client
                .call("GET", &format!("/pools/{name}"), None::<&()>)
                .await?;
            if api.output == Output::Json {
                return print_json(&detail);
            }
            print_pools(std::slice::from_ref(&detail.pool), Output::Table)?;
            table::out(&format!(
                "\n{} of {} addresses allocated",
                detail.allocations.len(),
                detail.size
            ))?;
            let rows = detail
                .allocations
                .iter()
                .map(|a| {
                    vec![
                        a.address.clone(),
                        a.node_uuid.to_string(),
                        a.purpose.as_str().to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            table::print(&["ADDRESS", "NODE", "PURPOSE"], &rows)?;
            Ok(())
        }
        PoolCommand::Create {
            name,
            api,
            purpose,
            cidr,
            range,
            gateway,
            dns,
            vlan,
            mtu,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let (start, end) = range.split_once('-').ok_or_else(|| {
                anyhow!("--range {range:?}: expected START-END, e.g. 10.1.0.10-10.1.0.250")
            })?;
            let pool = IpPool {
                name,
                purpose: PoolPurpose::parse(&purpose)
                    .ok_or_else(|| anyhow!("--purpose {purpose}"))?,
                vlan,
                cidr,
                range_start: start.trim().to_string(),
                range_end: end.trim().to_string(),
                gateway,
                dns,
                mtu,
            };
            let created: IpPool = client.call("POST", "/pools", Some(&pool)).await?;
            print_pools(&[created], api.output)
        }
        PoolCommand::Delete { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let _: Value = client
                .call("DELETE", &format!("/pools/{name}"), None::<&()>)
                .await?;
            eprintln!("pool {name} deleted");
            Ok(())
        }
    }
}
