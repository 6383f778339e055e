//! What a gateway in front of several nodes reads from this one, beyond `/health` (503 from
//! the start of a drain) and `/metrics` (vLLM's load gauges, `crate::metrics::model_server`):
//! `GET /v1/loads`, the load report the Shepherd Model Gateway (`smg`) polls from every
//! engine for its load-aware policies (power-of-two, least-load, cache-aware's fallback and
//! its overload guard). Without it smg sees only its own count of requests in flight.
//!
//! The node answers as itself: `/v1/models` says `owned_by: "llamapool"`, and `/version` and
//! `/server_info` stay 404, since smg takes an answer on either as vLLM or SGLang.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::SharedState;
use crate::dispatch::Pool;
use crate::metrics::model_server::NodeLoad;
use crate::metrics::Gauges;

/// `GET /v1/loads`' body: smg's `WorkerLoadResponse`, one entry (this node has no
/// data-parallel ranks).
#[derive(Debug, Serialize)]
pub struct LoadsBody {
    pub version: String,
    pub dp_rank_count: u32,
    pub loads: [RankLoad; 1],
}

/// The node's load in smg's terms.
#[derive(Debug, Serialize)]
pub struct RankLoad {
    pub dp_rank: u32,
    /// Requests holding a sequence in a worker.
    pub num_running_reqs: u64,
    /// Requests accepted and not yet running.
    pub num_waiting_reqs: u64,
    pub num_total_reqs: u64,
    /// KV cells held, of `max_total_num_tokens`.
    pub num_used_tokens: u64,
    pub max_total_num_tokens: u64,
    /// `num_used_tokens / max_total_num_tokens`, 0 to 1.
    pub token_usage: f64,
    /// Sequence slots of every worker.
    pub max_running_requests: u64,
}

impl LoadsBody {
    pub fn new(load: &NodeLoad) -> Self {
        Self {
            version: format!("llamapool-{}", env!("CARGO_PKG_VERSION")),
            dp_rank_count: 1,
            loads: [RankLoad {
                dp_rank: 0,
                num_running_reqs: load.running,
                num_waiting_reqs: load.waiting,
                num_total_reqs: load.running + load.waiting,
                num_used_tokens: load.kv_cells_used,
                max_total_num_tokens: load.kv_cells,
                token_usage: load.kv_cache_usage(),
                max_running_requests: load.slots,
            }],
        }
    }
}

/// `GET /v1/loads` (its query, smg's `include=`, is ignored): the whole node's load.
pub async fn loads(State(state): State<SharedState>) -> Json<LoadsBody> {
    Json(LoadsBody::new(&NodeLoad::of(&node_gauges(&state))))
}

/// Every pool of the node: the one model's, or each loaded model's.
pub fn node_pools(state: &SharedState) -> Vec<Pool> {
    match &state.models {
        Some(registry) => registry
            .listing()
            .iter()
            .filter_map(|m| m.state.as_ref())
            .map(|s| s.pool.clone())
            .collect(),
        None => vec![state.pool.clone()],
    }
}

/// The gauges of every pool of the node ([`node_pools`]).
pub fn node_gauges(state: &SharedState) -> Vec<Gauges> {
    node_pools(state).iter().map(Pool::gauges).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_fields_smg_reads() {
        let body = LoadsBody::new(&NodeLoad {
            running: 3,
            waiting: 2,
            kv_cells_used: 512,
            kv_cells: 2048,
            slots: 8,
        });
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["dp_rank_count"], 1);
        let load = &json["loads"][0];
        assert_eq!(load["dp_rank"], 0);
        assert_eq!(load["num_running_reqs"], 3);
        assert_eq!(load["num_waiting_reqs"], 2);
        assert_eq!(load["num_total_reqs"], 5);
        assert_eq!(load["token_usage"], 0.25);
        assert_eq!(load["max_running_requests"], 8);
        assert!(json["version"].as_str().unwrap().starts_with("llamapool-"));
    }
}
