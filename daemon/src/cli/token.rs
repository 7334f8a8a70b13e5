//! `bearman token`: tokens made on the database itself (the first admin token), listed, revoked.

use super::*;

pub(super) async fn open_store_for_cli(
    store: &StoreArgs,
) -> anyhow::Result<Arc<dyn bearman::store::Store>> {
    let url = database_url_for_cli(store)?;
    bearman::server::open_sql_store(&url)
        .await
        .map_err(|e| anyhow!("opening the database: {e}"))
}

/// The database the store flags, the configuration file or the data directory's default
/// name, resolved as `bearman serve` does (the data directory is created if missing).
pub(super) fn database_url_for_cli(store: &StoreArgs) -> anyhow::Result<String> {
    let file = FileConfig::load(store.config.as_deref())?;
    let data_dir = store
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(config::DATA_DIR_DEFAULT));
    let url = match store.database_url.clone() {
        Some(url) => Some(url),
        None => file.database_url()?,
    };
    let url = match url {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            config::sqlite_url(&data_dir)?
        }
    };
    Ok(url)
}

pub(super) async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            expires_in,
            expires_at,
            store,
            output,
        } => {
            let role = TokenRole::parse(&role).ok_or_else(|| anyhow!("unknown role {role}"))?;
            let now_ms = bearman::runtime::Clock::now_ms(&SystemClock);
            let expires_at_ms = match (expires_in, expires_at) {
                (Some(text), _) => Some(now_ms + parse_duration_ms(&text)?),
                (None, Some(text)) => Some(parse_rfc3339_ms(&text)?),
                (None, None) => None,
            };
            let store = open_store_for_cli(&store).await?;
            // The first admin token is made here, on the store, before any daemon runs.
            let token: NewToken = offline_app(store)
                .token_create_expiring("cli", &name, role, expires_at_ms)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if output == Output::Json {
                return print_json(&token);
            }
            table::out(&token.secret)?;
            eprintln!(
                "token {} (role {}) created; the secret above is shown only once. Use it as BEARMAN_TOKEN.",
                token.name,
                token.role.as_str()
            );
            Ok(())
        }
        TokenCommand::List { store, output } => {
            let store = open_store_for_cli(&store).await?;
            let now_ms = bearman::runtime::Clock::now_ms(&SystemClock);
            let tokens: Vec<ApiToken> = store.token_list().await.map_err(|e| anyhow!("{e}"))?;
            if output == Output::Json {
                return print_json(&tokens);
            }
            let rows = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.role.as_str().to_string(),
                        table::timestamp(t.created_at_ms),
                        match t.expires_at_ms {
                            Some(at) if t.is_expired(now_ms) => {
                                format!("{} (expired)", table::timestamp(at))
                            }
                            Some(at) => table::timestamp(at),
                            None => "never".to_string(),
                        },
                        t.last_used_at_ms
                            .map_or_else(|| "never".to_string(), table::timestamp),
                    ]
                })
                .collect::<Vec<_>>();
            table::print(&["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"], &rows)?;
            Ok(())
        }
        TokenCommand::Revoke { name, store } => {
            let store = open_store_for_cli(&store).await?;
            // Audited like a revocation over the API, as `token create` here is.
            offline_app(store)
                .token_delete("cli", &name)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            eprintln!("token {name} revoked");
            Ok(())
        }
    }
}

/// The application on a store opened by the CLI itself (token commands, run on the
/// database before or beside a daemon), so those writes are audited like the API's.
pub(super) fn offline_app(store: Arc<dyn bearman::store::Store>) -> App {
    App::new(
        store,
        Arc::new(SystemClock),
        Settings {
            defaults: RegistrationDefaults {
                role: bearman::core::model::NodeRole::Compute,
                flavor: None,
            },
            enrollment: bearman::core::enrollment::EnrollmentPolicy::default(),
            heartbeat_fresh_ms: 0,
            firmware: Default::default(),
        },
    )
}

/// `90s`, `30m`, `12h`, `30d`, `2w` as milliseconds (positive, at most ten years).
pub(super) fn parse_duration_ms(text: &str) -> anyhow::Result<i64> {
    let problem =
        || anyhow!("--expires-in {text:?}: expected a number and a unit s, m, h, d or w, e.g. 30d");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(problem)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| problem())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(problem()),
    };
    let ms = number.checked_mul(unit_ms).ok_or_else(problem)?;
    if ms <= 0 || ms > 10 * 366 * 86_400_000 {
        bail!("--expires-in {text:?}: must be more than 0 and at most ten years");
    }
    Ok(ms)
}

/// An RFC 3339 instant (`2027-01-31T00:00:00Z`, fractions and `±HH:MM` offsets allowed)
/// as milliseconds since the epoch.
pub(super) fn parse_rfc3339_ms(text: &str) -> anyhow::Result<i64> {
    let problem = || anyhow!("--expires-at {text:?}: expected RFC 3339, e.g. 2027-01-31T00:00:00Z");
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return Err(problem());
    }
    let number = |range: std::ops::Range<usize>| -> anyhow::Result<i64> {
        let part = text.get(range).ok_or_else(problem)?;
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(problem());
        }
        part.parse().map_err(|_| problem())
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(problem());
    }
    let mut rest = &text[19..];
    let mut fraction_ms = 0;
    if let Some(after) = rest.strip_prefix('.') {
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(problem());
        }
        let padded = format!("{:0<3}", &after[..digits.min(3)]);
        fraction_ms = padded.parse::<i64>().map_err(|_| problem())?;
        rest = &after[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let hours: i64 = rest[1..3].parse().map_err(|_| problem())?;
            let minutes: i64 = rest[4..6].parse().map_err(|_| problem())?;
            let offset = hours * 3600 + minutes * 60;
            if rest.starts_with('-') {
                -offset
            } else {
                offset
            }
        }
        _ => return Err(problem()),
    };
    let days = bearman::core::calendar::days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Ok(seconds * 1000 + fraction_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_texts_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration_ms("90s").unwrap(), 90_000);
        for bad in ["", "30", "d", "0d", "30y", "-1d", "99999999999w"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        let at = parse_rfc3339_ms("2027-01-31T12:34:56.789Z").unwrap();
        assert_eq!(table::timestamp(at), "2027-01-31T12:34:56Z");
        assert_eq!(at % 1000, 789);
        assert_eq!(
            parse_rfc3339_ms("2027-01-31T14:34:56+02:00").unwrap(),
            parse_rfc3339_ms("2027-01-31T12:34:56Z").unwrap()
        );
        for bad in [
            "2027-01-31",
            "2027-13-01T00:00:00Z",
            "2027-01-31T00:00:00",
            "tomorrow",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }
}
