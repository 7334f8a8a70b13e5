//! Flavors: list, show, create, replace, delete.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::super::auth::Caller;
use super::super::error::ApiError;
use super::super::extract::{JsonBody, NamePath};
use super::super::AppState;
use crate::core::model::Flavor;

pub(super) async fn flavor_list(
    State(state): State<AppState>,
) -> Result<Json<Vec<Flavor>>, ApiError> {
    Ok(Json(state.store.flavor_list().await?))
}

pub(super) async fn flavor_show(
    State(state): State<AppState>,
    NamePath(name): NamePath,
) -> Result<Json<Flavor>, ApiError> {
    state
        .store
        .flavor_get(&name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("flavor {name} does not exist")))
}

pub(super) async fn flavor_create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(flavor): JsonBody<Flavor>,
) -> Result<(StatusCode, Json<Flavor>), ApiError> {
    let flavor = state.app.flavor_create(&caller.actor(), flavor).await?;
    Ok((StatusCode::CREATED, Json(flavor)))
}

pub(super) async fn flavor_replace(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
    JsonBody(flavor): JsonBody<Flavor>,
) -> Result<Json<Flavor>, ApiError> {
    Ok(Json(
        state
            .app
            .flavor_replace(&caller.actor(), &name, flavor)
            .await?,
    ))
}

pub(super) async fn flavor_delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    NamePath(name): NamePath,
) -> Result<StatusCode, ApiError> {
    state.app.flavor_delete(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
