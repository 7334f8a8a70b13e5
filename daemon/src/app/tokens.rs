//! API tokens: created (the only time a secret is shown), listed, deleted. Only the
//! sha256 of a secret is ever stored.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{App, AppError};
use crate::core::ipam;
use crate::core::model::{
    Action, ApiToken, NewEvent, TimestampMs, TokenRole, TOKEN_USE_RECORD_INTERVAL_MS,
};
use crate::core::validate::FieldError;

/// Every token secret starts with this, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "bm_";

/// A freshly created token: the only time its secret is ever shown.
#[derive(Serialize, Deserialize, Debug)]
pub struct NewToken {
    pub name: String,
    pub role: TokenRole,
    pub secret: String,
    /// When it stops being accepted; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<TimestampMs>,
}

/// What the store keeps of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token secret from 32 random bytes of the operating system's generator.
fn generate_secret() -> Result<String, AppError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|error| AppError::RandomSource(std::io::Error::other(error.to_string())))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

impl App {
    /// Creates a token; the API and `bearman token create` (on the store directly, for
    /// the first admin token) both call this.
    pub async fn token_create(
        &self,
        actor: &str,
        name: &str,
        role: TokenRole,
    ) -> Result<NewToken, AppError> {
        self.token_create_expiring(actor, name, role, None).await
    }

    /// Creates a token that is refused from `expires_at_ms` on (`None`: never); an expiry
    /// not in the future is refused.
    pub async fn token_create_expiring(
        &self,
        actor: &str,
        name: &str,
        role: TokenRole,
        expires_at_ms: Option<TimestampMs>,
    ) -> Result<NewToken, AppError> {
        let now = self.now_ms();
        if expires_at_ms.is_some_and(|at| at <= now) {
            return Err(FieldError {
                field: "expires_at_ms".into(),
                problem: "must be in the future".into(),
            }
            .into());
        }
        if !ipam::is_valid_name(name) {
            return Err(FieldError {
                field: "name".into(),
                problem: "must be 1-63 characters of [a-z0-9-_.]".into(),
            }
            .into());
        }
        let secret = generate_secret()?;
        let event = NewEvent::global(
            now,
            actor,
            Action::TokenCreate,
            match expires_at_ms {
                Some(at) => format!(
                    "token {name} with role {} expiring at {at} ms",
                    role.as_str()
                ),
                None => format!("token {name} with role {}", role.as_str()),
            },
        );
        self.store
            .token_create(
                name,
                role,
                &hash_secret(&secret),
                now,
                expires_at_ms,
                &[event],
            )
            .await?;
        Ok(NewToken {
            name: name.to_string(),
            role,
            secret,
            expires_at_ms,
        })
    }

    /// The token whose secret this is, if it is known and not expired. Its use is
    /// recorded separately ([`App::token_record_use`]), once the request is allowed.
    pub async fn token_authenticate(&self, secret: &str) -> Result<ApiToken, AppError> {
        let token = self
            .store
            .token_find(&hash_secret(secret))
            .await?
            .ok_or(AppError::TokenInvalid)?;
        if token.is_expired(self.now_ms()) {
            return Err(AppError::TokenExpired {
                name: token.name,
                expired_at_ms: token.expires_at_ms.unwrap_or_default(),
            });
        }
        Ok(token)
    }

    /// Records that `token` made an allowed request now, at most once per
    /// [`TOKEN_USE_RECORD_INTERVAL_MS`]; a failure to record it is logged, never a refusal.
    pub async fn token_record_use(&self, token: &ApiToken) {
        let now = self.now_ms();
        if !token.use_record_due(now) {
            return;
        }
        if let Err(error) = self
            .store
            .token_record_use(token.id, now, TOKEN_USE_RECORD_INTERVAL_MS)
            .await
        {
            tracing::warn!(token = %token.name, error = %error, "cannot record the token's use");
        }
    }

    pub async fn token_delete(&self, actor: &str, name: &str) -> Result<(), AppError> {
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::TokenDelete,
            format!("token {name}"),
        );
        Ok(self.store.token_delete(name, &[event]).await?)
    }
}
