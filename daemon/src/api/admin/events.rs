//! The audit trail, newest first; `before` pages back, `after` follows it forward (the
//! dashboard's live view).

use axum::extract::State;
use axum::Json;

use super::super::error::ApiError;
use super::super::extract::QueryParams;
use super::super::AppState;
use crate::core::model::{Event, EventFilter};
use bearman_proto::uuid::NodeUuid;

pub(super) async fn event_list(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<Vec<Event>>, ApiError> {
    query.allow_only(&["node", "limit", "before", "after"])?;
    let node_uuid = query
        .get("node")
        .map(|text| {
            NodeUuid::parse(text).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("query parameter node: {e}"))
            })
        })
        .transpose()?;
    let filter = EventFilter {
        node_uuid,
        before_id: query.parse("before")?,
        after_id: query.parse("after")?,
        limit: query.parse::<usize>("limit")?.unwrap_or(100),
    };
    Ok(Json(state.store.event_list(&filter).await?))
}
