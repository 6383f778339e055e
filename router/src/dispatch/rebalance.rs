//! Rebalancing: moving running requests between adaptive workers when the machine changes
//! under them, so that the pool's shape follows the machine within a second or two instead
//! of waiting for the requests to finish.
//!
//! Why: requests are placed when they arrive — packed onto the first packable worker on a
//! quiet machine, spread over all workers when a neighbour crowds the CPUs. A placement made
//! under one condition outlives it: requests spread while a neighbour ran keep the second
//! worker busy after it left, and each worker then counts the other as busy and stays narrow
//! (7–10 s per passing spike, measured before this module existed); a wave packed onto one
//! worker stays on one narrow core when a neighbour arrives, while the other core idles.
//!
//! - [`plan`] (policy, pure): from each worker's [`Seat`], at most one [`Move`]: **pack**
//!   when no worker is crowded and the packing target has room for all the requests of
//!   another worker (so that one goes idle and the target can widen) and the whole load fits
//!   on it; **split** when every adaptive worker is crowded and the loads differ by two or
//!   more.
//! - [`Candidate`] (policy, pure): which running requests are worth moving — more left to
//!   generate than the prompt and tokens the new worker must decode again, not moved too
//!   often already.
//! - The mechanism is in [`super::placement`]: its `rebalance` task looks every [`INTERVAL`]
//!   and waits [`COOLDOWN`] after each move; `Inner::rebalance_once` asks the source worker's
//!   connection to release the requests (`ConnCommand::Release`: it forgets them and aborts
//!   them on its worker) and places them again; they continue from the tokens they
//!   generated, exactly as a request moved off a dead worker does.

use std::time::Duration;

/// How often the pool's placement is compared with the workers' shapes.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// After a move, the workers need a window or two to report their new shapes.
pub const COOLDOWN: Duration = Duration::from_secs(1);

/// One worker as the rebalancing policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    pub index: usize,
    /// Adaptive (it has a wide shape), ready and not draining.
    pub adaptive: bool,
    /// Its last progress said no foreign process crowds its CPUs.
    pub packable: bool,
    /// Requests in flight on it.
    pub load: usize,
    pub slots: usize,
}

/// Why requests move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The machine is quiet: everything onto the packing target, so it can run wide.
    Pack,
    /// A neighbour crowds the CPUs: the load shared over the narrow workers.
    Split,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pack => "pack",
            Self::Split => "split",
        }
    }
}

/// Move up to `count` requests from worker `from` to worker `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: usize,
    pub to: usize,
    pub count: usize,
    pub reason: Reason,
}

/// The move the pool's placement needs now, if any (see the module doc).
pub fn plan(seats: &[Seat]) -> Option<Move> {
    let adaptive: Vec<&Seat> = seats.iter().filter(|s| s.adaptive).collect();
    if adaptive.len() < 2 {
        return None;
    }
    if adaptive.iter().all(|s| s.packable) {
        plan_pack(&adaptive)
    } else if adaptive.iter().all(|s| !s.packable) {
        plan_split(&adaptive)
    } else {
        // The workers disagree (one measured a neighbour, one not yet): wait for them.
        None
    }
}

/// The packing target is the first worker (as [`super::routing::choose`] packs); the busy
/// worker with the fewest requests that all fit in the target's free slots moves over — but
/// only while the whole pool's load fits on the target: with more, new requests would
/// overflow onto the emptied worker at once, and moving would buy nothing but prefilling
/// again.
fn plan_pack(adaptive: &[&Seat]) -> Option<Move> {
    let target = adaptive.iter().min_by_key(|s| s.index)?;
    let total: usize = adaptive.iter().map(|s| s.load).sum();
    if total > target.slots {
        return None;
    }
    let room = target.slots.saturating_sub(target.load);
    let source = adaptive
        .iter()
        .filter(|s| s.index != target.index && s.load > 0 && s.load <= room)
        .min_by_key(|s| (s.load, s.index))?;
    Some(Move {
        from: source.index,
        to: target.index,
        count: source.load,
        reason: Reason::Pack,
    })
}

/// Half the difference between the most and the least loaded moves over.
fn plan_split(adaptive: &[&Seat]) -> Option<Move> {
    let most = adaptive
        .iter()
        .max_by_key(|s| (s.load, std::cmp::Reverse(s.index)))?;
    let least = adaptive.iter().min_by_key(|s| (s.load, s.index))?;
    let room = least.slots.saturating_sub(least.load);
    let count = ((most.load - least.load) / 2).min(room);
    (count > 0 && most.index != least.index).then_some(Move {
        from: most.index,
        to: least.index,
        count,
        reason: Reason::Split,
    })
}

