//! The OpenStack Nova driver for the [`Cloud`] seam: lists a host's servers, forces its
//! `nova-compute` service down and evacuates servers, authenticating with Keystone v3.
//!
//! Written against Nova's documented compute API at microversion 2.53 (services are
//! addressed by UUID through `PUT /os-services/{service_id}`; evacuate takes neither
//! `onSharedStorage` nor a target host, so the scheduler picks one) and Keystone v3
//! password authentication scoped to a project. The compute endpoint is configured or
//! taken from the token's service catalog.
//!
//! Transport: reqwest with rustls, as the Redfish driver, HTTP/1.1; `https://` or
//! `http://` as each URL (configured or from the catalog) says. Every exchange (connect
//! and the whole answer included) is bounded by [`NovaConfig::timeout`], answers larger
//! than [`RESPONSE_BYTES_MAX`] are refused, redirects are not followed (a token header
//! would follow them) and no proxy from the environment is used; one `Cloud` call makes at
//! most two authentications and two attempts per request (one retry after a 401), and
//! follows at most [`PAGES_MAX`] pages.
//!
//! TLS: certificates are verified by default against the built-in web roots, or against
//! the configured `ca_file` alone when one is given (a private cloud's CA);
//! `verify_tls = false` accepts any certificate, for a lab, and logs a warning at start.
//! A plain `http://` auth_url works but logs a warning: the password would cross the
//! network in clear text. A refused certificate is an error naming the endpoint.
//!
//! Secrets: the password and tokens never appear in errors, `Debug` output or logs; a
//! server message that echoes one has it replaced by `[redacted]`.
//!
//! Why force-down before evacuate: Nova refuses to evacuate (`ComputeServiceInUse`) until
//! the source host's service has missed heartbeats for `service_down_time` (60 s by
//! default) unless the service is forced down, and a fenced host cannot report itself down.

use crate::runtime::http_client::error_chain;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Cloud, CloudError, VmStatus};

/// The compute API microversion every request asks for: the first with service UUIDs.
pub const MICROVERSION: &str = "2.53";
/// `OpenStack-API-Version` for [`MICROVERSION`].
const COMPUTE_API_VERSION: &str = "compute 2.53";
/// Default bound on one HTTP exchange, connect included.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Bound on `servers/detail` pages followed for one host; more is an error, never a
/// silently truncated list (a VM left off the list would be left behind).
pub const PAGES_MAX: usize = 100;
/// Servers asked for per page (`limit`); Nova caps it at its `max_limit`, 1000 by default.
pub const PAGE_LIMIT_DEFAULT: usize = 1000;
/// Answers larger than this are refused: a page of 1000 servers' details is a few MiB.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Idle connections are dropped well before typical load balancers close them.
const POOL_IDLE: Duration = Duration::from_secs(10);
/// Nova and Keystone messages quoted in errors are cut to this many characters.
const MESSAGE_CHARS_MAX: usize = 512;
const REDACTED: &str = "[redacted]";
/// Tokens remembered for redaction: the current one and those it replaced lately.
const ISSUED_TOKENS_MAX: usize = 4;
const USER_AGENT: &str = "bearman-nova";
const PASSWORD_ENV_PREFIX: &str = "env:";
/// Keystone's endpoint interfaces.
const INTERFACES: [&str; 3] = ["public", "internal", "admin"];

/// Where Keystone and Nova are and who Bearman is to them. Deserializable so the daemon's
/// configuration file can hold it (`timeout_s` in the file, seconds).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NovaConfig {
    /// Keystone's URL, with or without the trailing `/v3` (`https://keystone:5000`).
    pub auth_url: String,
    pub username: String,
    /// Name of the user's domain.
    #[serde(default = "default_domain")]
    pub user_domain: String,
    /// The password itself, or `env:VAR` to read it from the environment at construction.
    pub password: String,
    /// Name of the project the token is scoped to (it needs the admin role in Nova).
    pub project: String,
    /// Name of the project's domain.
    #[serde(default = "default_domain")]
    pub project_domain: String,
    /// Catalog region of the compute endpoint; needed only when the catalog has several.
    #[serde(default)]
    pub region: Option<String>,
    /// Catalog interface of the compute endpoint: `public`, `internal` or `admin`.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Compute endpoint (`https://nova:8774/v2.1`); when set, the catalog is not consulted.
    #[serde(default)]
    pub compute_url: Option<String>,
    /// Bound on one HTTP exchange, connect included.
    #[serde(
        default = "default_timeout",
        rename = "timeout_s",
        deserialize_with = "deserialize_seconds"
    )]
    pub timeout: Duration,
    /// Verify Keystone's and Nova's TLS certificates (the default); `false` accepts any
    /// certificate, for a lab only, and logs a warning at start.
    #[serde(default = "default_verify_tls")]
    pub verify_tls: bool,
    /// PEM file of the CA(s) that sign Keystone's and Nova's certificates; when set, only
    /// these are trusted (otherwise the built-in web roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_verify_tls() -> bool {
    true
}

