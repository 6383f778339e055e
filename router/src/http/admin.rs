//! The operator's routes (behind the API key when one is set): drain a worker, restart one
//! (drain, then respawn), and reload the configuration with a rolling restart, one worker at
//! a time, so a new model file or worker setting takes effect without a failed request.

use std::sync::Arc;

use crate::http::Scoped;
use axum::extract::{Path, State};
use axum::Json;
use llamapool_common::settings::WorkerPlan;
use serde::Serialize;

use super::info::WorkersBody;
use super::SharedState;
use crate::dispatch::{LaunchConfig, WorkerState, WorkerView};
use crate::error::ApiError;

/// Reads the configuration again (the same file, environment and flags the router started
/// with) and plans the workers from it.
pub trait ReloadSource: std::fmt::Debug + Send + Sync {
    fn reload(&self) -> Result<(Vec<WorkerPlan>, LaunchConfig), String>;
}

pub type Reloader = Arc<dyn ReloadSource>;

/// A drain's answer: the worker and its new state.
#[derive(Debug, Serialize)]
pub struct DrainedBody {
    pub worker: usize,
    pub state: WorkerState,
}

/// A restart's answer: the worker as `/workers` shows it now.
#[derive(Debug, Serialize)]
pub struct RestartedBody {
    pub worker: Option<WorkerView>,
}

/// `POST /admin/drain`'s answer.
#[derive(Debug, Serialize)]
pub struct NodeDrainBody {
    pub draining: bool,
    /// False when an earlier signal or call had already started it.
    pub started_now: bool,
}

/// `POST /admin/drain`: the whole node drains as on SIGTERM (`/health` 503 at once, new
/// requests served for `server.drain_notice_secs`, then the listeners close, the requests in
/// flight finish and the router exits).
pub async fn drain_node(State(state): State<SharedState>) -> Json<NodeDrainBody> {
    let started_now = state.drain.start();
    if started_now {
        tracing::info!("drain started by POST /admin/drain");
    }
    Json(NodeDrainBody {
        draining: true,
        started_now,
    })
}

/// `POST /admin/workers/{id}/drain`: no new work for that worker; what it runs finishes.
pub async fn drain(
    Scoped(state): Scoped,
    Path(id): Path<String>,
) -> Result<Json<DrainedBody>, ApiError> {
    let id = worker_id(&id)?;
    state.pool.drain(id)?;
    Ok(Json(DrainedBody {
        worker: id,
        state: WorkerState::Draining,
    }))
}

/// `POST /admin/workers/{id}/restart`: drain, then respawn; answers when the new process is
/// ready.
pub async fn restart(
    Scoped(state): Scoped,
    Path(id): Path<String>,
) -> Result<Json<RestartedBody>, ApiError> {
    let id = worker_id(&id)?;
    state.pool.restart(id, state.drain_timeout).await?;
    let worker = state.pool.views().into_iter().nth(id);
    Ok(Json(RestartedBody { worker }))
}

/// `POST /admin/reload`: re-reads the configuration and restarts every worker in turn.
pub async fn reload(State(state): State<SharedState>) -> Result<Json<WorkersBody>, ApiError> {
    let reloader = state.reloader.clone().ok_or_else(|| {
        ApiError::reload_failed("this server was started without a reloadable configuration")
    })?;
    let (plans, launch) = reloader.reload().map_err(ApiError::reload_failed)?;
    state
        .pool
        .reload(plans, launch, state.drain_timeout)
        .await?;
    Ok(Json(WorkersBody {
        workers: state.pool.views(),
    }))
}

/// A worker id from the path; anything but a number names no worker (404 in the error shape).
fn worker_id(raw: &str) -> Result<usize, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::no_route("POST", &format!("/admin/workers/{raw}")))
}
