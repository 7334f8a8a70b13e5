//! The `bearman` CLI against an admin API over real TLS: a loopback HTTPS server using
//! the daemon's own TLS piece (`edge::tls`) with certificates from a CA made for the
//! test. The CLI must trust exactly the CA in `--ca-file` and say plainly why it refused
//! a certificate. (Plain http:// is covered by tests/cli.rs.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman::edge::tls::{ReloadableTls, TlsFiles};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const BIN: &str = env!("CARGO_BIN_EXE_bearman");
/// Bound on one CLI run (its own request timeout is 30s).
const BOUND: Duration = Duration::from_secs(60);

#[path = "support/ca.rs"]
mod ca;
use ca::Ca;

/// An HTTPS server answering every request with `200 []`, and the request heads it saw.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Server {
    async fn start(ca: &Ca, names: &[&str], expired: bool) -> Server {
        let (cert, key) = ca.issue(names, expired);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let tls = ReloadableTls::load(TlsFiles {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        })
        .unwrap();
        Self::serve(Some(tls.acceptor()), dir).await
    }

    /// Plain HTTP, for a client that wrongly speaks TLS to it.
    async fn start_plain() -> Server {
        Self::serve(None, tempfile::tempdir().unwrap()).await
    }

    async fn serve(acceptor: Option<tokio_rustls::TlsAcceptor>, dir: tempfile::TempDir) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => answer(tcp, &seen).await,
                        // A client that refuses the certificate hangs up mid-handshake.
                        Some(acceptor) => {
                            if let Ok(Ok(tls)) =
                                tokio::time::timeout(BOUND, acceptor.accept(tcp)).await
                            {
                                answer(tls, &seen).await;
                            }
                        }
                    }
                });
            }
        });
        Server {
            port,
            requests,
            dir,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// A PEM file in the server's directory.
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, seen: &Mutex<Vec<String>>) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => head.extend_from_slice(&chunk[..read]),
        }
        // A TLS ClientHello to plain HTTP: answer 400 at once, as hyper does.
        if head.first() == Some(&0x16) {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            let _ = stream.shutdown().await;
            return;
        }
    }
    seen.lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let _ = stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
              Connection: close\r\n\r\n[]",
        )
        .await;
    // TLS close_notify, then FIN.
    let _ = stream.shutdown().await;
}