fn default_domain() -> String {
    "Default".to_string()
}

fn default_interface() -> String {
    "public".to_string()
}

fn default_timeout() -> Duration {
    TIMEOUT_DEFAULT
}

fn deserialize_seconds<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let seconds = f64::deserialize(deserializer)?;
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| serde::de::Error::custom("timeout_s must be a positive number of seconds"))
}

impl fmt::Debug for NovaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An `env:VAR` reference names where the secret is, not the secret.
        let password = if self.password.starts_with(PASSWORD_ENV_PREFIX) {
            self.password.as_str()
        } else {
            REDACTED
        };
        f.debug_struct("NovaConfig")
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .field("user_domain", &self.user_domain)
            .field("password", &password)
            .field("project", &self.project)
            .field("project_domain", &self.project_domain)
            .field("region", &self.region)
            .field("interface", &self.interface)
            .field("compute_url", &self.compute_url)
            .field("timeout", &self.timeout)
            .field("verify_tls", &self.verify_tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NovaConfigError {
    #[error("nova config: {field} {url:?} is not an https://host[:port]/path (or http://…) url")]
    InvalidUrl { field: &'static str, url: String },
    #[error("nova config: {field} carries credentials; they belong in username and password")]
    UrlCredentials { field: &'static str },
    #[error("nova config: cannot read ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("nova config: cannot build the http client: {reason}")]
    Client { reason: String },
    #[error("nova config: {field} must not be empty")]
    Empty { field: &'static str },
    #[error("nova config: interface {0:?} is not one of public, internal, admin")]
    Interface(String),
    #[error("nova config: timeout must be positive")]
    Timeout,
    #[error("nova config: password refers to environment variable {0} which is not set or empty")]
    PasswordEnv(String),
}

use crate::core::secret::Secret;

/// Why a Nova or Keystone exchange failed. Its text may quote what the server sent (and so
/// a token it echoed): it reaches a [`CloudError`] only through `NovaCloud::api_error`,
/// which redacts the password and the issued tokens.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    /// Connecting, sending or reading failed (`error` is reqwest's chain, without the URL).
    #[error("{method} {path}: {endpoint}: {error}")]
    Exchange {
        method: Method,
        path: String,
        endpoint: String,
        error: String,
    },
    /// The TLS handshake refused the server's certificate.
    #[error("{method} {path}: tls certificate problem with {endpoint}: {error}; give the CA that signs it as ca_file (or, for a lab only, set verify_tls = false)")]
    Certificate {
        method: Method,
        path: String,
        endpoint: String,
        error: String,
    },
    #[error("{method} {path}: no answer within {timeout:?}")]
    NoAnswer {
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("{method} {path}: answer exceeds {RESPONSE_BYTES_MAX} bytes")]
    TooLarge { method: Method, path: String },
    #[error("keystone authentication as {username} in project {project}: {error}")]
    Authentication {
        username: String,
        project: String,
        error: Box<NovaError>,
    },
    /// An HTTP failure status, described by `describe_failure`.
    #[error("{failure}")]
    Refused { failure: String },
    /// A request (`GET /os-services`) answered with a failure status.
    #[error("{request}: {failure}")]
    Status { request: String, failure: String },
    #[error("the answer carried no X-Subject-Token header")]
    NoToken,
    #[error("unreadable {what}: {error}")]
    Unreadable {
        what: &'static str,
        error: serde_json::Error,
    },
    #[error("the token's catalog has no compute endpoint with interface {interface}{}; set compute_url, region or interface", in_region(.region))]
    NoComputeEndpoint {
        interface: String,
        region: Option<String>,
    },
    #[error("the token's catalog has {} compute endpoints with interface {interface}{} (regions {}); set region or compute_url", .regions.len(), in_region(.region), .regions.join(", "))]
    SeveralComputeEndpoints {
        interface: String,
        region: Option<String>,
        /// The region of each endpoint found (`-` for none).
        regions: Vec<String>,
    },
    #[error("compute endpoint {url:?} from the catalog is not an http(s) url")]
    CatalogUrl { url: String },
    #[error("{method} {path}: nova refused a freshly issued token too ({failure}); does the user have a role in the project?")]
    TokenRefused {
        method: Method,
        path: String,
        failure: String,
    },
    #[error("nova listed server {server} on host {host}; the host filter was not applied (does the user have the admin role?)")]
    HostFilterIgnored { server: String, host: String },
    #[error("next link {href:?} carries no marker")]
    NoMarker { href: String },
    #[error("pagination did not advance past marker {marker}")]
    MarkerStuck { marker: String },
    #[error("more than {PAGES_MAX} pages of {page_limit} servers; refusing a truncated list")]
    TooManyPages { page_limit: usize },
    #[error(
        "nova knows no nova-compute service on host {host:?}; is that the host name nova uses?"
    )]
    NoComputeService { host: String },
    #[error("service id {id} is not a uuid; does nova support microversion {MICROVERSION}?")]
    ServiceIdNotUuid { id: String },
    #[error("PUT /os-services/{id} answered but the service is not forced down")]
    NotForcedDown { id: String },
    #[error("host must not be empty")]
    EmptyHost,
    #[error("server id must not be empty")]
    EmptyServerId,
}

fn in_region(region: &Option<String>) -> String {
    match region {
        Some(region) => format!(" in region {region}"),
        None => String::new(),
    }
}

/// A Keystone token and the compute endpoint it goes with.
#[derive(Debug)]
struct Session {
    token: Secret,
    compute: Url,
}

/// [`Cloud`] over OpenStack Nova.
pub struct NovaCloud {
    client: reqwest::Client,
    tokens_url: Url,
    username: String,
    user_domain: String,
    password: Secret,
    project: String,
    project_domain: String,
    region: Option<String>,
    interface: String,
    compute_url: Option<Url>,
    verify_tls: bool,
    timeout: Duration,
    page_limit: usize,
    /// The current token; the lock is held while authenticating so concurrent callers
    /// that find the token expired authenticate once, not once each.
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The last [`ISSUED_TOKENS_MAX`] tokens, so a message echoing one can be redacted.
    issued: std::sync::Mutex<Vec<Secret>>,
}

impl fmt::Debug for NovaCloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NovaCloud")
            .field("tokens_url", &self.tokens_url)
            .field("username", &self.username)
            .field("project", &self.project)
            .field("password", &self.password)
            .field("region", &self.region)
            .field("interface", &self.interface)
            .field("compute_url", &self.compute_url)
            .field("timeout", &self.timeout)
            .field("verify_tls", &self.verify_tls)
            .finish_non_exhaustive()
    }
}

