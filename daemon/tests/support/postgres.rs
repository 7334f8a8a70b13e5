//! A PostgreSQL schema of a test's own on the test server (`DATABASE_URL`, or this
//! machine's local one): parallel runs and earlier runs stay out of each other's way.
//! Shared by the tests that need real PostgreSQL (`#[path]`-included).

/// A schema of its own on the test PostgreSQL server (`DATABASE_URL`, or this machine's).
pub struct PostgresSchema {
    /// The server's URL with this schema as the search path.
    pub url: String,
    base: String,
    name: String,
}

impl PostgresSchema {
    /// Creates `bearman_<prefix>_<pid>_<nanos>`.
    pub async fn create(prefix: &str) -> PostgresSchema {
        let base = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let name = format!(
            "bearman_{prefix}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(&base).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is required for this test and was not reachable at {base}: {error}. \
                 Start it, or point DATABASE_URL at one."
            )
        });
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        PostgresSchema { url, base, name }
    }

    pub async fn drop_it(self) {
        let admin = sqlx::AnyPool::connect(&self.base).await.unwrap();
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }
}

/// Runs `test` with the URL of a fresh schema, then drops the schema even when the test
/// panics (the panic goes on afterwards).
pub async fn with_schema<F, Fut>(prefix: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let schema = PostgresSchema::create(prefix).await;
    let outcome = tokio::spawn(test(schema.url.clone())).await;
    schema.drop_it().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}
