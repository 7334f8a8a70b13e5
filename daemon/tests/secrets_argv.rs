//! Secrets off argv: the token and the database URL read from files (errors naming the
//! file), a warning when a secret is on the command line, token expiry refused with 401,
//! and the last-used time recorded and listed.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bearman::api::{AppState, ServiceConfig};
use bearman::app::tokens::hash_secret;
use bearman::core::model::{NodeRole, TokenRole};
use bearman::core::registration::RegistrationDefaults;
use bearman::images::MemoryImages;
use bearman::runtime::system::SystemClock;
use bearman::store::memory::MemoryStore;
use bearman::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_bearman");

fn bearman(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("BEARMAN_TOKEN")
        .env_remove("BEARMAN_TOKEN_FILE")
        .env_remove("BEARMAN_DATABASE_URL")
        .env_remove("BEARMAN_DATABASE_URL_FILE")
        .env_remove("BEARMAN_CONFIG")
        .output()
        .expect("bearman runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_token_on_the_command_line_is_warned_about_and_a_token_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: the command fails, but after argument parsing.
    let output = bearman(&[
        "summary",
        "--url",
        "http://127.0.0.1:9",
        "--token",
        "bm_abc",
    ]);
    let text = stderr(&output);
    assert!(
        text.contains("warning: --token on the command line is visible")
            && text.contains("--token-file"),
        "{text}"
    );
    assert!(
        !text.contains("bm_abc"),
        "the secret is never echoed: {text}"
    );

    let missing = dir.path().join("no-such-token");
    let output = bearman(&[
        "summary",
        "--url",
        "http://127.0.0.1:9",
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("cannot read the token file") && text.contains("no-such-token"),
        "{text}"
    );
    assert!(!text.contains("warning: --token"), "{text}");

    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "  \n").unwrap();
    let output = bearman(&[
        "summary",
        "--url",
        "http://127.0.0.1:9",
        "--token-file",
        empty.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("is empty"), "{}", stderr(&output));

    let both = bearman(&[
        "summary",
        "--url",
        "http://127.0.0.1:9",
        "--token",
        "bm_x",
        "--token-file",
        empty.to_str().unwrap(),
    ]);
    assert!(stderr(&both).contains("not both"), "{}", stderr(&both));
}

#[test]
fn a_database_url_with_a_password_on_argv_is_warned_about_and_a_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let output = bearman(&[
        "token",
        "list",
        "--database-url",
        "mysql://bearman:hunter2@127.0.0.1:9/none",
    ]);
    let text = stderr(&output);
    assert!(
        text.contains("--database-url with a password on the command line is visible")
            && text.contains("--database-url-file"),
        "{text}"
    );
    assert!(
        !text.contains("hunter2"),
        "the password never reaches output: {text}"
    );

    // A file naming a SQLite database in the temporary directory: used, and warned about
    // when every user may read it.
    let url_file = dir.path().join("database-url");
    let url = format!(
        "sqlite://{}?mode=rwc\n",
        dir.path().join("from-file.db").display()
    );
    std::fs::write(&url_file, url).unwrap();
    set_mode(&url_file, 0o644);
    let output = bearman(&[
        "token",
        "create",
        "--name",
        "ops",
        "--role",
        "viewer",
        "--expires-in",
        "30d",
        "--database-url-file",
        url_file.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        dir.path().join("from-file.db").exists(),
        "the file's URL was used"
    );
    assert!(
        stderr(&output).contains("readable by every user"),
        "{}",
        stderr(&output)
    );
    set_mode(&url_file, 0o600);
    let output = bearman(&[
        "token",
        "list",
        "--database-url-file",
        url_file.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("readable by every user"));
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(
        listing.contains("EXPIRES") && listing.contains("LAST USED"),
        "{listing}"
    );
    let row = listing.lines().find(|l| l.starts_with("ops")).unwrap();
    assert_eq!(
        row.matches("never").count(),
        1,
        "it expires (not never) and was never used: {row}"
    );

    let missing = bearman(&[
        "token",
        "list",
        "--database-url-file",
        dir.path().join("absent").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("cannot read the database URL file"),
        "{}",
        stderr(&missing)
    );
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn an_expired_token_is_refused_saying_so_and_use_is_recorded() {
    let store = Arc::new(MemoryStore::new());
    let state = AppState::new(
        store.clone(),
        Arc::new(SystemClock),
        Arc::new(MemoryImages::default()),
        ServiceConfig {
            public_url: "http://127.0.0.1".into(),
            stage1: Default::default(),
            defaults: RegistrationDefaults {
                role: NodeRole::Compute,
                flavor: None,
            },
            enrollment: bearman::core::enrollment::EnrollmentPolicy::default(),
            body_limit_bytes: bearman::api::BODY_LIMIT_BYTES_DEFAULT,
            edge: bearman::edge::EdgeLimits::default(),
            heartbeat_fresh_ms: 30_000,
            firmware: Default::default(),
            dashboard: Default::default(),
            metrics_public: false,
        },
    );
    // Expired long ago (written on the store: the application refuses a past expiry).
    store
        .token_create(
            "old",
            TokenRole::Admin,
            &hash_secret("bm_old"),
            0,
            Some(1),
            &[],
        )
        .await
        .unwrap();
    let live = state
        .app
        .token_create_expiring(
            "test",
            "live",
            TokenRole::Viewer,
            Some(bearman::runtime::Clock::now_ms(&SystemClock) + 3_600_000),
        )
        .await
        .unwrap();
    let refused = state
        .app
        .token_create_expiring("test", "past", TokenRole::Viewer, Some(1))
        .await;
    assert!(refused.is_err(), "an expiry in the past is refused");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = bearman::api::router(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let response = client
        .get(format!("{base}/api/v1/nodes"))
        .bearer_auth("bm_old")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body = response.text().await.unwrap();
    assert!(body.contains("expired"), "{body}");

    let before = store.token_list().await.unwrap();
    let live_before = before.iter().find(|t| t.name == "live").unwrap();
    assert_eq!(live_before.last_used_at_ms, None);
    for _ in 0..3 {
        let response = client
            .get(format!("{base}/api/v1/nodes"))
            .bearer_auth(&live.secret)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    let after = store.token_list().await.unwrap();
    let live_after = after.iter().find(|t| t.name == "live").unwrap();
    assert!(live_after.last_used_at_ms.is_some(), "its use was recorded");
    let tokens_json = serde_json::to_string(&after).unwrap();
    assert!(
        !tokens_json.contains(&live.secret) && !tokens_json.contains(&hash_secret(&live.secret)),
        "neither secret nor hash is serialized"
    );
}
