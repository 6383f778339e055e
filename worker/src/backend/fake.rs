//! A scripted backend for step-by-step engine tests: no model, deterministic output.
//!
//! Each sequence generates `script(prompt)`: the token after position `p` is
//! `(last token + 1) % n_vocab`, and token `i` renders as the bytes `pieces[i]` (default: one
//! ASCII letter). Every `decode` is recorded so tests can assert what each step carried, and
//! failures can be injected for the next decode.

use std::collections::HashMap;

use llamapool_common::{RequestError, SamplingParams, Token};

use super::{Backend, BackendLimits, BatchEntry, DecodeFailure};
use crate::engine::seq_ids::SeqId;

#[derive(Debug)]
pub struct FakeBackend {
    limits: BackendLimits,
    /// Per sequence: the tokens at positions 0.. currently in the "KV cache".
    kv: HashMap<SeqId, Vec<Token>>,
    last_batch: Vec<BatchEntry>,
    /// Every decoded batch, in order.
    pub history: Vec<Vec<BatchEntry>>,
    pub eog: Token,
    pub pieces: HashMap<Token, Vec<u8>>,
    /// Failures to return from the next decodes, front first.
    pub inject: Vec<DecodeFailure>,
    /// The logits every sampled entry reports (default: all 0, a uniform distribution).
    pub logits: Vec<f32>,
    /// What `can_keep_prefix` answers (default: true).
    pub keeps_prefix: bool,
    /// What `can_share_cells` answers (default: true).
    pub shares_cells: bool,
}

/// The fake sampler only remembers whether end-of-generation is banned.
#[derive(Debug)]
pub struct FakeSampler {
    ignore_eos: bool,
}

impl FakeBackend {
    pub fn new(limits: BackendLimits) -> Self {
        Self {
            limits,
            kv: HashMap::new(),
            last_batch: Vec::new(),
            history: Vec::new(),
            eog: Token::try_from(limits.n_vocab).expect("vocab fits") - 1,
            pieces: HashMap::new(),
            inject: Vec::new(),
            logits: vec![0.0; limits.n_vocab],
            keeps_prefix: true,
            shares_cells: true,
        }
    }
}

impl Backend for FakeBackend {
    type Sampler = FakeSampler;

    fn limits(&self) -> BackendLimits {
        self.limits
    }

    fn new_sampler(
        &self,
        _: &SamplingParams,
        ignore_eos: bool,
        _: &[Token],
        _: usize,
    ) -> Result<FakeSampler, RequestError> {
        Ok(FakeSampler { ignore_eos })
    }

    fn clear_sequence(&mut self, seq: SeqId, from_pos: i32) {
        let cells = self.kv.entry(seq).or_default();
        cells.truncate(usize::try_from(from_pos).expect("positions are non-negative"));
    }

    fn can_keep_prefix(&self) -> bool {
        self.keeps_prefix
    }

    fn can_share_cells(&self) -> bool {
        self.shares_cells
    }

    fn share_prefix(&mut self, from: SeqId, to: SeqId, from_pos: i32, to_pos: i32) {
        assert!(
            self.shares_cells,
            "share_prefix on a backend that cannot share cells"
        );
        let range = usize::try_from(from_pos).expect("non-negative")
            ..usize::try_from(to_pos).expect("non-negative");
        let source = self
            .kv
            .get(&from)
            .map(|cells| cells[range.clone()].to_vec());
        let source = source.expect("cells shared from a sequence that holds them");
        let cells = self.kv.entry(to).or_default();
        assert_eq!(
            cells.len(),
            range.start,
            "cells shared past the sequence's end"
        );
        cells.extend(source);
    }

    fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), DecodeFailure> {
        assert!(!batch.is_empty(), "the engine never decodes an empty batch");
        assert!(batch.len() <= self.limits.n_batch, "batch over n_batch");
        self.history.push(batch.to_vec());
        if !self.inject.is_empty() {
            return Err(self.inject.remove(0));
        }
        for e in batch {
            let cells = self.kv.entry(e.seq).or_default();
            assert_eq!(
                cells.len(),
                usize::try_from(e.pos).expect("non-negative"),
                "token added at a position that is not the sequence's next one"
            );
            assert!(
                cells.len() < self.limits.n_ctx_per_seq,
                "sequence over its context"
            );
            cells.push(e.token);
        }
        self.last_batch = batch.to_vec();
        Ok(())
    }

    fn sample(&mut self, sampler: &mut FakeSampler, batch_index: usize) -> Token {
        let entry = self.last_batch[batch_index];
        assert!(entry.logits, "sampled an entry decoded without logits");
        let n_vocab = Token::try_from(self.limits.n_vocab).expect("vocab fits");
        let mut next = (entry.token + 1) % n_vocab;
        if sampler.ignore_eos && next == self.eog {
            next = 0;
        }
        next
    }

    fn logits(&self, batch_index: usize) -> &[f32] {
        assert!(
            self.last_batch[batch_index].logits,
            "logits of an entry decoded without them"
        );
        &self.logits
    }

    fn append_piece(&self, token: Token, out: &mut Vec<u8>, _special: bool) {
        match self.pieces.get(&token) {
            Some(bytes) => out.extend_from_slice(bytes),
            None => out.push(b'a' + u8::try_from(token % 26).expect("small")),
        }
    }

    fn is_eog(&self, token: Token) -> bool {
        token == self.eog
    }
}
