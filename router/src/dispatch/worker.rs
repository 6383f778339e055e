//! One worker's shared state: its plan, its status snapshot (written by its supervisor;
//! `draining` also by the operator), its load counter (one [`LoadTicket`](super::LoadTicket)
//! per request it owns), its [`Vitals`] (written by its connection), the prefixes its prompt
//! cache most likely holds, and its last words. Also its [`WorkerState`] and [`Shape`] as
//! `/workers` and `/metrics` show them.
//!
//! The pool holds one [`Worker`] per configured worker; the supervisor, the placement code
//! and the pool's views read it. Nothing here decides anything: the questions a [`Worker`]
//! answers (does it take work, does it answer, is it packable with room) are read from its
//! state.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use llamapool_common::protocol::WorkerInfo;
use llamapool_common::settings::WorkerPlan;
use llamapool_common::RequestId;
use tokio::sync::{mpsc, Notify};

use super::affinity::PrefixTable;
use super::connection::ConnCommand;
use super::poison::last_words;
use super::vitals::Vitals;
use super::Load;

/// An adaptive worker's shape, as its last progress reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Its threads over all of its wide CPUs.
    Wide,
    /// One thread on its own CPU.
    Narrow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Starting,
    Ready,
    /// Ready, but the operator asked for no new work; in-flight requests finish.
    Draining,
    /// Alive but making no progress: it is being killed and will be respawned.
    Hung,
    Restarting,
    /// Died too often in a short time (a crash loop): retried slowly.
    Failed,
    Stopped,
}

impl WorkerState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [Self; 7] = [
        Self::Starting,
        Self::Ready,
        Self::Draining,
        Self::Hung,
        Self::Restarting,
        Self::Failed,
        Self::Stopped,
    ];

    /// The name `/workers` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Hung => "hung",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Status {
    pub state: WorkerState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub info: Option<WorkerInfo>,
    pub last_error: Option<String>,
    pub commands: Option<mpsc::UnboundedSender<ConnCommand>>,
    /// The operator asked for no new work (drain, or a restart in progress).
    pub draining: bool,
    /// It reached ready, died, and is being started again: requests wait for it rather than
    /// fail (until a start of it fails).
    pub respawning: bool,
}

#[derive(Debug)]
pub(super) struct Worker {
    pub plan: RwLock<WorkerPlan>,
    pub status: RwLock<Status>,
    /// Requests dispatched to this worker and not yet finished.
    pub load: Load,
    pub vitals: Vitals,
    /// Wakes the supervisor to stop the worker (it is then respawned at once).
    pub restart: Notify,
    /// What its prompt cache most likely holds (cleared when it starts).
    pub prefixes: PrefixTable,
    /// The last lines its process wrote to stderr: its last words when it dies.
    pub stderr_tail: Mutex<VecDeque<String>>,
}

/// Lines of a worker's stderr kept as its last words.
const STDERR_TAIL_LINES: usize = 6;

impl Worker {
    /// A worker to be started by `plan`: starting, nothing in flight, nothing cached.
    pub fn new(plan: WorkerPlan) -> Self {
        Self {
            plan: RwLock::new(plan),
            status: RwLock::new(Status {
                state: WorkerState::Starting,
                pid: None,
                restarts: 0,
                info: None,
                last_error: None,
                commands: None,
                draining: false,
                respawning: false,
            }),
            load: Load::default(),
            vitals: Vitals::default(),
            restart: Notify::new(),
            prefixes: PrefixTable::default(),
            stderr_tail: Mutex::new(VecDeque::new()),
        }
    }

    pub fn status(&self) -> Status {
        self.status
            .read()
            .expect("status lock is never poisoned")
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().expect("status lock is never poisoned"));
    }

    pub fn plan(&self) -> WorkerPlan {
        self.plan
            .read()
            .expect("plan lock is never poisoned")
            .clone()
    }

    /// Whether it serves embeddings (its plan says so), read without copying the plan.
    pub fn is_embedding(&self) -> bool {
        self.plan
            .read()
            .expect("plan lock is never poisoned")
            .embedding
            .is_some()
    }

    /// Its last progress said it is packable (adaptive, no foreign work on its CPUs), and it
    /// has a sequence slot free beyond the `load` it holds.
    pub fn is_packable_with_room(&self, load: usize) -> bool {
        let packable = self.vitals.stats().is_some_and(|s| s.packable);
        packable && load < self.slots()
    }

    /// Sequence slots of the running worker (0 before its first start).
    pub fn slots(&self) -> usize {
        self.status().info.map_or(0, |info| info.slots as usize)
    }

    /// Ready and not draining: may take new work.
    pub fn takes_work(&self) -> bool {
        let s = self.status();
        s.state == WorkerState::Ready && !s.draining
    }

    /// Asks its connection to abort request `id` (idempotent; nothing when it has none).
    pub fn abort(&self, id: RequestId) {
        if let Some(tx) = self.status().commands {
            let _ = tx.send(ConnCommand::Abort(id));
        }
    }

    /// Keeps `line` among its last words.
    pub fn remember_stderr(&self, line: String) {
        let mut tail = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// Its last words, joined (and forgotten: a new process starts afresh).
    pub fn take_last_words(&self) -> String {
        let lines: Vec<String> = self
            .stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        last_words(&lines)
    }

    /// Ready, and heard from recently (a hung worker stops counting before the watchdog acts).
    pub fn answers(&self, window: Duration) -> bool {
        self.status().state == WorkerState::Ready
            && self.vitals.answers_within(window, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_what_workers_shows() {
        for state in WorkerState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }
}
