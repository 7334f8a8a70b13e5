//! TLS for the admin listener: certificate and key from files, reloaded on SIGHUP.
//!
//! The certificate is chosen per handshake by a resolver holding the current
//! [`CertifiedKey`], so one [`ServerConfig`] (and every acceptor made from it) lives for
//! the whole process and a reload only swaps that key: connections already up keep the
//! certificate they were made with, new ones get the new one. A reload that fails (a
//! renewal tool caught half-way through writing the files, a key that does not match)
//! changes nothing: the previous certificate goes on being served.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, SupportedProtocolVersion};

/// The daemon speaks HTTP/1.1 only: offering h2 would make clients that prefer it fail.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";
const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Where the admin listener's certificate chain and private key are read from (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate first, then any intermediates.
    pub cert_file: PathBuf,
    /// PKCS#8 (`BEGIN PRIVATE KEY`), PKCS#1 (`BEGIN RSA PRIVATE KEY`) or SEC1
    /// (`BEGIN EC PRIVATE KEY`), unencrypted.
    pub key_file: PathBuf,
}

/// What is wrong with the certificate or key files. Every message names the file; none
/// quotes key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS {what} file {} does not exist", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the TLS certificate file {} is not valid PEM: {detail}", path.display())]
    BadCertificatePem { path: PathBuf, detail: String },
    #[error("the TLS certificate file {} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks, the server's first)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the TLS key file {} is not valid PEM: {detail}", path.display())]
    BadKeyPem { path: PathBuf, detail: String },
    #[error("the TLS key file {} holds an encrypted private key; give it unencrypted (readable by the daemon's user only)", path.display())]
    EncryptedKey { path: PathBuf },
    #[error("the TLS key file {} holds no private key (expected PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("the TLS key file {} holds a private key that cannot be used: {detail}", path.display())]
    UnusableKey { path: PathBuf, detail: String },
    #[error("the first certificate in the TLS certificate file {} cannot be parsed: {detail}", path.display())]
    BadCertificate { path: PathBuf, detail: String },
    #[error("the private key in {} does not match the first certificate in {}", key_file.display(), cert_file.display())]
    KeyMismatch {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

/// The admin listener's TLS: a certificate that can be replaced while serving.
pub struct ReloadableTls {
    files: TlsFiles,
    resolver: Arc<CurrentCert>,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of debug output.
        f.debug_struct("ReloadableTls")
            .field("files", &self.files)
            .field("certificate", &self.describe())
            .finish()
    }
}

/// The certificate served to new handshakes.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole Arc (the write is a single assignment).
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ReloadableTls {
    /// Loads and checks cert chain + key; Err if anything is wrong (start-up fails with
    /// the reason).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let key = load_certified_key(&files)?;
        let resolver = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        // The ring provider named here rather than the process default, which depends on
        // which rustls features other crates in the build happened to enable.
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        Ok(ReloadableTls {
            files,
            resolver,
            config: Arc::new(config),
        })
    }

    /// Re-reads the files; on error keeps serving the previous certificate and returns
    /// the error.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.files)?;
        self.resolver.set(Arc::new(key));
        Ok(())
    }

    /// Acceptor for a new connection; always uses the certificate current at handshake
    /// time (acceptors share one config whose resolver a reload updates).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Subject, issuer, expiry and SHA-256 fingerprint of the current server certificate,
    /// for log lines: `subject CN=…, issuer CN=…, not after 2027-01-01T00:00:00Z,
    /// sha256 ab:cd:…` (with `, EXPIRED` once it has).
    pub fn describe(&self) -> String {
        let key = self.resolver.get();
        match key.cert.first() {
            Some(leaf) => describe_certificate(leaf, now_unix()),
            None => "no certificate".to_string(),
        }
    }
}

