//! `bearman serve` with `[tls]`: the real binary, a CA made for the test. The admin API
//! answers over HTTPS (the CLI with `--ca-file`), refuses plain HTTP on that port; the
//! boot protocol and the probes answer over plain HTTP on `boot_listen`, where the admin
//! API does not exist; SIGHUP loads a new certificate, and a broken one leaves the old
//! one served and the daemon up.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bearman_proto::http;
use tokio_rustls::rustls;

#[path = "support/ca.rs"]
mod ca;
use ca::Ca;

#[allow(dead_code)]
#[path = "support/serve.rs"]
mod serve;
use serve::{bearman, run as output};

const BOUND: Duration = Duration::from_secs(30);

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One plain-HTTP request.
async fn plain(address: SocketAddr, path: &str) -> std::io::Result<http::Response> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    tokio::time::timeout(
        BOUND,
        http::send(&mut stream, "GET", &address.to_string(), path, &[], None),
    )
    .await
    .map_err(|_| std::io::Error::other("no answer"))?
    .map_err(std::io::Error::other)
}

/// A TLS connection to `address`, its certificate verified against `ca_pem`.
async fn tls_connect(
    address: SocketAddr,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(BOUND, connector.connect(name, tcp))
        .await
        .expect("handshake within the bound")
        .expect("handshake verified against the test CA")
}

/// The leaf certificate the daemon presents on `address`, verified against `ca_pem`.
async fn served_leaf(address: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let tls = tls_connect(address, ca_pem).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A dashboard login over HTTPS.
async fn tls_login(address: SocketAddr, ca_pem: &str, secret: &str) -> http::Response {
    let mut tls = tls_connect(address, ca_pem).await;
    let body = format!("{{\"token\":\"{secret}\"}}");
    tokio::time::timeout(
        BOUND,
        http::send(
            &mut tls,
            "POST",
            &address.to_string(),
            "/ui/login",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        ),
    )
    .await
    .expect("an answer within the bound")
    .expect("http exchange")
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hang_up(child: &Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_admin_listener_plain_boot_listener_and_certificate_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("bearman test CA");
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"], false);
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let admin = free_address();
    let boot = free_address();
    let data_dir = dir.path().join("data");
    let config = dir.path().join("bearman.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{admin}\"\ndata_dir = \"{}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nboot_listen = \"{boot}\"\n",
            data_dir.display(),
            cert_file.display(),
            key_file.display()
        ),
    )
    .unwrap();
    let mut token = bearman(dir.path());
    token
        .args([
            "token",
            "create",
            "--name",
            "admin",
            "--role",
            "admin",
            "--data-dir",
        ])
        .arg(&data_dir);
    let token = output(token);
    assert!(token.status.success(), "{token:?}");
    let secret = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &secret).unwrap();

    let log = dir.path().join("serve.log");
    let mut serve = bearman(dir.path());
    serve
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    let mut daemon = Daemon(serve.spawn().unwrap());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The probes answer on the plain boot listener.
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!("bearman serve exited ({status}):\n{}", log_text());
        }
        if let Ok(response) = plain(boot, "/healthz").await {
            assert_eq!(response.status, 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no /healthz on the boot listener:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = log_text();
    assert!(text.contains("TLS on the admin listener"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "no key material in the log");

    // The boot protocol is on the boot listener, and points nodes there.
    let script = plain(boot, "/ipxe").await.unwrap();
    assert_eq!(script.status, 200);
    assert!(
        script.text().contains(&format!("http://{boot}")),
        "{}",
        script.text()
    );
    assert_eq!(plain(boot, "/readyz").await.unwrap().status, 200);
    // The admin API is not there: no token is answered in clear text.
    let admin_on_boot = plain(boot, "/api/v1/nodes").await.unwrap();
    assert_eq!(admin_on_boot.status, 404, "{}", admin_on_boot.text());
    // Nor is the dashboard: its login takes a token.
    for path in ["/ui/", "/ui/app.js", "/ui/session", "/"] {
        let dashboard_on_boot = plain(boot, path).await.unwrap();
        assert_eq!(dashboard_on_boot.status, 404, "{path} on the boot listener");
    }
    // On the TLS admin listener the session cookie is Secure.
    let login = tls_login(admin, &ca.pem, &secret).await;
    assert_eq!(login.status, 200, "{}", login.text());
    let cookie = login.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.split("; ").any(|attribute| attribute == "Secure"),
        "{cookie}"
    );
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));

    // The admin API over HTTPS, through the CLI.
    let cli = |extra: &[&str]| {
        let mut command = bearman(dir.path());
        command
            .args(["node", "list"])
            .arg("--url")
            .arg(format!("https://{admin}"))
            .arg("--token-file")
            .arg(&token_file)
            .args(extra);
        output(command)
    };
    let listed = cli(&["--ca-file", ca_file.to_str().unwrap()]);
    assert!(
        listed.status.success(),
        "node list over https: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // Without the CA the daemon's certificate is not trusted.
    let untrusted = cli(&[]);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("--ca-file"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(
        plain(admin, "/healthz").await.is_err(),
        "the admin listener does not speak plain HTTP"
    );

    // A new certificate, loaded on SIGHUP.
    assert_eq!(served_leaf(admin, &ca.pem).await, der_of(&cert));
    let (renewed, renewed_key) = ca.issue(&["127.0.0.1", "localhost"], false);
    std::fs::write(&cert_file, &renewed).unwrap();
    std::fs::write(&key_file, &renewed_key).unwrap();
    hang_up(&daemon.0);
    let deadline = std::time::Instant::now() + BOUND;
    while served_leaf(admin, &ca.pem).await != der_of(&renewed) {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served after SIGHUP:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken key on the next SIGHUP: refused, logged, the renewed one still served.
    std::fs::write(&key_file, "not a key").unwrap();
    hang_up(&daemon.0);
    let deadline = std::time::Instant::now() + BOUND;
    while !log_text().contains("TLS certificate not reloaded; still serving the previous one") {
        assert!(std::time::Instant::now() < deadline, "{}", log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.0.try_wait().unwrap().is_none(), "still running");
    assert_eq!(served_leaf(admin, &ca.pem).await, der_of(&renewed));
    let listed = cli(&["--ca-file", ca_file.to_str().unwrap()]);
    assert!(listed.status.success());
}
