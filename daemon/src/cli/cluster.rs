//! `bearman cluster status`: the replicas, the lease holder and its epoch.

use super::*;

pub(super) async fn cluster_status(api: &ApiArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
    let answer: Value = client.call("GET", "/cluster", None::<&()>).await?;
    if api.output == Output::Json {
        return print_json(&answer);
    }
    let this = &answer["this_replica"];
    let cluster = &answer["cluster"];
    let db_now = cluster["db_now_ms"].as_i64().unwrap_or(0);
    if cluster["enabled"].as_bool() != Some(true) {
        table::out(
            "not clustered: this daemon is its database's only one (set [cluster] enabled = true on PostgreSQL for replicas)",
        )?;
    } else {
        table::out(&table::escape(&format!(
            "this replica: {} ({}{})",
            this["name"].as_str().unwrap_or("?"),
            this["acting"].as_str().unwrap_or("?"),
            this["epoch"]
                .as_i64()
                .map(|e| format!(", epoch {e}"))
                .unwrap_or_default()
        )))?;
    }
    let lease = &cluster["lease"];
    let holder = lease["holder"].as_str();
    match holder {
        Some(holder) => {
            let expires = lease["expires_at_ms"].as_i64().unwrap_or(0);
            table::out(&table::escape(&format!(
                "leader: {holder}, epoch {}, since {}, lease {} ({})",
                lease["epoch"].as_i64().unwrap_or(0),
                table::timestamp(lease["acquired_at_ms"].as_i64().unwrap_or(0)),
                if expires > db_now {
                    format!("expires in {:.1} s", (expires - db_now) as f64 / 1000.0)
                } else {
                    format!("lapsed {:.1} s ago", (db_now - expires) as f64 / 1000.0)
                },
                table::timestamp(expires)
            )))?;
        }
        None => table::out("leader: none yet")?,
    }
    let rows: Vec<Vec<String>> = cluster["replicas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|replica| {
            let name = replica["name"].as_str().unwrap_or("").to_string();
            let seen = replica["last_seen_at_ms"].as_i64().unwrap_or(0);
            vec![
                if Some(name.as_str()) == holder {
                    format!("{name} *")
                } else {
                    name
                },
                replica["address"].as_str().unwrap_or("").to_string(),
                replica["version"].as_str().unwrap_or("").to_string(),
                table::timestamp(replica["started_at_ms"].as_i64().unwrap_or(0)),
                format!("{:.1} s ago", (db_now - seen).max(0) as f64 / 1000.0),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table::print(
            &[
                "REPLICA (* leads)",
                "ADDRESS",
                "VERSION",
                "STARTED",
                "LAST SEEN",
            ],
            &rows,
        )?;
    }
    Ok(())
}
