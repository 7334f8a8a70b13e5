//! API tokens: list, create (the secret shown once), delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, NamePath};
use super::super::AppState;
use crate::app::tokens::NewToken;
use crate::core::model::{ApiToken, TokenRole};

pub(super) async fn token_list(
    State(state): State<AppState>,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    Ok(Json(state.store.token_list().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenRequest {
    name: String,
    role: TokenRole,
    /// When the token stops being accepted (ms since the epoch); absent: never.
    #[serde(default)]
    expires_at_ms: Option<i64>,
}

pub(super) async fn token_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    let token = state
        .app
        .token_create_expiring(
            &caller.actor(),
            &request.name,
            request.role,
            request.expires_at_ms,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(token)))
}

pub(super) async fn token_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.token_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
