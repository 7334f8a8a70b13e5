//! API tokens: created (the only time a secret is shown), listed, deleted. Only the
//! sha256 of a secret is ever stored.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{App, AppError};
use crate::core::ipam;
use crate::core::model::{Action, NewEvent, TokenRole};
use crate::core::validate::FieldError;

/// Every token secret starts with this, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "bm_";

/// A freshly created token: the only time its secret is ever shown.
#[derive(Serialize, Deserialize, Debug)]
pub struct NewToken {
    pub name: String,
    pub role: TokenRole,
    pub secret: String,
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
        if !ipam::is_valid_name(name) {
            return Err(FieldError {
                field: "name".into(),
                problem: "must be 1-63 characters of [a-z0-9-_.]".into(),
            }
            .into());
        }
        let secret = generate_secret()?;
        let now = self.now_ms();
        let event = NewEvent::global(
            now,
            actor,
            Action::TokenCreate,
            format!("token {name} with role {}", role.as_str()),
        );
        self.store
            .token_create(name, role, &hash_secret(&secret), now, &[event])
            .await?;
        Ok(NewToken {
            name: name.to_string(),
            role,
            secret,
        })
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
