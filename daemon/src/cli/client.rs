//! The CLI's client for the admin API: one request per connection over the boot
//! protocol's minimal HTTP client, bounded in time, errors turned into readable lines.
//! `https://` URLs get TLS (rustls with ring) over the same client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bearman_proto::http::{self, HttpUrl, Scheme};
use bearman_proto::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A power action is answered once the BMC read it back, behind the daemon's BMC guard
/// (queue and call bounds) and readbacks: minutes at worst.
pub const POWER_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub struct ApiClient {
    /// As given, for error messages.
    url: String,
    base: HttpUrl,
    token: Option<String>,
    tls: Option<Tls>,
}

/// TLS towards an `https://` daemon.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    /// `None`: the public CAs (webpki-roots) are trusted.
    ca_file: Option<PathBuf>,
}

impl ApiClient {
    /// `ca_file`: PEM bundle of the CA(s) to trust for an `https://` URL, instead of the
    /// public CAs.
    pub fn new(
        url: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<ApiClient> {
        let (scheme, base) = http::parse_admin_url(url).map_err(|e| anyhow!("--url: {e}"))?;
        let tls = match scheme {
            Scheme::Https => Some(Tls::new(&base, ca_file)?),
            Scheme::Http => {
                if ca_file.is_some() {
                    warn_once(
                        &CA_FILE_WARNING,
                        "warning: --ca-file is not used with an http:// --url",
                    );
                }
                if token.is_some() && !is_loopback(&base.host) {
                    warn_once(
                        &CLEAR_TEXT_WARNING,
                        &format!(
                            "warning: the token crosses the network to {} in clear text; \
                             use https://",
                            base.host
                        ),
                    );
                }
                None
            }
        };
        Ok(ApiClient {
            url: url.to_string(),
            base,
            token,
            tls,
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> anyhow::Result<http::Response> {
        let full_path = format!("{}/api/v1{path}", self.base.path.trim_end_matches('/'));
        let authority = self.base.authority();
        let attempt = async {
            let stream = bearman::runtime::system::connect_tcp(&authority)
                .await
                .with_context(|| format!("cannot connect to bearman at {authority}"))?;
            let body = body.as_deref();
            match &self.tls {
                None => {
                    self.exchange(stream, method, &authority, &full_path, body)
                        .await
                }
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(|error| tls.handshake_error(&self.url, error))?;
                    self.exchange(stream, method, &authority, &full_path, body)
                        .await
                }
            }
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            anyhow!(
                "{method} {full_path}: no answer within {}s",
                timeout.as_secs()
            )
        })?
    }

    /// One request and its response on a connected (and, for https, handshaken) stream.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        method: &str,
        authority: &str,
        full_path: &str,
        body: Option<&[u8]>,
    ) -> anyhow::Result<http::Response> {
        let authorization = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ];
        if let Some(value) = &authorization {
            headers.push(("Authorization", value.as_str()));
        }
        http::send(&mut stream, method, authority, full_path, &headers, body)
            .await
            .with_context(|| format!("{method} {full_path}"))
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        self.call_within(REQUEST_TIMEOUT, method, path, body).await
    }

    /// [`ApiClient::call`] with its own bound on the whole exchange.
    pub async fn call_within<T: DeserializeOwned>(
        &self,
        timeout: Duration,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let response = self.send(method, path, body, timeout).await?;
        if !response.is_success() {
            let detail = match serde_json::from_slice::<ErrorBody>(&response.body) {
                Ok(error) => format!("{} ({})", error.message, error.error),
                Err(_) => response.text(),
            };
            let hint = match response.status {
                401 => {
                    "; pass --token or set BEARMAN_TOKEN (create one with `bearman token create`)"
                }
                _ => "",
            };
            bail!("{method} {path}: HTTP {}: {detail}{hint}", response.status);
        }
        if response.status == 204 || response.body.is_empty() {
            return serde_json::from_slice(b"null").context("empty response");
        }
        serde_json::from_slice(&response.body)
            .with_context(|| format!("{method} {path}: unexpected response body"))
    }
}

impl Tls {
    fn new(base: &HttpUrl, ca_file: Option<&Path>) -> anyhow::Result<Tls> {
        let roots = match ca_file {
            Some(path) => ca_roots(path)?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        // ring named explicitly, like the daemon's side (edge::tls), rather than a
        // process default that depends on other crates' features.
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("cannot set up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // An IP address host is checked against the certificate's IP address names.
        let server_name = ServerName::try_from(base.host.clone())
            .map_err(|_| anyhow!("--url: {:?} is not a valid TLS server name", base.host))?;
        Ok(Tls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            ca_file: ca_file.map(Path::to_path_buf),
        })
    }

    /// A failed handshake as one line naming the URL and the cause, with what to do
    /// about the usual ones.
    fn handshake_error(&self, url: &str, error: std::io::Error) -> anyhow::Error {
        use rustls::CertificateError as Cert;
        let trusted = match &self.ca_file {
            Some(path) => format!("the CA in --ca-file {}", path.display()),
            None => "a public CA (give --ca-file (BEARMAN_CA_FILE) naming the CA that \
                     signed the daemon's certificate)"
                .to_string(),
        };
        let Some(tls_error) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return anyhow!("TLS handshake with {url} failed: {error}");
        };
        let cause = match tls_error {
            rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => {
                format!("the daemon's certificate is signed by an unknown issuer, not by {trusted}")
            }
            rustls::Error::InvalidCertificate(Cert::BadSignature) => format!(
                "the daemon's certificate has a bad signature: it is not signed by {trusted}"
            ),
            rustls::Error::InvalidCertificate(
                Cert::NotValidForName | Cert::NotValidForNameContext { .. },
            ) => format!(
                "the daemon's certificate does not name {:?} ({tls_error}); use a --url host \
                 it names, or reissue it",
                self.server_name.to_str()
            ),
            rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
                format!("the daemon's certificate has expired ({tls_error})")
            }
            rustls::Error::InvalidCertificate(
                Cert::NotValidYet | Cert::NotValidYetContext { .. },
            ) => format!(
                "the daemon's certificate is not valid yet ({tls_error}); check both clocks"
            ),
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!("{tls_error}: is the daemon serving plain http? (try http://)")
            }
            other => other.to_string(),
        };
        anyhow!("TLS handshake with {url} failed: {cause}")
    }
}

/// The CA certificates of a PEM bundle: an error naming the file when it holds none.
fn ca_roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read --ca-file {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow!("--ca-file {} is not valid PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        bail!(
            "--ca-file {} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.into_iter().enumerate() {
        roots.add(certificate).map_err(|error| {
            anyhow!(
                "--ca-file {}: certificate {} cannot be used as a CA: {error}",
                path.display(),
                index + 1
            )
        })?;
    }
    Ok(roots)
}

static CLEAR_TEXT_WARNING: std::sync::Once = std::sync::Once::new();
static CA_FILE_WARNING: std::sync::Once = std::sync::Once::new();

/// Some commands make several clients: say each thing once.
fn warn_once(once: &std::sync::Once, message: &str) {
    once.call_once(|| {
        use std::io::Write as _;
        // stderr gone (`2>&-`): nothing to tell, and no reason to fail the command.
        let _ = writeln!(std::io::stderr(), "{message}");
    });
}

/// `localhost` and loopback addresses: a token sent there stays on this machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.9.9.9", "::1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "bearman.example", "localhost.example", "::2"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