impl NovaCloud {
    /// Validates `config` and resolves an `env:VAR` password from the process environment.
    /// Nothing is sent until the first call.
    /// Logs a warning when certificates are not verified or the password would travel
    /// over plain http.
    pub fn new(config: NovaConfig) -> Result<Self, NovaConfigError> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// [`NovaCloud::new`] with `env` standing in for the process environment.
    pub fn with_env(
        config: NovaConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, NovaConfigError> {
        for (field, value) in [
            ("auth_url", &config.auth_url),
            ("username", &config.username),
            ("user_domain", &config.user_domain),
            ("password", &config.password),
            ("project", &config.project),
            ("project_domain", &config.project_domain),
        ] {
            if value.trim().is_empty() {
                return Err(NovaConfigError::Empty { field });
            }
        }
        if !INTERFACES.contains(&config.interface.as_str()) {
            return Err(NovaConfigError::Interface(config.interface));
        }
        if config.timeout.is_zero() {
            return Err(NovaConfigError::Timeout);
        }
        let client = build_client(&config)?;
        let password = match config.password.strip_prefix(PASSWORD_ENV_PREFIX) {
            Some(var) => env(var)
                .filter(|value| !value.is_empty())
                .ok_or_else(|| NovaConfigError::PasswordEnv(var.to_string()))?,
            None => config.password,
        };
        let mut tokens_url = parse_http_url("auth_url", &config.auth_url)?;
        let base = tokens_url.path().trim_end_matches('/');
        let base = base.strip_suffix("/v3").unwrap_or(base);
        let path = format!("{base}/v3/auth/tokens");
        tokens_url.set_path(&path);
        let compute_url = match &config.compute_url {
            Some(url) => Some(parse_http_url("compute_url", url)?),
            None => None,
        };
        if !config.verify_tls {
            tracing::warn!(
                auth_url = %config.auth_url,
                "nova: tls certificate verification is off (verify_tls = false); whoever can \
                 intercept the connection gets the keystone password"
            );
        }
        if tokens_url.scheme() == "http" {
            tracing::warn!(
                auth_url = %config.auth_url,
                "nova: auth_url is plain http; the keystone password crosses the network in \
                 clear text (use https)"
            );
        }
        Ok(NovaCloud {
            client,
            tokens_url,
            username: config.username,
            user_domain: config.user_domain,
            password: Secret::new(password),
            project: config.project,
            project_domain: config.project_domain,
            region: config.region.filter(|region| !region.is_empty()),
            interface: config.interface,
            compute_url,
            verify_tls: config.verify_tls,
            timeout: config.timeout,
            page_limit: PAGE_LIMIT_DEFAULT,
            session: tokio::sync::Mutex::new(None),
            issued: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Servers asked for per `servers/detail` page (at least 1).
    pub fn with_page_limit(mut self, limit: usize) -> Self {
        self.page_limit = limit.max(1);
        self
    }

    /// Replaces the password and the tokens we were issued lately in `text`.
    fn redact(&self, text: &str) -> String {
        let mut text = text.replace(self.password.expose(), REDACTED);
        let tokens = self
            .issued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for token in tokens.iter() {
            text = text.replace(token.expose(), REDACTED);
        }
        text
    }

    fn api_error(&self, operation: &str, subject: &str, error: &NovaError) -> CloudError {
        CloudError::Api(self.redact(&format!("nova {operation} {subject}: {error}")))
    }

    /// One HTTP exchange, connect and the whole answer included, bounded by the timeout.
    async fn exchange(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, NovaError> {
        let path = path_and_query(&url);
        let attempt = async {
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers);
            if let Some(body) = body {
                request = request.header(CONTENT_TYPE, "application/json").body(body);
            }
            let transport = |error| self.transport_error(&method, &path, &url, error);
            let mut response = request.send().await.map_err(transport)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(transport)? {
                if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                    return Err(NovaError::TooLarge {
                        method: method.clone(),
                        path: path.clone(),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(NovaError::NoAnswer {
                method: method.clone(),
                path: path.clone(),
                timeout: self.timeout,
            }),
        }
    }

    fn transport_error(
        &self,
        method: &Method,
        path: &str,
        url: &Url,
        error: reqwest::Error,
    ) -> NovaError {
        let (method, path) = (method.clone(), path.to_string());
        if error.is_timeout() {
            return NovaError::NoAnswer {
                method,
                path,
                timeout: self.timeout,
            };
        }
        let endpoint = url.origin().ascii_serialization();
        let error = error_chain(&error.without_url());
        if self.verify_tls && url.scheme() == "https" && error.contains("certificate") {
            return NovaError::Certificate {
                method,
                path,
                endpoint,
                error,
            };
        }
        NovaError::Exchange {
            method,
            path,
            endpoint,
            error,
        }
    }

    /// Keystone v3 password authentication scoped to the project.
    async fn authenticate(&self) -> Result<Session, NovaError> {
        let request = json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": self.username,
                            "domain": { "name": self.user_domain },
                            "password": self.password.expose(),
                        }
                    }
                },
                "scope": {
                    "project": {
                        "name": self.project,
                        "domain": { "name": self.project_domain },
                    }
                }
            }
        });
        let body = request.to_string().into_bytes();
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let who = |error| NovaError::Authentication {
            username: self.username.clone(),
            project: self.project.clone(),
            error: Box::new(error),
        };
        let response = self
            .exchange(Method::POST, self.tokens_url.clone(), headers, Some(body))
            .await
            .map_err(who)?;
        if !response.is_success() {
            return Err(who(NovaError::Refused {
                failure: describe_failure(&response),
            }));
        }
        let token = response
            .header("X-Subject-Token")
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| who(NovaError::NoToken))?
            .to_string();
        let compute = match &self.compute_url {
            Some(url) => url.clone(),
            None => self.compute_from_catalog(&response.body).map_err(who)?,
        };
        Ok(Session {
            token: Secret::new(token),
            compute,
        })
    }

