//! The CLI's client for the admin API: one request per connection over the boot
//! protocol's minimal HTTP client, bounded in time, errors turned into readable lines.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bearman_proto::http::{self, HttpUrl};
use bearman_proto::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A power action is answered once the BMC read it back, behind the daemon's BMC guard
/// (queue and call bounds) and readbacks: minutes at worst.
pub const POWER_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

pub struct ApiClient {
    base: HttpUrl,
    token: Option<String>,
}

impl ApiClient {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<ApiClient> {
        let base = HttpUrl::parse(url).map_err(|e| anyhow!("--url: {e}"))?;
        Ok(ApiClient { base, token })
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
            let mut stream = bearman::runtime::system::connect_tcp(&authority)
                .await
                .with_context(|| format!("cannot connect to bearman at {authority}"))?;
            let authorization = self.token.as_ref().map(|t| format!("Bearer {t}"));
            let mut headers = vec![
                ("Content-Type", "application/json"),
                ("Accept", "application/json"),
            ];
            if let Some(value) = &authorization {
                headers.push(("Authorization", value.as_str()));
            }
            http::send(
                &mut stream,
                method,
                &authority,
                &full_path,
                &headers,
                body.as_deref(),
            )
            .await
            .with_context(|| format!("{method} {full_path}"))
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            anyhow!(
                "{method} {full_path}: no answer within {}s",
                timeout.as_secs()
            )
        })?
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