/// Spawns a task that reloads on every SIGHUP, logging success (with
/// [`ReloadableTls::describe`]) or failure (the old certificate is kept).
///
/// The handler is installed before this returns, so a SIGHUP sent as soon as the caller
/// goes on cannot hit the default action, which ends the process. Must be called within
/// a tokio runtime with signals enabled.
pub fn spawn_reload_on_sighup(tls: Arc<ReloadableTls>) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup());
    tokio::spawn(async move {
        let mut hangups = match hangups {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: the TLS certificate will not be reloaded");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let reloading = tls.clone();
            // File reads: off the async workers.
            let result = tokio::task::spawn_blocking(move || reloading.reload()).await;
            match result {
                Ok(Ok(())) => tracing::info!(
                    certificate = %tls.describe(),
                    "SIGHUP: TLS certificate reloaded"
                ),
                Ok(Err(error)) => tracing::warn!(
                    %error,
                    certificate = %tls.describe(),
                    "SIGHUP: TLS certificate not reloaded; still serving the previous one"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "SIGHUP: TLS reload did not finish; still serving the previous certificate"
                ),
            }
        }
    })
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Reads a whole file, telling a missing file apart from an unreadable one.
fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => TlsError::Missing {
            what,
            path: path.to_path_buf(),
        },
        _ => TlsError::Unreadable {
            what,
            path: path.to_path_buf(),
            source,
        },
    })
}

fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert_pem = read_file("certificate", &files.cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificatePem {
            path: files.cert_file.clone(),
            detail: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert_file.clone(),
        });
    }

    let key_pem = read_file("key", &files.key_file)?;
    warn_if_world_readable(&files.key_file);
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            // The PEM reader skips sections it does not know, encrypted keys among them.
            let encrypted = key_pem
                .windows(b"ENCRYPTED PRIVATE KEY".len())
                .any(|window| window == b"ENCRYPTED PRIVATE KEY");
            return Err(if encrypted {
                TlsError::EncryptedKey {
                    path: files.key_file.clone(),
                }
            } else {
                TlsError::NoPrivateKey {
                    path: files.key_file.clone(),
                }
            });
        }
        // pem::Error's messages describe the structure (section markers, base64), never
        // the key bytes.
        Err(error) => {
            return Err(TlsError::BadKeyPem {
                path: files.key_file.clone(),
                detail: error.to_string(),
            })
        }
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::UnusableKey {
            path: files.key_file.clone(),
            detail: error.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // rustls 0.23's own check: the key's public half against the leaf's
    // SubjectPublicKeyInfo. ring keys always report their public half, so `Unknown`
    // cannot happen here; it is treated as a mismatch rather than waved through.
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert_file: files.cert_file.clone(),
            key_file: files.key_file.clone(),
        }),
        Err(error) => Err(TlsError::BadCertificate {
            path: files.cert_file.clone(),
            detail: error.to_string(),
        }),
    }
}

/// The key file should be readable by the daemon's user only.
fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the TLS key file is readable by every user; `chmod o-r` it"
            );
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `subject CN=…, issuer CN=…, not after …, sha256 …`; only the fingerprint when the
/// certificate's fields cannot be read (they are informational: rustls parsed and
/// checked the certificate already).
fn describe_certificate(der: &[u8], now: i64) -> String {
    let fingerprint = Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let Some(summary) = der::summarize(der) else {
        return format!("sha256 {fingerprint}");
    };
    let mut text = format!(
        "subject {}, issuer {}, not after {}",
        summary.subject, summary.issuer, summary.not_after
    );
    if summary
        .not_after_unix
        .is_some_and(|not_after| not_after < now)
    {
        text.push_str(", EXPIRED");
    }
    let _ = write!(text, ", sha256 {fingerprint}");
    text
}

/// Just enough DER to name a certificate in a log line: subject and issuer common names
/// and the expiry (RFC 5280 §4.1). Everything that matters for security is rustls's.
mod der {
    pub(super) struct Summary {
        pub(super) subject: String,
        pub(super) issuer: String,
        pub(super) not_after: String,
        pub(super) not_after_unix: Option<i64>,
    }

