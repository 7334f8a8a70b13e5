//! `bearman token`: tokens made on the database itself (the first admin token), listed, revoked.

use super::*;

pub(super) async fn open_store_for_cli(
    store: &StoreArgs,
) -> anyhow::Result<Arc<dyn bearman::store::Store>> {
    let file = FileConfig::load(store.config.as_deref())?;
    let data_dir = store
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(config::DATA_DIR_DEFAULT));
    let url = match store.database_url.clone().or(file.database_url) {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating data directory {}", data_dir.display()))?;
            config::sqlite_url(&data_dir)?
        }
    };
    bearman::server::open_sql_store(&url)
        .await
        .map_err(|e| anyhow!("opening the database: {e}"))
}

pub(super) async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            store,
            output,
        } => {
            let store = open_store_for_cli(&store).await?;
            let role = TokenRole::parse(&role).ok_or_else(|| anyhow!("unknown role {role}"))?;
            // The first admin token is made here, on the store, before any daemon runs.
            let token: NewToken = offline_app(store)
                .token_create("cli", &name, role)
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
                    ]
                })
                .collect::<Vec<_>>();
            table::print(&["NAME", "ROLE", "CREATED"], &rows)?;
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
        },
    )
}
