//! Placement: where a request goes, and where it goes again. Mechanism only: the routing
//! policy ([`super::routing`]) picks the worker, the poison policy ([`super::poison`]) judges
//! a dead worker's requests, the rebalancing policy ([`super::rebalance`]) plans moves.
//!
//! - Sending: [`Inner::send_to_best`] weighs the workers that take work, sends the request to
//!   the chosen one's connection and moves its load ticket there; [`Inner::place`] parks it
//!   when none takes work but one is coming back, and [`Inner::unpark`] (a worker became
//!   ready) and the `sweep_parked` task send it on or end it.
//! - Moving off a dead worker: [`Inner::requeue`] (called by the supervisor) moves each
//!   request, suspects on probation one fingerprint at a time (the `probation` task).
//! - Rebalancing: the `rebalance` task asks the policy every [`rebalance::INTERVAL`] and
//!   [`Inner::rebalance_once`] makes the move.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::affinity::PrefixChain;
use super::connection::{ConnCommand, InFlight};
use super::poison::{DeathCause, Fingerprint, Suspect, Verdict};
use super::rebalance::{self, Move, Seat};
use super::routing::{choose, Candidate, Routing};
use super::shared::Inner;
use super::worker::WorkerState;
use super::{DispatchError, LoadTicket, StreamEvent};

/// How many times a request may move off a worker that died of an inside cause: a safety
/// net only, since the poison policy convicts a request after two such deaths.
const MAX_MOVES: u32 = 8;