/// `bearman ARGS` with no `BEARMAN_*` variables inherited from whoever runs the tests,
/// run off the async workers so the server keeps answering.
async fn bearman(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BEARMAN_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let run = tokio::task::spawn_blocking(move || command.output().expect("run bearman"));
    tokio::time::timeout(BOUND, run)
        .await
        .expect("bearman exits within the bound")
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A refusal: exit status 1 with one `error:` line, no panic, no backtrace.
fn assert_refused(output: &Output) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {text}");
    assert!(
        text.lines()
            .last()
            .is_some_and(|line| line.starts_with("error: ")),
        "{text}"
    );
    assert!(
        !text.contains("panicked") && !text.contains("RUST_BACKTRACE"),
        "{text}"
    );
    text
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_ca_file_lists_nodes() {
    let ca = Ca::new("Test CA one");
    let server = Server::start(&ca, &["127.0.0.1", "localhost"], false).await;
    let ca_file = server.file("ca.pem", &ca.pem);
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{}", server.port);
        let output = bearman(
            &[
                "node",
                "list",
                "--url",
                &url,
                "--ca-file",
                path(&ca_file),
                "-o",
                "json",
            ],
            &[("BEARMAN_TOKEN", "bm_test_token")],
        )
        .await;
        assert!(
            output.status.success(),
            "{host}: stderr: {}",
            stderr(&output)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");
        // No clear-text warning over TLS.
        assert!(
            !stderr(&output).contains("clear text"),
            "{}",
            stderr(&output)
        );
    }
    // BEARMAN_CA_FILE does what --ca-file does.
    let url = format!("https://127.0.0.1:{}", server.port);
    let output = bearman(
        &["node", "list", "--url", &url],
        &[("BEARMAN_CA_FILE", path(&ca_file))],
    )
    .await;
    assert!(output.status.success(), "stderr: {}", stderr(&output));

    let requests = server.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /api/v1/nodes?limit="),
        "{}",
        requests[0]
    );
    assert!(
        requests[0].contains("\r\nAuthorization: Bearer bm_test_token\r\n"),
        "{}",
        requests[0]
    );
    assert!(requests[0].contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", server.port)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused_naming_the_url_and_the_issuer() {
    let server = Server::start(&Ca::new("Test CA one"), &["127.0.0.1"], false).await;
    let other_ca = server.file("other-ca.pem", &Ca::new("Test CA two").pem);
    let url = format!("https://127.0.0.1:{}", server.port);
    let output = bearman(
        &["node", "list", "--url", &url, "--ca-file", path(&other_ca)],
        &[("BEARMAN_TOKEN", "bm_test_token")],
    )
    .await;
    let text = assert_refused(&output);
    assert!(
        text.contains(&format!("TLS handshake with {url} failed")),
        "{text}"
    );
    assert!(text.contains("unknown issuer"), "{text}");
    assert!(text.contains("other-ca.pem"), "{text}");
    // Nothing, the token least of all, went to a server the CLI did not trust.
    assert!(server.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_file_only_public_cas_are_trusted() {
    let server = Server::start(&Ca::new("Test CA one"), &["127.0.0.1"], false).await;
    let url = format!("https://127.0.0.1:{}", server.port);
    let text = assert_refused(&bearman(&["node", "list", "--url", &url], &[]).await);
    assert!(text.contains("unknown issuer"), "{text}");
    assert!(text.contains("--ca-file (BEARMAN_CA_FILE)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_or_expired_is_refused_saying_so() {
    let ca = Ca::new("Test CA one");
    let wrong_name = Server::start(&ca, &["bearman.example"], false).await;
    let ca_file = wrong_name.file("ca.pem", &ca.pem);
    let url = format!("https://127.0.0.1:{}", wrong_name.port);
    let text = assert_refused(
        &bearman(
            &["node", "list", "--url", &url, "--ca-file", path(&ca_file)],
            &[],
        )
        .await,
    );
    assert!(text.contains("does not name \"127.0.0.1\""), "{text}");
    assert!(text.contains("bearman.example"), "{text}");

    let expired = Server::start(&ca, &["127.0.0.1"], true).await;
    let url = format!("https://127.0.0.1:{}", expired.port);
    let text = assert_refused(
        &bearman(
            &["node", "list", "--url", &url, "--ca-file", path(&ca_file)],
            &[],
        )
        .await,
    );
    assert!(text.contains("certificate has expired"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_a_plain_http_daemon_says_so() {
    let ca = Ca::new("Test CA one");
    let server = Server::start_plain().await;
    let ca_file = server.file("ca.pem", &ca.pem);
    let url = format!("https://127.0.0.1:{}", server.port);
    let text = assert_refused(
        &bearman(
            &["node", "list", "--url", &url, "--ca-file", path(&ca_file)],
            &[],
        )
        .await,
    );
    assert!(
        text.contains(&format!("TLS handshake with {url} failed")),
        "{text}"
    );
    assert!(text.contains("try http://"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ca_files_are_named() {
    let server = Server::start_plain().await;
    let url = format!("https://127.0.0.1:{}", server.port);
    let empty = server.file("empty.pem", "");
    let text = assert_refused(
        &bearman(
            &["node", "list", "--url", &url, "--ca-file", path(&empty)],
            &[],
        )
        .await,
    );
    assert!(text.contains("empty.pem holds no certificate"), "{text}");
    let missing = server.dir.path().join("missing.pem");
    let text = assert_refused(
        &bearman(
            &["node", "list", "--url", &url, "--ca-file", path(&missing)],
            &[],
        )
        .await,
    );
    assert!(text.contains("cannot read --ca-file"), "{text}");
    assert!(text.contains("missing.pem"), "{text}");
    assert!(server.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_plain_http_to_another_host_is_warned_about() {
    // `.invalid` never resolves (RFC 6761): the command fails fast after the warning.
    let output = bearman(
        &["node", "list", "--url", "http://bearman.invalid:8080"],
        &[("BEARMAN_TOKEN", "bm_test_token")],
    )
    .await;
    let text = assert_refused(&output);
    assert_eq!(
        text.matches(
            "the token crosses the network to bearman.invalid in clear text; use https://"
        )
        .count(),
        1,
        "{text}"
    );
    // Loopback: no warning.
    let server = Server::start_plain().await;
    let url = format!("http://127.0.0.1:{}", server.port);
    let output = bearman(
        &["node", "list", "--url", &url],
        &[("BEARMAN_TOKEN", "bm_test_token")],
    )
    .await;
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    assert!(
        !stderr(&output).contains("clear text"),
        "{}",
        stderr(&output)
    );
}
