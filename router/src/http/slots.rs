//! llama-server's views of the server: `GET /props` and `GET /slots`, and the pool-wide slot
//! numbering the native results' `id_slot` uses.
//!
//! Slots: llama-server has one pool of slots; here each worker has its own. `/slots` lists
//! them worker-major (worker 0's slots first), numbered 0 to N-1 over the pool, built from the
//! configuration and the load each worker last pushed (`Progress`); nothing is asked of a
//! worker at request time. `id_slot` in a result is the first slot id of the worker that
//! finished it (which of its slots ran it is not reported by a worker).

use crate::http::Scoped;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llamapool_common::{StoppingParams, Token};

use super::SharedState;
use crate::error::ApiError;
use crate::openai::llama_server::{DefaultSettings, GenerationSettings, PropsBody, SlotBody};

/// Each worker's slot count, in worker order: maps a worker to its first pool-wide slot id.
#[derive(Debug, Clone)]
pub(super) struct SlotIds(Vec<u32>);

impl SlotIds {
    /// The pool's numbering now.
    pub(super) fn of(state: &SharedState) -> Self {
        Self(state.pool.views().iter().map(|v| v.slots).collect())
    }

    pub(super) fn first_of(&self, worker: usize) -> u32 {
        self.0.iter().take(worker).sum()
    }

    /// [`SlotIds::first_of`]; `None` for a worker the pool does not have.
    pub(super) fn of_worker(&self, worker: usize) -> Option<u32> {
        (worker < self.0.len()).then(|| self.first_of(worker))
    }
}

/// The first pool-wide slot id of `worker` now; `None` for a worker the pool does not have.
pub(super) fn first_slot_of(state: &SharedState, worker: usize) -> Option<u32> {
    SlotIds::of(state).of_worker(worker)
}

/// The tokens `ignore_eos` bans: the served model's end-of-generation tokens, as a ready worker
/// reported them; none without `ignore_eos` (or while no worker is ready).
pub(super) fn ignored_eog(state: &SharedState, stopping: &StoppingParams) -> Vec<Token> {
    if !stopping.ignore_eos {
        return Vec::new();
    }
    state
        .pool
        .worker_info()
        .map(|info| info.model.eog_tokens)
        .unwrap_or_default()
}

/// `GET /props`: the server's defaults and what it serves. `default_generation_settings.params`
/// are the `[generation]` defaults; `n_ctx` is the largest per-sequence context of the ready
/// workers (`null` while none is ready); `chat_template` the one the workers use.
pub async fn props(Scoped(state): Scoped) -> Response {
    if let Some(registry) = &state.models {
        return Json(RouterProps {
            role: "router",
            max_instances: registry.policy().models_max,
            models_autoload: registry.policy().autoload,
            model_alias: "llamapool",
            model_path: "none",
            build_info: crate::openai::FINGERPRINT,
        })
        .into_response();
    }
    let info = state.pool.worker_info();
    let defaults = &state.served.defaults;
    let stopping = StoppingParams {
        max_tokens: defaults.max_tokens(),
        ..StoppingParams::default()
    };
    let settings = DefaultSettings {
        params: GenerationSettings::new(&defaults.sampling(), &stopping, false, &[]),
        n_ctx: info.as_ref().map(|i| i.n_ctx_per_seq),
    };
    let template = info.map_or_else(String::new, |i| i.model.chat_template);
    let body = PropsBody::new(
        settings,
        state.pool.total_slots(),
        (&state.served.alias, &state.model_path),
        &template,
    );
    Json(body).into_response()
}

/// `GET /props` without `?model=` when the router serves several models: llama-server's
/// router props.
#[derive(Debug, serde::Serialize)]
struct RouterProps {
    role: &'static str,
    max_instances: usize,
    models_autoload: bool,
    model_alias: &'static str,
    model_path: &'static str,
    build_info: &'static str,
}

/// `GET /slots`: one entry per slot of the pool, worker-major, ids 0 to N-1. `is_processing`
/// counts a worker's first `running` slots as busy (a worker reports how many sequences run,
/// not which); `n_ctx` is its per-sequence context (before its first start: the configured
/// `context / slots`, so a worker still loading shows what it will hold). 501 with
/// `server.slots_endpoint = false` (llama-server's `--no-slots`).
pub async fn slots(Scoped(state): Scoped) -> Result<Json<Vec<SlotBody>>, ApiError> {
    if !state.slots_endpoint {
        return Err(ApiError::not_supported(
            "This server does not support slots endpoint. Start it with `--slots`",
        ));
    }
    let mut slots = Vec::new();
    for view in state.pool.views() {
        let running = view.running.unwrap_or(0);
        for j in 0..view.slots {
            slots.push(SlotBody {
                id: u32::try_from(slots.len()).unwrap_or(u32::MAX),
                id_worker: view.id,
                n_ctx: view
                    .n_ctx_per_seq
                    .unwrap_or(view.context / view.slots.max(1)),
                speculative: false,
                is_processing: j < running,
            });
        }
    }
    Ok(Json(slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_are_worker_major() {
        assert_eq!(SlotIds(vec![2, 3, 1]).first_of(0), 0);
        assert_eq!(SlotIds(vec![2, 3, 1]).first_of(2), 5);
    }
}
