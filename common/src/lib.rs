//! Types shared by the router and the workers: request ids, sampling and stopping parameters,
//! per-request results (outputs, finish reasons, usage, timings) and request-scoped errors;
//! the configuration and the shape and command line of a worker.
//!
//! Everything here is plain data with validation at construction; nothing here talks to a
//! model, a socket or a thread. (The `logging` feature adds [`logging::init`], the binaries'
//! log set-up.)

pub mod codec;
pub mod cpus;
pub mod gbnf;
#[cfg(feature = "logging")]
pub mod logging;
pub mod params;
pub mod protocol;
pub mod results;
pub mod settings;
pub mod worker;

pub use params::ParamError;
pub use params::{GrammarTrigger, JsonSchema, SamplingParams, StoppingParams};
pub use results::{
    Candidate, ChatDelta, ChatMessage, Finish, FinishReason, GenerationEvent, ModelInfo,
    PromptProgress, RequestError, SeqOutput, Timings, TokenLogprob, ToolCall, ToolCallDelta, Usage,
};
pub use worker::{ContextConfig, ContextError, FlashAttention, WorkerArgs};

/// A token id of the model's vocabulary.
pub type Token = i32;

/// Identifies one generation request across the router, the protocol and the engine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "req-{}", self.0)
    }
}