    /// One element: (tag, contents, what follows).
    pub(super) fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let length = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let length = rest[..count]
                .iter()
                .fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
            rest = &rest[count..];
            length
        };
        if rest.len() < length {
            return None;
        }
        Some((tag, &rest[..length], &rest[length..]))
    }

    pub(super) fn summarize(der: &[u8]) -> Option<Summary> {
        let (_, certificate, _) = next(der)?;
        let (_, tbs, _) = next(certificate)?;
        let (tag, _, after_version) = next(tbs)?;
        // version is [0] EXPLICIT, absent for v1 certificates.
        let rest = if tag == 0xa0 { after_version } else { tbs };
        let (_, _serial, rest) = next(rest)?;
        let (_, _signature, rest) = next(rest)?;
        let (_, issuer, rest) = next(rest)?;
        let (_, validity, rest) = next(rest)?;
        let (_, subject, _) = next(rest)?;
        let (_, _not_before, rest) = next(validity)?;
        let (time_tag, not_after, _) = next(rest)?;
        let (not_after, not_after_unix) = time(time_tag, not_after)?;
        Some(Summary {
            subject: name(subject),
            issuer: name(issuer),
            not_after,
            not_after_unix,
        })
    }

    /// `CN=…` of a Name, or `(no CN)`.
    fn name(mut rdns: &[u8]) -> String {
        const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
        while let Some((_, set, rest)) = next(rdns) {
            rdns = rest;
            let mut attributes = set;
            while let Some((_, attribute, rest)) = next(attributes) {
                attributes = rest;
                let Some((_, oid, value)) = next(attribute) else {
                    continue;
                };
                if oid == COMMON_NAME {
                    if let Some((_, text, _)) = next(value) {
                        // The certificate is the operator's, but keep log lines one line.
                        let text: String = String::from_utf8_lossy(text)
                            .chars()
                            .map(|c| if c.is_control() { '?' } else { c })
                            .collect();
                        return format!("CN={text}");
                    }
                }
            }
        }
        "(no CN)".to_string()
    }

    /// UTCTime or GeneralizedTime (`…Z`, as RFC 5280 requires) as RFC 3339, with its
    /// Unix time.
    fn time(tag: u8, contents: &[u8]) -> Option<(String, Option<i64>)> {
        let text = std::str::from_utf8(contents).ok()?;
        let digits = text.strip_suffix('Z')?;
        let (year, rest) = match (tag, digits.len()) {
            (0x17, 12) => {
                let yy: i64 = digits.get(..2)?.parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
            }
            (0x18, 14) => (digits.get(..4)?.parse().ok()?, &digits[4..]),
            _ => return None,
        };
        let field = |at: usize| -> Option<i64> { rest.get(at..at + 2)?.parse().ok() };
        let (month, day, hour, minute, second) =
            (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
        let text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z");
        let unix = days_from_civil(year, month, day)
            .map(|days| days * 86_400 + hour * 3600 + minute * 60 + second);
        Some((text, unix))
    }

    /// Days since 1970-01-01, for a month and day in range.
    fn days_from_civil(year: i64, month: i64, day: i64) -> Option<i64> {
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        Some(crate::core::calendar::days_from_civil(year, month, day))
    }

    #[cfg(test)]
    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), Some(0));
        assert_eq!(days_from_civil(2000, 3, 1), Some(11_017));
        assert_eq!(
            time(0x17, b"491231235959Z"),
            Some(("2049-12-31T23:59:59Z".to_string(), Some(2_524_607_999)))
        );
        assert_eq!(
            time(0x18, b"19700101000000Z"),
            Some(("1970-01-01T00:00:00Z".to_string(), Some(0)))
        );
        assert_eq!(time(0x17, b"4912312359Z"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, RootCertStore};

    /// A CA made for the test, issuing server certificates for `localhost`.
    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        der: CertificateDer<'static>,
    }

    impl Ca {
        /// Distinct names: two CAs with one name would fail as a bad signature rather
        /// than as an unknown issuer.
        fn new(name: &str) -> Ca {
            use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).unwrap();
            Ca {
                der: cert.der().clone(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// A server certificate and its key, as PEM.
        fn issue(&self, common_name: &str) -> (String, String) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// A directory holding `cert.pem` and `key.pem`.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(cert: &str, key: &str) -> Files {
            let files = Files {
                dir: tempfile::tempdir().unwrap(),
            };
            files.write(cert, key);
            files
        }

        fn write(&self, cert: &str, key: &str) {
            std::fs::write(self.dir.path().join("cert.pem"), cert).unwrap();
            std::fs::write(self.dir.path().join("key.pem"), key).unwrap();
        }

        fn tls_files(&self) -> TlsFiles {
            TlsFiles {
                cert_file: self.dir.path().join("cert.pem"),
                key_file: self.dir.path().join("key.pem"),
            }
        }
    }

    fn client(
        ca: &Ca,
        versions: &[&'static SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A real handshake over an in-memory pipe: the leaf certificate the server sent,
    /// the negotiated ALPN protocol and TLS version.
    async fn handshake(
        acceptor: tokio_rustls::TlsAcceptor,
        connector: &tokio_rustls::TlsConnector,
    ) -> (Vec<u8>, Option<Vec<u8>>, Option<rustls::ProtocolVersion>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { acceptor.accept(server_io).await.map(|_| ()) });
        let name = ServerName::try_from("localhost").unwrap();
        let stream = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            connector.connect(name, client_io),
        )
        .await
        .expect("handshake within 10s")
        .expect("handshake");
        let (_, connection) = stream.get_ref();
        let leaf = connection.peer_certificates().unwrap()[0].to_vec();
        let alpn = connection.alpn_protocol().map(<[u8]>::to_vec);
        let version = connection.protocol_version();
        server.await.unwrap().expect("server side of the handshake");
        (leaf, alpn, version)
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn loads_good_files_and_serves_tls12_and_tls13_with_http11_alpn() {
        let ca = Ca::new("Test CA one");
        let (cert, key) = ca.issue("bearman one");
        let files = Files::new(&cert, &key);
        let tls = ReloadableTls::load(files.tls_files()).unwrap();
        let description = tls.describe();
        assert!(
            description.starts_with("subject CN=bearman one, issuer CN=Test CA one, not after "),
            "{description}"
        );
        assert!(description.contains(", sha256 "), "{description}");
        assert!(!description.contains("EXPIRED"), "{description}");

        let (leaf, alpn, version) =
            handshake(tls.acceptor(), &client(&ca, &[&rustls::version::TLS13])).await;
        assert_eq!(leaf, pem_der(&cert));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        let (_, _, version) =
            handshake(tls.acceptor(), &client(&ca, &[&rustls::version::TLS12])).await;
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_2));
    }

    #[test]
    fn each_bad_input_gives_its_own_error_naming_the_file() {
        let ca = Ca::new("Test CA one");
        let (cert, key) = ca.issue("bearman one");
        let (_, other_key) = ca.issue("bearman two");

        let files = Files::new(&cert, &key);
        std::fs::remove_file(files.tls_files().cert_file).unwrap();
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(
            matches!(
                &error,
                TlsError::Missing {
                    what: "certificate",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("cert.pem does not exist"),
            "{error}"
        );

        let files = Files::new(&cert, &key);
        std::fs::remove_file(files.tls_files().key_file).unwrap();
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(
            matches!(&error, TlsError::Missing { what: "key", .. }),
            "{error:?}"
        );

        let files = Files::new("", &key);
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(
            matches!(&error, TlsError::NoCertificate { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("cert.pem holds no certificate"),
            "{error}"
        );

        // A key file that holds a certificate (the two files swapped round).
        let files = Files::new(&cert, &cert);
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(&error, TlsError::NoPrivateKey { .. }), "{error:?}");
        assert!(
            error.to_string().contains("key.pem holds no private key"),
            "{error}"
        );

        let files = Files::new(
            &cert,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(&error, TlsError::EncryptedKey { .. }), "{error:?}");

        let truncated = &key[..key.len() / 2];
        let files = Files::new(&cert, truncated);
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(&error, TlsError::BadKeyPem { .. }), "{error:?}");

        let files = Files::new(&cert, &other_key);
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(&error, TlsError::KeyMismatch { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("key.pem does not match the first certificate in")
                && message.contains("cert.pem"),
            "{message}"
        );
        // No key material in any message.
        let key_body: String = other_key.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!format!("{error:?}").contains(&key_body));

        let files = Files::new(&cert, &key);
        let directory = files.dir.path().to_path_buf();
        let error = ReloadableTls::load(TlsFiles {
            cert_file: directory.clone(),
            key_file: directory.join("key.pem"),
        })
        .unwrap_err();
        assert!(
            matches!(
                &error,
                TlsError::Unreadable {
                    what: "certificate",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn reload_switches_the_served_certificate_and_a_failed_reload_keeps_it() {
        let ca = Ca::new("Test CA one");
        let (cert_one, key_one) = ca.issue("bearman one");
        let (cert_two, key_two) = ca.issue("bearman two");
        let files = Files::new(&cert_one, &key_one);
        let tls = ReloadableTls::load(files.tls_files()).unwrap();
        // Taken before the reload, as a listener's acceptor would be.
        let acceptor = tls.acceptor();
        let connector = client(&ca, &[&rustls::version::TLS13, &rustls::version::TLS12]);
        assert_eq!(
            handshake(acceptor.clone(), &connector).await.0,
            pem_der(&cert_one)
        );

        files.write(&cert_two, &key_two);
        tls.reload().unwrap();
        assert_eq!(
            handshake(acceptor.clone(), &connector).await.0,
            pem_der(&cert_two)
        );
        assert!(tls.describe().starts_with("subject CN=bearman two"));

        // Half-way through a renewal: the new certificate with the old key.
        let (cert_three, _) = ca.issue("bearman three");
        files.write(&cert_three, &key_two);
        let error = tls.reload().unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
        assert_eq!(
            handshake(acceptor.clone(), &connector).await.0,
            pem_der(&cert_two)
        );

        std::fs::remove_file(files.tls_files().key_file).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Missing { .. })));
        assert_eq!(handshake(acceptor, &connector).await.0, pem_der(&cert_two));
        assert!(tls.describe().starts_with("subject CN=bearman two"));
    }

    #[tokio::test]
    async fn sighup_reloads() {
        let ca = Ca::new("Test CA one");
        let (cert_one, key_one) = ca.issue("bearman one");
        let (cert_two, key_two) = ca.issue("bearman two");
        let files = Files::new(&cert_one, &key_one);
        let tls = Arc::new(ReloadableTls::load(files.tls_files()).unwrap());
        let task = spawn_reload_on_sighup(tls.clone());
        files.write(&cert_two, &key_two);
        // The handler is installed by now: the signal reaches it, not the default action.
        // SAFETY: kill(2) on our own pid with a signal the process handles.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !tls.describe().starts_with("subject CN=bearman two") {
            assert!(
                std::time::Instant::now() < deadline,
                "not reloaded: {}",
                tls.describe()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        task.abort();
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let body = base64(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// The SEC1 `EC PRIVATE KEY` inside a PKCS#8 EC key (its privateKey OCTET STRING).
    fn sec1_of(pkcs8_pem: &str) -> String {
        let pkcs8 = PrivateKeyDer::from_pem_slice(pkcs8_pem.as_bytes()).unwrap();
        let (_, info, _) = der::next(pkcs8.secret_der()).unwrap();
        let (_, _version, rest) = der::next(info).unwrap();
        let (_, _algorithm, rest) = der::next(rest).unwrap();
        let (tag, sec1, _) = der::next(rest).unwrap();
        assert_eq!(tag, 0x04);
        pem("EC PRIVATE KEY", sec1)
    }

    #[tokio::test]
    async fn takes_sec1_ec_keys_and_recognises_pkcs1_rsa_keys() {
        let ca = Ca::new("Test CA one");
        let (cert, key) = ca.issue("bearman one");
        let (_, other_key) = ca.issue("bearman two");
        let files = Files::new(&cert, &sec1_of(&key));
        let tls = ReloadableTls::load(files.tls_files()).unwrap();
        let connector = client(&ca, &[&rustls::version::TLS13]);
        assert_eq!(
            handshake(tls.acceptor(), &connector).await.0,
            pem_der(&cert)
        );

        let files = Files::new(&cert, &sec1_of(&other_key));
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");

        // rcgen makes no RSA keys with ring; a PKCS#1 section that is not a valid key
        // shows the section is read as an RSA key (and refused as unusable, not absent).
        let files = Files::new(&cert, &pem("RSA PRIVATE KEY", b"\x30\x03\x02\x01\x00"));
        let error = ReloadableTls::load(files.tls_files()).unwrap_err();
        assert!(matches!(error, TlsError::UnusableKey { .. }), "{error:?}");
        assert!(error
            .to_string()
            .contains("key.pem holds a private key that cannot be used"));
    }

    #[test]
    fn describe_marks_an_expired_certificate() {
        let ca = Ca::new("Test CA one");
        let (cert, _) = ca.issue("bearman one");
        let der = pem_der(&cert);
        let now = describe_certificate(&der, now_unix());
        assert!(!now.contains("EXPIRED"), "{now}");
        let later = describe_certificate(&der, i64::MAX);
        assert!(later.contains(", EXPIRED, sha256 "), "{later}");
        assert!(describe_certificate(b"not der", 0).starts_with("sha256 "));
    }
}
