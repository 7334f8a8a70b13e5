//! IP pools: list, show (with size and allocations), create, delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, NamePath};
use super::super::AppState;
use crate::app::pools::PoolDetail;
use crate::core::model::IpPool;

pub(super) async fn pool_list(
    State(state): State<AppState>,
) -> Result<Json<Vec<IpPool>>, ApiError> {
    Ok(Json(state.store.pool_list().await?))
}

pub(super) async fn pool_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<PoolDetail>, ApiError> {
    state
        .app
        .pool_detail(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("ip pool {name} does not exist")))
}

pub(super) async fn pool_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(pool): JsonBody<IpPool>,
) -> Result<(StatusCode, Json<IpPool>), ApiError> {
    let pool = state.app.pool_create(&caller.actor(), pool).await?;
    Ok((StatusCode::CREATED, Json(pool)))
}

pub(super) async fn pool_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.pool_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
