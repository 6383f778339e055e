//! The llamapool worker: one llama.cpp context driven by a continuous-batching engine.
//!
//! - [`engine`] is policy: the scheduler, the sequence-ID manager, stopping and text assembly,
//!   and the engine thread that owns a [`backend::Backend`] and runs one decode per step.
//! - [`backend`] is mechanism: the trait the engine drives, the llama.cpp implementation (the
//!   only module that names `llama_cpp_2`) and a scripted fake for step-by-step tests.
//! - [`embed`] is an embedding worker's thread: it batches embedding inputs into decodes.
//! - [`cli`] is the worker's command line (what `llamapool_common::worker::WorkerArgs` writes).
//! - [`peer`] decides who may connect to the worker's socket: only its router.
//! - [`shape`] makes an adaptive worker wide while its CPUs are free and narrow when not.

pub mod backend;
pub mod cli;
pub mod embed;
pub mod engine;
pub mod ipc;
pub mod peer;
pub mod pin;
pub mod shape;

pub use backend::llama::{LlamaCppBackend, LoadError, Model, ModelOptions};
pub use engine::{EngineHandle, EngineRequest, EngineStats, EventSender, RunningEngine};
pub use llamapool_common::worker::{ContextConfig, FlashAttention};
