//! Dashboard sessions: a login checks the token and issues a session cookie
//! (`core::session`), audited; each request's cookie is checked against the token as the
//! store holds it now, so a deleted or expired token ends its sessions on every replica.

use super::{App, AppError};
use crate::core::model::{Action, ApiToken, NewEvent, TimestampMs};
use crate::core::session;

/// A session just opened: the cookie value to set (it carries no secret) and its token.
pub struct OpenedSession {
    pub cookie_value: String,
    pub expires_at_ms: TimestampMs,
    pub token: ApiToken,
}

impl App {
    /// Logs in with a token secret: the token must be valid now; the session lasts
    /// `session_max_s`, never past the token's own expiry. Audited as `session_opened`.
    pub async fn session_open(
        &self,
        secret: &str,
        session_max_s: u64,
    ) -> Result<OpenedSession, AppError> {
        let token = self.token_authenticate(secret).await?;
        let now = self.now_ms();
        let expires_at_ms = session::expiry(now, session_max_s, token.expires_at_ms);
        let cookie_value = session::issue(&token.name, &token.secret_sha256, expires_at_ms);
        let event = NewEvent::global(
            now,
            &format!("token:{}", token.name),
            Action::SessionOpened,
            format!(
                "dashboard login with token {} (role {}) until {expires_at_ms} ms",
                token.name,
                token.role.as_str()
            ),
        );
        self.store.event_append(&[event]).await?;
        self.token_record_use(&token).await;
        Ok(OpenedSession {
            cookie_value,
            expires_at_ms,
            token,
        })
    }

    /// The token behind a session cookie, if the cookie is genuine, in time, and its
    /// token still exists and has not expired.
    pub async fn session_authenticate(&self, cookie_value: &str) -> Result<ApiToken, AppError> {
        let claim = session::parse(cookie_value).ok_or(AppError::SessionInvalid)?;
        let token = self
            .store
            .token_list()
            .await?
            .into_iter()
            .find(|token| token.name == claim.token_name)
            .ok_or(AppError::SessionInvalid)?;
        let now = self.now_ms();
        match claim.check(&token.secret_sha256, now) {
            Ok(()) => {}
            Err(session::Refusal::Invalid) => return Err(AppError::SessionInvalid),
            Err(session::Refusal::Expired) => return Err(AppError::SessionExpired),
        }
        if token.is_expired(now) {
            return Err(AppError::TokenExpired {
                name: token.name,
                expired_at_ms: token.expires_at_ms.unwrap_or_default(),
            });
        }
        Ok(token)
    }

    /// Records a logout of a valid session (audited as `session_closed`); nothing for a
    /// cookie that is not one (the caller clears it either way).
    pub async fn session_close(&self, cookie_value: &str) -> Result<(), AppError> {
        let Ok(token) = self.session_authenticate(cookie_value).await else {
            return Ok(());
        };
        let event = NewEvent::global(
            self.now_ms(),
            &format!("token:{}", token.name),
            Action::SessionClosed,
            format!("dashboard logout of token {}", token.name),
        );
        Ok(self.store.event_append(&[event]).await?)
    }
}
