//! The fleet at a glance for the dashboard's rack grid: every node as
//! `[uuid, hostname, state]`, grouped by rack — one compact read instead of the whole
//! node records, bounded by [`GRID_NODES_MAX`].

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::super::error::ApiError;
use super::super::extract::QueryParams;
use super::super::AppState;
use crate::core::model::NodeFilter;
use crate::store::LIST_LIMIT_MAX;

/// The most nodes the grid answers for; a larger fleet is an error, never a cut list.
pub const GRID_NODES_MAX: usize = 100_000;

/// One rack's nodes, in uuid order: `[uuid, hostname, state]`.
#[derive(Serialize)]
pub(super) struct GridRack {
    /// `""` for nodes with no rack.
    rack: String,
    nodes: Vec<[String; 3]>,
}

#[derive(Serialize)]
pub(super) struct Grid {
    total: usize,
    racks: Vec<GridRack>,
}

pub(super) async fn fleet_grid(
    State(state): State<AppState>,
    query: QueryParams,
) -> Result<Json<Grid>, ApiError> {
    query.allow_only(&[])?;
    let mut racks: BTreeMap<String, Vec<[String; 3]>> = BTreeMap::new();
    let mut total = 0usize;
    let mut filter = NodeFilter {
        limit: LIST_LIMIT_MAX,
        ..Default::default()
    };
    // Bounded: GRID_NODES_MAX / LIST_LIMIT_MAX pages, plus the one that finds the end.
    for _ in 0..=GRID_NODES_MAX / LIST_LIMIT_MAX {
        let page = state.store.node_list(&filter).await?;
        let full = page.len() == LIST_LIMIT_MAX;
        filter.after = page.last().map(|node| node.uuid.clone());
        for node in page {
            total += 1;
            if total > GRID_NODES_MAX {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "fleet_too_large",
                    format!(
                        "the grid shows at most {GRID_NODES_MAX} nodes; list them with GET /nodes"
                    ),
                ));
            }
            racks
                .entry(node.rack.unwrap_or_default())
                .or_default()
                .push([
                    node.uuid.to_string(),
                    node.hostname,
                    node.state.as_str().to_string(),
                ]);
        }
        if !full {
            break;
        }
    }
    Ok(Json(Grid {
        total,
        racks: racks
            .into_iter()
            .map(|(rack, nodes)| GridRack { rack, nodes })
            .collect(),
    }))
}
