//! The sequence-ID manager: a fixed pool of llama.cpp sequence ids `0..n_seq_max`.
//!
//! Owned by the engine thread. An id is handed out only after the backend cleared its KV
//! cells, and must come back exactly once (finish, cancel or error). Double release, or
//! releasing an id that was never handed out, is an engine bug and panics.

/// A llama.cpp sequence id, always below the pool's `n_seq_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(i32);

impl SeqId {
    pub fn get(self) -> i32 {
        self.0
    }
}

#[derive(Debug)]
pub struct SeqIdPool {
    /// Free ids, lowest last so that `pop` hands out the lowest id first.
    free: Vec<SeqId>,
    in_use: Vec<bool>,
}

impl SeqIdPool {
    pub fn new(n_seq_max: usize) -> Self {
        assert!(n_seq_max > 0, "a sequence-id pool needs at least one id");
        let n = i32::try_from(n_seq_max).expect("n_seq_max fits in i32");
        Self {
            free: (0..n).rev().map(SeqId).collect(),
            in_use: vec![false; n_seq_max],
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Hands out a free id after `clear` has removed every KV cell it may still hold.
    pub fn acquire(&mut self, clear: impl FnOnce(SeqId)) -> Option<SeqId> {
        let id = self.free.pop()?;
        clear(id);
        self.in_use[Self::index(id)] = true;
        Some(id)
    }

    /// Returns an id to the pool.
    ///
    /// # Panics
    /// When the id is not currently handed out: a double release or a use after release.
    pub fn release(&mut self, id: SeqId) {
        let slot = &mut self.in_use[Self::index(id)];
        assert!(
            *slot,
            "sequence id {} released while not in use: double release or use after release",
            id.0
        );
        *slot = false;
        self.free.push(id);
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
            .map(|_| pool.acquire(|id| cleared.push(id)).unwrap())
            .collect();
        assert_eq!(ids, cleared);
        assert_eq!(
            ids.iter().map(|i| i.get()).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(pool.acquire(|_| panic!("no id to clear")).is_none());
        pool.release(ids[1]);
        assert_eq!(pool.free_count(), 1);
        assert_eq!(pool.acquire(|_| {}), Some(ids[1]));
    }

    #[test]
    #[should_panic(expected = "double release")]
    fn double_release_panics() {
        let mut pool = SeqIdPool::new(2);
        let id = pool.acquire(|_| {}).unwrap();
        pool.release(id);
        pool.release(id);
    }
}