/// A request is moved only when it has at least this many tokens left to generate: one
/// nearly done finishes sooner where it is.
pub const MIN_TOKENS_LEFT: u32 = 8;
/// ... and its prompt and generated tokens together are at most this many: they are decoded
/// again on the worker it moves to, which stalls that worker's other sequences meanwhile.
pub const MAX_TOKENS_TO_REDO: u32 = 2048;
/// ... and it has been moved this many times at most already (no ping-pong).
pub const MAX_REBALANCES: u32 = 2;

/// What decides whether one running request is worth moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its prompt's tokens (estimated for text: a token per four bytes).
    pub prompt_tokens: u32,
    pub generated: u32,
    /// Its `max_tokens`, if it has one.
    pub max_tokens: Option<u32>,
    pub rebalanced: u32,
}

impl Candidate {
    /// Worth it when it has more left to generate than the move makes the new worker decode
    /// again (measured on Gemma 3 270M, one thread: prefilling four moved 60-token requests
    /// stalled the eight sequences of the worker they joined for 1.9 s, about as long as the
    /// moved ones needed to finish where they were).
    pub fn worth_moving(&self) -> bool {
        let left = self.tokens_left();
        let redo = self.prompt_tokens.saturating_add(self.generated);
        left >= MIN_TOKENS_LEFT
            && left >= redo
            && redo <= MAX_TOKENS_TO_REDO
            && self.rebalanced < MAX_REBALANCES
    }

    /// Tokens it may still generate (without `max_tokens`: as many as can be).
    pub fn tokens_left(&self) -> u32 {
        self.max_tokens
            .map_or(u32::MAX, |max| max.saturating_sub(self.generated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat(index: usize, packable: bool, load: usize) -> Seat {
        Seat {
            index,
            adaptive: true,
            packable,
            load,
            slots: 16,
        }
    }

    #[test]
    fn a_quiet_machine_packs_the_second_workers_requests_onto_the_first() {
        assert_eq!(
            plan(&[seat(0, true, 4), seat(1, true, 4)]),
            Some(Move {
                from: 1,
                to: 0,
                count: 4,
                reason: Reason::Pack
            })
        );
        assert_eq!(
            plan(&[seat(0, true, 8), seat(1, true, 0)]),
            None,
            "already packed"
        );
        assert_eq!(
            plan(&[seat(0, true, 12), seat(1, true, 6)]),
            None,
            "18 requests for 16 slots: new requests would overflow onto the second at once"
        );
        assert_eq!(
            plan(&[seat(0, true, 10), seat(1, true, 6)]).map(|m| m.count),
            Some(6),
            "16 fit"
        );
        assert_eq!(
            plan(&[seat(0, true, 2), seat(1, true, 6), seat(2, true, 1)]),
            Some(Move {
                from: 2,
                to: 0,
                count: 1,
                reason: Reason::Pack
            }),
            "the worker with the fewest goes first"
        );
    }

    #[test]
    fn a_crowded_machine_splits_a_packed_wave() {
        assert_eq!(
            plan(&[seat(0, false, 8), seat(1, false, 0)]),
            Some(Move {
                from: 0,
                to: 1,
                count: 4,
                reason: Reason::Split
            })
        );
        assert_eq!(
            plan(&[seat(0, false, 4), seat(1, false, 3)]),
            None,
            "balanced enough"
        );
        assert_eq!(
            plan(&[seat(0, false, 1), seat(1, false, 5)]),
            Some(Move {
                from: 1,
                to: 0,
                count: 2,
                reason: Reason::Split
            })
        );
    }

    #[test]
    fn workers_that_disagree_or_are_not_adaptive_are_left_alone() {
        assert_eq!(plan(&[seat(0, true, 0), seat(1, false, 8)]), None);
        let mut fixed = [seat(0, true, 0), seat(1, true, 4)];
        for s in &mut fixed {
            s.adaptive = false;
        }
        assert_eq!(plan(&fixed), None);
        assert_eq!(plan(&[seat(0, true, 0)]), None, "one worker");
    }

    #[test]
    fn only_requests_with_enough_left_and_little_to_redo_move() {
        let c = Candidate {
            prompt_tokens: 32,
            generated: 10,
            max_tokens: Some(500),
            rebalanced: 0,
        };
        assert!(c.worth_moving());
        assert!(!Candidate {
            generated: 495,
            ..c
        }
        .worth_moving());
        assert!(
            !Candidate {
                max_tokens: Some(40),
                ..c
            }
            .worth_moving(),
            "30 tokens left finish sooner than 42 decoded again"
        );
        assert!(!Candidate {
            prompt_tokens: 4000,
            ..c
        }
        .worth_moving());
        assert!(!Candidate {
            rebalanced: MAX_REBALANCES,
            ..c
        }
        .worth_moving());
        assert!(Candidate {
            max_tokens: None,
            ..c
        }
        .worth_moving());
        assert!(Candidate { generated: 0, ..c }.tokens_left() > c.tokens_left());
    }
}