impl Inner {
    /// The workers that take work and fit `min_ctx`, weighed by [`choose`]: packing first,
    /// then prefix affinity for `prefix` (empty when affinity is off), then the least loaded.
    pub fn best_worker(
        &self,
        exclude: &[usize],
        min_ctx: u32,
        prefix: &[u64],
    ) -> Option<(usize, Routing)> {
        let candidates: Vec<Candidate> = self
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| !exclude.contains(i) && w.takes_work())
            .filter(|(_, w)| {
                w.status()
                    .info
                    .is_some_and(|info| info.embedding.is_none() && info.n_ctx_per_seq >= min_ctx)
            })
            .map(|(index, w)| {
                let (matched, cached) = if prefix.is_empty() {
                    (0, 0)
                } else {
                    w.prefixes.weigh(prefix)
                };
                let load = w.load.load(Ordering::Acquire);
                Candidate {
                    index,
                    load,
                    matched,
                    cached,
                    packable: w.is_packable_with_room(load),
                }
            })
            .collect();
        let (index, routing) = choose(&candidates, self.routing.max_load_gap)?;
        let routing = match routing {
            Routing::NoPrefix if prefix.is_empty() => Routing::LeastLoaded,
            other => other,
        };
        Some((index, routing))
    }

    /// The embedding worker that takes work with the fewest calls in flight (the first of
    /// equals), not among `exclude`.
    pub fn least_loaded_embedder(&self, exclude: &[usize]) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(i, w)| !exclude.contains(i) && w.takes_work())
            .filter(|(_, w)| w.status().info.is_some_and(|info| info.embedding.is_some()))
            .min_by_key(|(_, w)| w.load.load(Ordering::Acquire))
            .map(|(index, _)| index)
    }

    pub fn send_to_best(
        &self,
        mut flight: InFlight,
        exclude: Option<usize>,
    ) -> Result<(), (InFlight, DispatchError)> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err((flight, DispatchError::ShuttingDown));
        }
        // A worker can go away between the choice and the send: try each ready one once.
        let mut tried: Vec<usize> = exclude.into_iter().collect();
        let _choosing = self.choosing.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..self.workers.len() {
            let Some((index, routing)) = self.best_worker(&tried, flight.min_ctx, &flight.prefix)
            else {
                break;
            };
            tried.push(index);
            let worker = &self.workers[index];
            let Some(tx) = worker.status().commands else {
                continue;
            };
            // Replacing the ticket gives the previous worker's unit back.
            flight.ticket = Some(LoadTicket::take(&worker.load));
            flight.current.store(index, Ordering::Release);
            let prefix = flight.prefix.clone();
            match tx.send(ConnCommand::Generate(Box::new(flight))) {
                Ok(()) => {
                    self.on_dispatched(index, prefix, routing);
                    return Ok(());
                }
                Err(mpsc::error::SendError(ConnCommand::Generate(back))) => {
                    flight = *back;
                    flight.ticket = None;
                }
                Err(_) => unreachable!("the command sent was Generate"),
            }
        }
        Err((flight, DispatchError::NoWorkerReady))
    }

    /// A request went to worker `index`: counts how it was chosen, and the worker now most
    /// likely caches `prefix` (see [`PrefixTable::record`]).
    fn on_dispatched(&self, index: usize, prefix: PrefixChain, routing: Routing) {
        self.metrics.record_routing(routing.name());
        if prefix.is_empty() {
            return;
        }
        let worker = &self.workers[index];
        worker.prefixes.record(prefix, worker.slots());
    }

    /// Sends a request to the best worker; when none takes work but one that reached ready is
    /// being started again after a death, the request waits for it (parked, see
    /// [`Inner::unpark`]).
    pub fn place(
        &self,
        flight: InFlight,
        exclude: Option<usize>,
    ) -> Result<(), (InFlight, DispatchError)> {
        match self.send_to_best(flight, exclude) {
            Err((flight, DispatchError::NoWorkerReady)) if self.one_is_coming_back() => {
                self.park(flight);
                Ok(())
            }
            other => other,
        }
    }

    /// A worker that reached ready is being started again (after a death, not an operator's
    /// stop).
    fn one_is_coming_back(&self) -> bool {
        self.workers.iter().any(|w| {
            let s = w.status();
            s.respawning && !s.draining && s.state != WorkerState::Failed
        })
    }

    /// How long a parked request waits for a worker to come back before it gets a 503.
    fn park_timeout(&self) -> Duration {
        self.launch().ready_timeout.min(Duration::from_secs(60))
    }

    fn park(&self, flight: InFlight) {
        let deadline = tokio::time::Instant::now() + self.park_timeout();
        tracing::info!(request_id = %flight.request.request_id, "no worker is ready; the request waits for one that is restarting");
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((deadline, flight));
    }

    /// Sends the parked requests on (a worker became ready), and ends those whose wait ran
    /// out or whose client left.
    pub fn unpark(&self) {
        let now = tokio::time::Instant::now();
        let parked: Vec<(tokio::time::Instant, InFlight)> =
            std::mem::take(&mut *self.parked.lock().unwrap_or_else(PoisonError::into_inner));
        for (deadline, flight) in parked {
            if flight.events.is_closed() {
                continue;
            }
            if now >= deadline {
                let _ = flight
                    .events
                    .send(StreamEvent::Unavailable(DispatchError::NoWorkerReady));
                continue;
            }
            match self.send_to_best(flight, None) {
                Ok(()) => {}
                Err((flight, DispatchError::NoWorkerReady)) if self.one_is_coming_back() => {
                    self.parked
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((deadline, flight));
                }
                Err((flight, error)) => {
                    let _ = flight.events.send(StreamEvent::Unavailable(error));
                }
            }
        }
    }

    /// Every worker as the rebalancing policy sees it.
    fn seats(&self) -> Vec<Seat> {
        self.workers
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let stats = w.vitals.stats();
                Seat {
                    index,
                    adaptive: w.plan().wide.is_some() && w.takes_work() && stats.is_some(),
                    packable: stats.is_some_and(|s| s.packable),
                    load: w.load.load(Ordering::Acquire),
                    slots: w.slots(),
                }
            })
            .collect()
    }

    /// Asks worker `planned.from` to release requests and places them again (on
    /// `planned.to`, as the routing policy picks it). Returns how many moved.
    async fn rebalance_once(&self, planned: Move) -> usize {
        let Some(tx) = self.workers[planned.from].status().commands else {
            return 0;
        };
        let (reply, released) = oneshot::channel();
        let command = ConnCommand::Release {
            count: planned.count,
            reply,
        };
        if tx.send(command).is_err() {
            return 0;
        }
        let Ok(Ok(flights)) = tokio::time::timeout(rebalance::COOLDOWN, released).await else {
            return 0;
        };
        let moved = flights.len();
        if moved == 0 {
            return 0;
        }
        tracing::info!(
            from = planned.from,
            to = planned.to,
            requests = moved,
            reason = planned.reason.name(),
            "moving running requests between workers"
        );
        for mut flight in flights {
            flight.rebalanced += 1;
            self.metrics.record_rebalance(planned.reason.name());
            let placed = match self.send_to_best(flight, Some(planned.from)) {
                Err((flight, _)) => self.place(flight, None),
                ok => ok,
            };
            if let Err((flight, error)) = placed {
                let _ = flight.events.send(StreamEvent::Unavailable(error));
            }
        }
        moved
    }

    /// Requests of a worker that went away: judged by the poison policy, then moved to the
    /// others (those on probation one fingerprint at a time), or ended as poison.
    pub fn requeue(self: &Arc<Self>, from: usize, orphans: Vec<InFlight>, cause: &DeathCause) {
        let orphans: Vec<InFlight> = orphans
            .into_iter()
            .filter(|f| !f.events.is_closed())
            .collect();
        if orphans.is_empty() {
            return;
        }
        let suspects: Vec<Suspect> = orphans
            .iter()
            .map(|f| Suspect {
                fingerprint: Fingerprint::of(&f.request),
                on_probation: f.probation.is_some(),
            })
            .collect();
        let last_words = self.workers[from].take_last_words();
        let verdicts = self
            .poison
            .judge(cause, &suspects, &last_words, Instant::now());
        let mut on_probation: Vec<(Fingerprint, InFlight)> = Vec::new();
        for ((mut flight, suspect), verdict) in orphans.into_iter().zip(suspects).zip(verdicts) {
            flight.probation = None;
            match verdict {
                Verdict::Convicted(conviction) => {
                    self.metrics.record_poison_conviction();
                    tracing::error!(
                        request_id = %flight.request.request_id,
                        fingerprint = %conviction.fingerprint,
                        worker = from,
                        reason = %conviction.reason,
                        "a request killed its worker: ending it and refusing it for a while"
                    );
                    let _ =
                        flight
                            .events
                            .send(StreamEvent::Unavailable(DispatchError::PoisonKilled(
                                conviction.reason,
                            )));
                }
                Verdict::Move { probation: true } => {
                    on_probation.push((suspect.fingerprint, flight));
                }
                Verdict::Move { probation: false } => self.move_one(from, flight, cause),
            }
        }
        if !on_probation.is_empty() {
            tokio::spawn(probation(self.clone(), from, on_probation));
        }
    }

    /// Moves one request off worker `from`. Only inside deaths count against its moves.
    fn move_one(&self, from: usize, mut flight: InFlight, cause: &DeathCause) {
        if matches!(cause, DeathCause::Inside(_)) {
            flight.moves += 1;
            if flight.moves > MAX_MOVES {
                let _ = flight
                    .events
                    .send(StreamEvent::Unavailable(DispatchError::TooManyMoves(
                        flight.moves,
                    )));
                return;
            }
        }
        tracing::info!(request_id = %flight.request.request_id, id = %flight.request.id, from, tokens = flight.generated.len(), "moving a request off a failed worker");
        let resumed = !flight.generated.is_empty();
        match self.place(flight, Some(from)) {
            Ok(()) => self.metrics.record_move(resumed),
            Err((flight, error)) => {
                let _ = flight.events.send(StreamEvent::Unavailable(error));
            }
        }
    }
}

