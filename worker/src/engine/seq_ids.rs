//! The sequence-ID manager: a fixed pool of llama.cpp sequence ids `0..n_seq_max`, and the
//! prompt cache that lives on the free ones.
//!
//! Owned by the engine thread. Invariant: an id is handed out only with known KV state — the
//! pool remembers, for every free id, the tokens whose cells it still holds at positions
//! `0..` (what the engine said at `release`), and `acquire` has the backend remove every cell
//! past the prefix it reuses (all of them when it reuses none). An id must come back exactly
//! once (finish, cancel or error). Double release, or releasing an id that was never handed
//! out, is an engine bug and panics.

use llamapool_common::Token;

/// A llama.cpp sequence id, always below the pool's `n_seq_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(i32);

impl SeqId {
    pub fn get(self) -> i32 {
        self.0
    }
}

/// An id handed out, with the prompt tokens whose KV cells it already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub id: SeqId,
    /// The prompt's first `reused` tokens are in the id's KV cells at positions `0..reused`;
    /// always less than the prompt's length, so that at least one token is decoded.
    pub reused: usize,
}

#[derive(Debug)]
pub struct SeqIdPool {
    /// Free ids. Never-used ids start lowest last, so that a fresh pool hands out the lowest
    /// id first; released ids are pushed at the end.
    free: Vec<SeqId>,
    in_use: Vec<bool>,
    /// Per id, while free: the tokens whose KV cells it holds at positions `0..`.
    cached: Vec<Vec<Token>>,
}