    /// The compute endpoint of the configured interface (and region) in a token's catalog.
    fn compute_from_catalog(&self, body: &[u8]) -> Result<Url, NovaError> {
        let token: TokenBody =
            serde_json::from_slice(body).map_err(|error| NovaError::Unreadable {
                what: "token body",
                error,
            })?;
        let mut urls: Vec<(&str, &str)> = Vec::new();
        for endpoint in token
            .token
            .catalog
            .iter()
            .filter(|service| service.kind == "compute")
            .flat_map(|service| service.endpoints.iter())
            .filter(|endpoint| endpoint.interface == self.interface)
            .filter(|endpoint| match &self.region {
                Some(region) => {
                    endpoint.region.as_ref() == Some(region)
                        || endpoint.region_id.as_ref() == Some(region)
                }
                None => true,
            })
        {
            let region = endpoint
                .region_id
                .as_deref()
                .or(endpoint.region.as_deref())
                .unwrap_or("-");
            if !urls.iter().any(|(url, _)| *url == endpoint.url) {
                urls.push((endpoint.url.as_str(), region));
            }
        }
        match urls.as_slice() {
            [] => Err(NovaError::NoComputeEndpoint {
                interface: self.interface.clone(),
                region: self.region.clone(),
            }),
            [(url, _)] => {
                parse_http_url("compute endpoint", url).map_err(|_| NovaError::CatalogUrl {
                    url: url.to_string(),
                })
            }
            several => Err(NovaError::SeveralComputeEndpoints {
                interface: self.interface.clone(),
                region: self.region.clone(),
                regions: several
                    .iter()
                    .map(|(_, region)| region.to_string())
                    .collect(),
            }),
        }
    }