/// Compares the pool's placement with the workers' shapes every [`rebalance::INTERVAL`] and
/// makes the move [`rebalance::plan`] asks for, until the pool shuts down.
pub(super) async fn rebalance(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ticks = tokio::time::interval(rebalance::INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => return,
        }
        if inner.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let Some(planned) = rebalance::plan(&inner.seats()) else {
            continue;
        };
        if inner.rebalance_once(planned).await > 0 {
            tokio::time::sleep(rebalance::COOLDOWN).await;
        }
    }
}

/// Ends the parked requests whose wait ran out (or whose client left), once a second, until
/// the pool shuts down.
pub(super) async fn sweep_parked(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => {}
        }
        let waiting = !inner
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if waiting {
            inner.unpark();
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Sends the suspects of a death on one fingerprint at a time, the freshest (no token yet)
/// first: the next group goes when one of the previous produced a token, or all of it ended,
/// or after the hang timeout. A death meanwhile convicts the group still on probation.
async fn probation(inner: Arc<Inner>, from: usize, suspects: Vec<(Fingerprint, InFlight)>) {
    let mut groups: Vec<(Fingerprint, Vec<InFlight>)> = Vec::new();
    for (fingerprint, flight) in suspects {
        match groups.iter_mut().find(|(f, _)| *f == fingerprint) {
            Some((_, group)) => group.push(flight),
            None => groups.push((fingerprint, vec![flight])),
        }
    }
    groups.sort_by_key(|(_, group)| group.iter().any(|f| !f.generated.is_empty()));
    let cause = DeathCause::Inside("died".into());
    for (fingerprint, group) in groups {
        let (passed_tx, mut passed) = mpsc::channel(1);
        tracing::info!(worker = from, %fingerprint, requests = group.len(), "sending a suspect on, on probation");
        for mut flight in group {
            flight.probation = Some(passed_tx.clone());
            inner.move_one(from, flight, &cause);
        }
        drop(passed_tx);
        let _ = tokio::time::timeout(inner.policy.hang_timeout, passed.recv()).await;
    }
}