/// How many leading tokens two token lists share.
pub fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SeqIdPool {
    pub fn new(n_seq_max: usize) -> Self {
        assert!(n_seq_max > 0, "a sequence-id pool needs at least one id");
        let n = i32::try_from(n_seq_max).expect("n_seq_max fits in i32");
        Self {
            free: (0..n).rev().map(SeqId).collect(),
            in_use: vec![false; n_seq_max],
            cached: vec![Vec::new(); n_seq_max],
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Hands out a free id for `prompt`. With `reuse`, that is the free id whose cached tokens
    /// share the longest prefix with the prompt (at most all but its last token); `clear(id,
    /// reused)` must then remove every KV cell of the id at positions `reused` and later
    /// (0: all of them). Without a useful prefix it prefers an id that holds nothing, then the
    /// one released longest ago, so that recent caches live longest.
    pub fn acquire(
        &mut self,
        prompt: &[Token],
        reuse: bool,
        clear: impl FnOnce(SeqId, usize),
    ) -> Option<Acquired> {
        if self.free.is_empty() {
            return None;
        }
        let usable = prompt.len().saturating_sub(1);
        let best = if reuse && usable > 0 {
            self.free
                .iter()
                .enumerate()
                .map(|(at, &id)| {
                    let shared = common_prefix(&self.cached[Self::index(id)], prompt).min(usable);
                    (shared, at)
                })
                // Longest prefix; among equals, the most recently released.
                .max()
                .filter(|&(shared, _)| shared > 0)
        } else {
            None
        };
        let (reused, at) = best.unwrap_or_else(|| {
            let at = self
                .free
                .iter()
                .rposition(|&id| self.cached[Self::index(id)].is_empty())
                .unwrap_or(0);
            (0, at)
        });
        let id = self.free.remove(at);
        clear(id, reused);
        let index = Self::index(id);
        self.cached[index].clear();
        self.in_use[index] = true;
        Some(Acquired { id, reused })
    }

    /// Returns an id to the pool. `cells` are the tokens whose KV cells the id still holds at
    /// positions `0..` (empty when the caller cleared them): what a later `acquire` may reuse.
    ///
    /// # Panics
    /// When the id is not currently handed out: a double release or a use after release.
    pub fn release(&mut self, id: SeqId, cells: Vec<Token>) {
        let index = Self::index(id);
        let slot = &mut self.in_use[index];
        assert!(
            *slot,
            "sequence id {} released while not in use: double release or use after release",
            id.0
        );
        *slot = false;
        self.cached[index] = cells;
        self.free.push(id);
    }

    /// Forgets every free id's cached tokens; `clear(id)` must remove all of the id's cells.
    /// Returns how many ids held cells.
    pub fn drop_caches(&mut self, mut clear: impl FnMut(SeqId)) -> usize {
        let mut dropped = 0;
        for &id in &self.free {
            let cells = &mut self.cached[Self::index(id)];
            if !cells.is_empty() {
                clear(id);
                cells.clear();
                dropped += 1;
            }
        }
        dropped
    }

    fn index(id: SeqId) -> usize {
        usize::try_from(id.0).expect("sequence ids are non-negative")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_id_once_and_clears_first() {
        let mut pool = SeqIdPool::new(3);
        let mut cleared = Vec::new();
        let ids: Vec<_> = (0..3)
            .map(|_| {
                pool.acquire(&[1, 2], true, |id, from| cleared.push((id, from)))
                    .unwrap()
                    .id
            })
            .collect();
        assert_eq!(ids.iter().map(|&i| (i, 0)).collect::<Vec<_>>(), cleared);
        assert_eq!(
            ids.iter().map(|i| i.get()).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(pool
            .acquire(&[1], true, |_, _| panic!("no id to clear"))
            .is_none());
        pool.release(ids[1], Vec::new());
        assert_eq!(pool.free_count(), 1);
        assert_eq!(
            pool.acquire(&[1], true, |_, _| {}),
            Some(Acquired {
                id: ids[1],
                reused: 0
            })
        );
    }

    #[test]
    fn reuses_the_longest_prefix_and_clears_past_it() {
        let mut pool = SeqIdPool::new(3);
        let a = pool.acquire(&[9], true, |_, _| {}).unwrap().id;
        let b = pool.acquire(&[9], true, |_, _| {}).unwrap().id;
        pool.release(a, vec![1, 2, 3, 4]);
        pool.release(b, vec![1, 2, 7]);
        let mut cleared = None;
        let got = pool
            .acquire(&[1, 2, 3, 5, 6], true, |id, from| {
                cleared = Some((id, from))
            })
            .unwrap();
        assert_eq!(got, Acquired { id: a, reused: 3 });
        assert_eq!(cleared, Some((a, 3)));
        // The other cache is still there.
        let got = pool.acquire(&[1, 2, 7, 8], true, |_, _| {}).unwrap();
        assert_eq!(got, Acquired { id: b, reused: 3 });
    }

    #[test]
    fn leaves_at_least_one_prompt_token_to_decode() {
        let mut pool = SeqIdPool::new(1);
        let a = pool.acquire(&[9], true, |_, _| {}).unwrap().id;
        pool.release(a, vec![1, 2, 3, 4]);
        let mut cleared = None;
        let got = pool
            .acquire(&[1, 2, 3], true, |id, from| cleared = Some((id, from)))
            .unwrap();
        assert_eq!(got.reused, 2);
        assert_eq!(cleared, Some((a, 2)));
        pool.release(a, vec![1, 2, 3, 4]);
        // A one-token prompt cannot reuse anything.
        assert_eq!(pool.acquire(&[1], true, |_, _| {}).unwrap().reused, 0);
    }

    #[test]
    fn without_reuse_or_prefix_clears_everything_and_spares_caches() {
        let mut pool = SeqIdPool::new(3);
        let ids: Vec<_> = (0..3)
            .map(|_| pool.acquire(&[9], true, |_, _| {}).unwrap().id)
            .collect();
        pool.release(ids[0], vec![1, 2, 3]);
        pool.release(ids[1], Vec::new());
        pool.release(ids[2], vec![4, 5]);
        // No shared prefix: the empty id first.
        let mut cleared = None;
        let got = pool
            .acquire(&[7, 8], true, |id, from| cleared = Some((id, from)))
            .unwrap();
        assert_eq!(
            got,
            Acquired {
                id: ids[1],
                reused: 0
            }
        );
        assert_eq!(cleared, Some((ids[1], 0)));
        // Reuse off: a full clear even with a matching cache; the oldest release goes first.
        let got = pool
            .acquire(&[1, 2, 3, 4], false, |id, from| cleared = Some((id, from)))
            .unwrap();
        assert_eq!(
            got,
            Acquired {
                id: ids[0],
                reused: 0
            }
        );
        assert_eq!(cleared, Some((ids[0], 0)));
        // Its cache is gone: releasing it empty leaves nothing to reuse.
        pool.release(ids[0], Vec::new());
        assert_eq!(
            pool.acquire(&[1, 2, 3, 4], true, |_, _| {}).unwrap().reused,
            0
        );
    }

    #[test]
    fn drop_caches_clears_only_ids_that_hold_cells() {
        let mut pool = SeqIdPool::new(2);
        let a = pool.acquire(&[9], true, |_, _| {}).unwrap().id;
        let b = pool.acquire(&[9], true, |_, _| {}).unwrap().id;
        pool.release(a, vec![1, 2]);
        pool.release(b, Vec::new());
        let mut cleared = Vec::new();
        assert_eq!(pool.drop_caches(|id| cleared.push(id)), 1);
        assert_eq!(cleared, vec![a]);
        assert_eq!(pool.acquire(&[1, 2, 3], true, |_, _| {}).unwrap().reused, 0);
    }

    #[test]
    #[should_panic(expected = "double release")]
    fn double_release_panics() {
        let mut pool = SeqIdPool::new(2);
        let id = pool.acquire(&[1], true, |_, _| {}).unwrap().id;
        pool.release(id, Vec::new());
        pool.release(id, Vec::new());
    }
}
