//! The routing policy: which of the workers that may take a request gets it. Pure: the
//! placement code ([`super::placement`]) weighs each worker as a [`Candidate`] and asks
//! [`choose`]; what it chose is counted by [`Routing`] (`llamapool_routed_total`).
//!
//! In order: pack onto the first packable adaptive worker with a free slot; else follow
//! prefix affinity (the worker whose prompt cache most likely holds the longest prefix,
//! within `max_load_gap` of the least load); else the least loaded.

/// How requests are spread over the workers (`server.prefix_affinity`,
/// `server.affinity_max_load_gap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    /// Prefer the worker whose prompt cache most likely holds the prompt's longest prefix.
    pub prefix_affinity: bool,
    /// ... unless it has more than this many requests in flight beyond the least-loaded one.
    pub max_load_gap: usize,
    /// Move running requests between live adaptive workers when the machine changes under
    /// them (`server.rebalance`, see [`super::rebalance`]).
    pub rebalance: bool,
}

/// How the dispatch policy chose a worker (`llamapool_routed_total`'s outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Packed onto the first adaptive worker that no foreign work crowds and that had a free
    /// slot.
    Packed,
    /// To the worker most likely holding the longest prefix.
    Affinity,
    /// No worker held a prefix: the least loaded.
    NoPrefix,
    /// The workers holding a prefix were too busy: the least loaded.
    Overloaded,
    /// Prefix affinity is off (or the request has no prompt to match): the least loaded.
    LeastLoaded,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Self::Packed => "packed",
            Self::Affinity => "affinity",
            Self::NoPrefix => "no_prefix",
            Self::Overloaded => "overloaded",
            Self::LeastLoaded => "least_loaded",
        }
    }
}

/// A worker that may take a request, as the dispatch policy weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    /// Requests in flight on it.
    pub load: usize,
    /// Leading prompt blocks its cache most likely holds.
    pub matched: usize,
    /// Prompts its cache most likely holds: among equally loaded workers a new prefix goes to
    /// the one with the most room, so that sequential new conversations spread.
    pub cached: usize,
    /// A packable adaptive worker (no foreign work crowds its CPUs) with a free slot.
    pub packable: bool,
}

/// The policy: first, packing — the first packable worker with a free slot takes the request:
/// on a quiet machine that keeps the other adaptive workers idle, so that it widens over all
/// the CPUs (one wide context batches best). Else the candidate with the longest matched prefix
/// among those within `max_load_gap` of the least load (fewer in flight, then lower index, on
/// ties); without any match, the least loaded (fewest cached prompts, then lowest index, on
/// ties).
pub fn choose(candidates: &[Candidate], max_load_gap: usize) -> Option<(usize, Routing)> {
    if let Some(first) = candidates
        .iter()
        .filter(|c| c.packable)
        .min_by_key(|c| c.index)
    {
        return Some((first.index, Routing::Packed));
    }
    let least = candidates
        .iter()
        .min_by_key(|c| (c.load, c.cached, c.index))?;
    let mut matched = candidates.iter().filter(|c| c.matched > 0).peekable();
    if matched.peek().is_none() {
        return Some((least.index, Routing::NoPrefix));
    }
    let within_gap = matched
        .filter(|c| c.load <= least.load.saturating_add(max_load_gap))
        .max_by_key(|c| (c.matched, std::cmp::Reverse((c.load, c.index))));
    match within_gap {
        Some(c) => Some((c.index, Routing::Affinity)),
        None => Some((least.index, Routing::Overloaded)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: usize, load: usize, matched: usize) -> Candidate {
        Candidate {
            index,
            load,
            matched,
            cached: 0,
            packable: false,
        }
    }

    #[test]
    fn the_first_packable_worker_with_room_takes_everything_first() {
        let mut workers = [c(0, 5, 0), c(1, 0, 9), c(2, 0, 0)];
        workers[0].packable = true;
        workers[2].packable = true;
        assert_eq!(choose(&workers, 2), Some((0, Routing::Packed)));
        workers[0].packable = false;
        workers[2].packable = false;
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
    }

    #[test]
    fn a_new_prefix_goes_to_the_idle_worker_with_the_fewest_cached_prompts() {
        let mut workers = [c(0, 0, 0), c(1, 0, 0), c(2, 1, 0)];
        workers[0].cached = 3;
        workers[1].cached = 1;
        assert_eq!(choose(&workers, 2), Some((1, Routing::NoPrefix)));
    }

    #[test]
    fn without_a_prefix_the_least_loaded_wins_lowest_index_first() {
        let workers = [c(0, 3, 0), c(1, 1, 0), c(2, 1, 0)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::NoPrefix)));
        assert_eq!(choose(&[], 2), None);
    }

    #[test]
    fn the_longest_prefix_wins_within_the_load_gap() {
        let workers = [c(0, 0, 0), c(1, 2, 5), c(2, 1, 3)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
        // Worker 1 is now 3 beyond the least loaded: the next-longest holder within the gap.
        let workers = [c(0, 0, 0), c(1, 3, 5), c(2, 1, 3)];
        assert_eq!(choose(&workers, 2), Some((2, Routing::Affinity)));
    }

    #[test]
    fn holders_too_busy_fall_back_to_the_least_loaded() {
        let workers = [c(0, 0, 0), c(1, 4, 5)];
        assert_eq!(choose(&workers, 2), Some((0, Routing::Overloaded)));
        assert_eq!(choose(&workers, 4), Some((1, Routing::Affinity)));
    }

    #[test]
    fn equal_matches_go_to_the_less_loaded() {
        let workers = [c(0, 2, 4), c(1, 1, 4)];
        assert_eq!(choose(&workers, 2), Some((1, Routing::Affinity)));
    }
}