    /// The current session, or a new one when there is none or the caller's `stale` one is
    /// still current (Nova just refused its token).
    async fn session(&self, stale: Option<&Arc<Session>>) -> Result<Arc<Session>, NovaError> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref() {
            let replaced = match stale {
                Some(stale) => !Arc::ptr_eq(stale, session),
                None => true,
            };
            if replaced {
                return Ok(session.clone());
            }
        }
        *current = None;
        let session = Arc::new(self.authenticate().await?);
        {
            let mut issued = self
                .issued
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if issued.len() == ISSUED_TOKENS_MAX {
                issued.remove(0);
            }
            issued.push(session.token.clone());
        }
        *current = Some(session.clone());
        Ok(session)
    }

    /// A compute API request to the session's endpoint plus `segments` (each percent-
    /// encoded as one path segment) and `query`; on 401 authenticates again once and
    /// retries. Any other status is the caller's to judge.
    async fn nova(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Reply, NovaError> {
        let body = body.map(|body| body.to_string().into_bytes());
        let first = self.session(None).await?;
        let response = self
            .nova_once(&first, &method, segments, query, body.clone())
            .await?;
        if response.status != 401 {
            return Ok(response);
        }
        tracing::info!(
            %method,
            path = %path_and_query(&compute_url(&first.compute, segments, query)),
            "nova refused the token (expired or revoked); authenticating again"
        );
        let second = self.session(Some(&first)).await?;
        let response = self
            .nova_once(&second, &method, segments, query, body)
            .await?;
        if response.status == 401 {
            return Err(NovaError::TokenRefused {
                method,
                path: path_and_query(&compute_url(&second.compute, segments, query)),
                failure: describe_failure(&response),
            });
        }
        Ok(response)
    }

    async fn nova_once(
        &self,
        session: &Session,
        method: &Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, NovaError> {
        let mut token =
            HeaderValue::from_str(session.token.expose()).map_err(|_| NovaError::NoToken)?;
        token.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("X-Auth-Token", token);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            "OpenStack-API-Version",
            HeaderValue::from_static(COMPUTE_API_VERSION),
        );
        headers.insert(
            "X-OpenStack-Nova-API-Version",
            HeaderValue::from_static(MICROVERSION),
        );
        let url = compute_url(&session.compute, segments, query);
        self.exchange(method.clone(), url, headers, body).await
    }

    async fn servers_on_host(&self, host: &str) -> Result<Vec<String>, NovaError> {
        let mut ids: Vec<String> = Vec::new();
        let mut marker: Option<String> = None;
        let limit = self.page_limit.to_string();
        for _ in 0..PAGES_MAX {
            let mut query = vec![
                ("all_tenants", "1"),
                ("host", host),
                ("limit", limit.as_str()),
            ];
            if let Some(marker) = &marker {
                query.push(("marker", marker.as_str()));
            }
            let response = self
                .nova(Method::GET, &["servers", "detail"], &query, None)
                .await?;
            if !response.is_success() {
                return Err(NovaError::Status {
                    request: "GET /servers/detail".into(),
                    failure: describe_failure(&response),
                });
            }
            let page: ServersPage =
                serde_json::from_slice(&response.body).map_err(|error| NovaError::Unreadable {
                    what: "servers page",
                    error,
                })?;
            for server in page.servers {
                // Nova drops admin-only filters such as `host` for callers without the
                // admin role instead of refusing them; a list of someone else's servers
                // must never reach evacuation.
                if let Some(other) = server.host.as_deref().filter(|other| *other != host) {
                    return Err(NovaError::HostFilterIgnored {
                        server: server.id,
                        host: other.to_string(),
                    });
                }
                if !ids.contains(&server.id) {
                    ids.push(server.id);
                }
            }
            let Some(next) = page.servers_links.iter().find(|link| link.rel == "next") else {
                return Ok(ids);
            };
            let next_marker =
                query_value(&next.href, "marker").ok_or_else(|| NovaError::NoMarker {
                    href: next.href.clone(),
                })?;
            if marker.as_deref() == Some(next_marker.as_str()) {
                return Err(NovaError::MarkerStuck {
                    marker: next_marker,
                });
            }
            marker = Some(next_marker);
        }
        Err(NovaError::TooManyPages {
            page_limit: self.page_limit,
        })
    }

    async fn force_down_services(&self, host: &str) -> Result<(), NovaError> {
        let query = [("binary", "nova-compute"), ("host", host)];
        let response = self
            .nova(Method::GET, &["os-services"], &query, None)
            .await?;
        if !response.is_success() {
            return Err(NovaError::Status {
                request: "GET /os-services".into(),
                failure: describe_failure(&response),
            });
        }
        let list: ServiceList =
            serde_json::from_slice(&response.body).map_err(|error| NovaError::Unreadable {
                what: "services list",
                error,
            })?;
        // Nova filters by exact host already; checking again costs nothing and guards
        // against a server that ignored the filter forcing down the whole cloud.
        let services: Vec<&Service> = list
            .services
            .iter()
            .filter(|service| service.host == host && service.binary == "nova-compute")
            .collect();
        if services.is_empty() {
            return Err(NovaError::NoComputeService {
                host: host.to_string(),
            });
        }
        for service in services {
            let Some(id) = service.id.as_str() else {
                return Err(NovaError::ServiceIdNotUuid {
                    id: service.id.to_string(),
                });
            };
            if service.forced_down {
                tracing::debug!(host, service = id, "nova-compute already forced down");
                continue;
            }
            tracing::info!(host, service = id, "forcing nova-compute down");
            let response = self
                .nova(
                    Method::PUT,
                    &["os-services", id],
                    &[],
                    Some(&json!({ "forced_down": true })),
                )
                .await?;
            if !response.is_success() {
                return Err(NovaError::Status {
                    request: format!("PUT /os-services/{id}"),
                    failure: describe_failure(&response),
                });
            }
            let updated: ServiceBody =
                serde_json::from_slice(&response.body).map_err(|error| NovaError::Unreadable {
                    what: "service update answer",
                    error,
                })?;
            if !updated.service.forced_down {
                return Err(NovaError::NotForcedDown { id: id.to_string() });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Cloud for NovaCloud {
    async fn vms_on_host(&self, host: &str) -> Result<Vec<String>, CloudError> {
        if host.is_empty() {
            // An empty filter would list every server in the cloud.
            return Err(self.api_error("vms_on_host", host, &NovaError::EmptyHost));
        }
        self.servers_on_host(host)
            .await
            .map_err(|error| self.api_error("vms_on_host", host, &error))
    }

    async fn force_down(&self, host: &str) -> Result<(), CloudError> {
        if host.is_empty() {
            // An empty filter would match every compute service in the cloud.
            return Err(self.api_error("force_down", host, &NovaError::EmptyHost));
        }
        self.force_down_services(host)
            .await
            .map_err(|error| self.api_error("force_down", host, &error))
    }

    async fn evacuate(&self, vm: &str) -> Result<(), CloudError> {
        if vm.is_empty() {
            return Err(self.api_error("evacuate", vm, &NovaError::EmptyServerId));
        }
        let response = self
            .nova(
                Method::POST,
                &["servers", vm, "action"],
                &[],
                Some(&json!({ "evacuate": {} })),
            )
            .await
            .map_err(|error| self.api_error("evacuate", vm, &error))?;
        if response.is_success() {
            tracing::info!(server = vm, "nova accepted the evacuation");
            return Ok(());
        }
        if let Some(host) = service_in_use_host(&response) {
            return Err(CloudError::ServiceInUse { host });
        }
        Err(self.api_error(
            "evacuate",
            vm,
            &NovaError::Status {
                request: format!("POST /servers/{vm}/action"),
                failure: describe_failure(&response),
            },
        ))
    }

    async fn vm_status(&self, vm: &str) -> Result<VmStatus, CloudError> {
        if vm.is_empty() {
            return Err(self.api_error("vm_status", vm, &NovaError::EmptyServerId));
        }
        self.server_status(vm)
            .await
            .map_err(|error| self.api_error("vm_status", vm, &error))
    }
}

impl NovaCloud {
    async fn server_status(&self, vm: &str) -> Result<VmStatus, NovaError> {
        let response = self.nova(Method::GET, &["servers", vm], &[], None).await?;
        if !response.is_success() {
            return Err(NovaError::Status {
                request: format!("GET /servers/{vm}"),
                failure: describe_failure(&response),
            });
        }
        let body: ServerBody =
            serde_json::from_slice(&response.body).map_err(|error| NovaError::Unreadable {
                what: "server",
                error,
            })?;
        Ok(VmStatus {
            host: body.server.host,
            status: body.server.status,
        })
    }
}

/// An `https://` or `http://` URL with a host, without credentials, query or fragment.
fn parse_http_url(field: &'static str, text: &str) -> Result<Url, NovaConfigError> {
    let invalid = || NovaConfigError::InvalidUrl {
        field,
        url: text.to_string(),
    };
    let url = Url::parse(text.trim()).map_err(|_| invalid())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(NovaConfigError::UrlCredentials { field });
    }
    let usable = matches!(url.scheme(), "https" | "http")
        && url.host_str().is_some_and(|host| !host.is_empty())
        && !url.cannot_be_a_base()
        && url.query().is_none()
        && url.fragment().is_none();
    if !usable {
        return Err(invalid());
    }
    Ok(url)
}

/// The TLS and pooling settings of [`NovaConfig`] as a client.
fn build_client(config: &NovaConfig) -> Result<reqwest::Client, NovaConfigError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(1)
        // A redirect would carry X-Auth-Token along; Keystone and Nova do not redirect
        // API calls, so one is reported as the failure status it is.
        .redirect(reqwest::redirect::Policy::none())
        // Direct connections, as before TLS: an HTTP_PROXY meant for other software must
        // not receive a plain-http password.
        .no_proxy();
    if !config.verify_tls {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(path) = &config.ca_file {
        builder =
            crate::runtime::http_client::trust_only_ca_file(builder, path).map_err(|reason| {
                NovaConfigError::CaFile {
                    path: path.clone(),
                    reason,
                }
            })?;
    }
    builder.build().map_err(|error| NovaConfigError::Client {
        reason: error_chain(&error),
    })
}

/// `base` (the compute endpoint) with `segments` appended, each percent-encoded as one
/// path segment, and `query` form-encoded.
fn compute_url(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// What errors name of a request: `/compute/v2.1/servers/detail?all_tenants=1&…`.
fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    }
}

/// One answer, read whole.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `ComputeServiceInUse`, which Nova raises as 400 (`badRequest`) in its evacuate handler;
/// 409 is accepted too. The host comes from the message
/// "Compute service of {host} is still in use.".
fn service_in_use_host(response: &Reply) -> Option<String> {
    if !matches!(response.status, 400 | 409) {
        return None;
    }
    let message = fault(&response.body).map(|(_, message)| message);
    let host = message.as_deref().and_then(|message| {
        let rest = message.trim().strip_prefix("Compute service of ")?;
        let (host, _) = rest.split_once(" is still in use")?;
        Some(host.trim().to_string())
    });
    match host {
        Some(host) if !host.is_empty() => Some(host),
        _ if response.text().contains("ComputeServiceInUse") => Some("unknown".to_string()),
        _ => None,
    }
}

/// The fault name and message of an OpenStack error body: Nova's
/// `{"itemNotFound": {"code": 404, "message": "..."}}` or Keystone's
/// `{"error": {"code": 401, "title": "Unauthorized", "message": "..."}}`.
fn fault(body: &[u8]) -> Option<(String, String)> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    map.iter().find_map(|(name, value)| {
        let message = value.get("message")?.as_str()?.to_string();
        let name = match value.get("title").and_then(Value::as_str) {
            Some(title) if name == "error" => title.to_string(),
            _ => name.clone(),
        };
        Some((name, message))
    })
}

/// `HTTP 404 itemNotFound: Instance … could not be found. (request req-…)`.
fn describe_failure(response: &Reply) -> String {
    let mut text = format!("HTTP {}", response.status);
    match fault(&response.body) {
        Some((name, message)) => {
            text.push_str(&format!(" {name}: {}", clip(&message)));
        }
        None if !response.body.is_empty() => {
            text.push_str(&format!(": {}", clip(&response.text())));
        }
        None => {}
    }
    let request_id = response
        .header("x-openstack-request-id")
        .or_else(|| response.header("x-compute-request-id"));
    if let Some(id) = request_id {
        text.push_str(&format!(" (request {id})"));
    }
    text
}

/// A quoted message on one line and at most [`MESSAGE_CHARS_MAX`] characters.
fn clip(text: &str) -> String {
    let mut clipped: String = text
        .trim()
        .chars()
        .take(MESSAGE_CHARS_MAX)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().count() > MESSAGE_CHARS_MAX {
        clipped.push('…');
    }
    clipped
}

/// The value of `key` in `href`'s query string, decoded.
fn query_value(href: &str, key: &str) -> Option<String> {
    let url = Url::parse(href).ok()?;
    url.query_pairs()
        .find(|(name, value)| name == key && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenInfo,
}

#[derive(Deserialize)]
struct TokenInfo {
    #[serde(default)]
    catalog: Vec<CatalogService>,
}

#[derive(Deserialize)]
struct CatalogService {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Deserialize)]
struct CatalogEndpoint {
    interface: String,
    url: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    region_id: Option<String>,
}

#[derive(Deserialize)]
struct ServerBody {
    server: ServerDetail,
}

#[derive(Deserialize)]
struct ServerDetail {
    #[serde(default)]
    status: String,
    #[serde(rename = "OS-EXT-SRV-ATTR:host", default)]
    host: Option<String>,
}

#[derive(Deserialize)]
struct ServersPage {
    servers: Vec<ServerSummary>,
    #[serde(default)]
    servers_links: Vec<Link>,
}

#[derive(Deserialize)]
struct ServerSummary {
    id: String,
    #[serde(rename = "OS-EXT-SRV-ATTR:host", default)]
    host: Option<String>,
}

#[derive(Deserialize)]
struct Link {
    href: String,
    rel: String,
}

#[derive(Deserialize)]
struct ServiceList {
    services: Vec<Service>,
}

#[derive(Deserialize)]
struct ServiceBody {
    service: Service,
}

#[derive(Deserialize)]
struct Service {
    id: Value,
    binary: String,
    host: String,
    #[serde(default)]
    forced_down: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_two_version_headers_ask_for_the_same_microversion() {
        assert_eq!(COMPUTE_API_VERSION, format!("compute {MICROVERSION}"));
    }

    #[test]
    fn service_in_use_is_recognised_in_400_and_409_bodies_only() {
        let body = r#"{"conflictingRequest": {"code": 409, "message": "Compute service of compute-1 is still in use."}}"#;
        assert_eq!(
            service_in_use_host(&response(409, body)).as_deref(),
            Some("compute-1")
        );
        let body = r#"{"badRequest": {"code": 400, "message": "Compute service of cn0007.rack3 is still in use."}}"#;
        assert_eq!(
            service_in_use_host(&response(400, body)).as_deref(),
            Some("cn0007.rack3")
        );
        let body =
            r#"{"badRequest": {"code": 400, "message": "The target host can't be the same one."}}"#;
        assert_eq!(service_in_use_host(&response(400, body)), None);
        let body = r#"{"conflictingRequest": {"code": 409, "message": "Compute service of compute-1 is still in use."}}"#;
        assert_eq!(service_in_use_host(&response(500, body)), None);
    }

    #[test]
    fn query_values_are_decoded_and_path_segments_and_queries_encoded() {
        let href = "http://nova/v2.1/servers/detail?all_tenants=1&limit=2&marker=a%2Fb-1";
        assert_eq!(query_value(href, "marker").as_deref(), Some("a/b-1"));
        assert_eq!(query_value(href, "absent"), None);
        let base = Url::parse("https://nova:8774/v2.1/").unwrap();
        let url = compute_url(&base, &["servers", "a/b ?#", "action"], &[]);
        assert_eq!(
            url.as_str(),
            "https://nova:8774/v2.1/servers/a%2Fb%20%3F%23/action"
        );
        let url = compute_url(&base, &["os-services"], &[("host", "cn 01&x=é")]);
        assert_eq!(
            path_and_query(&url),
            "/v2.1/os-services?host=cn+01%26x%3D%C3%A9"
        );
        assert_eq!(
            query_value(url.as_str(), "host").as_deref(),
            Some("cn 01&x=é")
        );
    }

    #[test]
    fn failures_quote_the_fault_name_message_and_request_id() {
        let mut answer = response(
            404,
            r#"{"itemNotFound": {"code": 404, "message": "Instance x could not be found."}}"#,
        );
        answer
            .headers
            .insert("x-openstack-request-id", HeaderValue::from_static("req-1"));
        assert_eq!(
            describe_failure(&answer),
            "HTTP 404 itemNotFound: Instance x could not be found. (request req-1)"
        );
        let keystone = response(
            401,
            r#"{"error": {"code": 401, "title": "Unauthorized", "message": "nope"}}"#,
        );
        assert_eq!(describe_failure(&keystone), "HTTP 401 Unauthorized: nope");
        let long = "x".repeat(MESSAGE_CHARS_MAX + 10);
        assert_eq!(
            describe_failure(&response(502, &long)).chars().count(),
            "HTTP 502: ".len() + MESSAGE_CHARS_MAX + 1
        );
    }
}
