//! The mechanism the engine drives: a batched decoder with per-sequence KV state, samplers and
//! a vocabulary. [`llama`] is the real one; [`fake`] is a scripted stand-in for scheduler tests.
//!
//! Contract: the engine owns the backend on one thread and calls it step by step:
//! `decode(batch)` then `sample(sampler, index)` for each entry added with `logits = true`.

pub mod chat;
pub mod fake;
pub mod llama;

use llamapool_common::{RequestError, SamplingParams, Token};

use crate::engine::seq_ids::SeqId;

/// One token of a step's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    pub token: Token,
    /// Position of the token within its sequence.
    pub pos: i32,
    pub seq: SeqId,
    /// Whether a token will be sampled from this entry's logits.
    pub logits: bool,
}

/// Sizes fixed when the backend was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendLimits {
    /// Most tokens one `decode` may carry.
    pub n_batch: usize,
    /// Sequence ids are `0..n_seq_max`.
    pub n_seq_max: usize,
    /// Most tokens (prompt + generated) one sequence may hold.
    pub n_ctx_per_seq: usize,
    pub n_vocab: usize,
}

/// A failed `decode`. The backend has already removed whatever the failed call wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeFailure {
    #[error("no KV cache slot for the batch")]
    NoKvSlot,
    #[error("{0}")]
    Other(String),
}

pub trait Backend {
    /// Per-request sampling state.
    type Sampler;

    fn limits(&self) -> BackendLimits;

    /// A sampler for one request. `ignore_eos` bans end-of-generation tokens; `prompt` seeds
    /// the penalties' history, and its last `resumed` tokens (generated before a move) are
    /// replayed into a grammar. Fails when the request's grammar cannot be used.
    fn new_sampler(
        &self,
        params: &SamplingParams,
        ignore_eos: bool,
        prompt: &[Token],
        resumed: usize,
    ) -> Result<Self::Sampler, RequestError>;

    /// Removes the sequence's KV cells at positions `from_pos` and later (0: all of them).
    fn clear_sequence(&mut self, seq: SeqId, from_pos: i32);

    /// Whether `clear_sequence` with `from_pos > 0` leaves a sequence whose cells `0..from_pos`
    /// are exactly as decoded, so that a later prompt may reuse them (the prompt cache). Not so
    /// for recurrent models or sliding-window attention, whose state cannot be cut back.
    fn can_keep_prefix(&self) -> bool {
        true
    }

    /// Whether [`Backend::share_prefix`] works: a KV cache where one cell can belong to several
    /// sequences (llama.cpp's unified cache) and prefixes can be kept.
    fn can_share_cells(&self) -> bool;

    /// Gives `to` the cells `from` holds at positions `from_pos..to_pos`: the same cells, not
    /// computed again. Called only when [`Backend::can_share_cells`], with `to` holding exactly
    /// the positions `0..from_pos` and `from` at least `0..to_pos` of the same tokens.
    fn share_prefix(&mut self, from: SeqId, to: SeqId, from_pos: i32, to_pos: i32);

    fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), DecodeFailure>;

    /// Samples (and accepts) the next token from the logits of batch entry `batch_index` of the
    /// last successful `decode`.
    fn sample(&mut self, sampler: &mut Self::Sampler, batch_index: usize) -> Token;

    /// The raw logits (before any sampler) of batch entry `batch_index` of the last successful
    /// `decode`, one per vocabulary token: what log probabilities are computed from.
    fn logits(&self, batch_index: usize) -> &[f32];

    /// Appends the token's text bytes (possibly part of a UTF-8 character); a special token
    /// (a control token such as `<tool_call>`) is rendered only when `special`.
    fn append_piece(&self, token: Token, out: &mut Vec<u8>, special: bool);

    fn is_eog(&self, token: Token) -> bool;
}
