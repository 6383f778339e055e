//! The llamapool worker: one llama.cpp context driven by a continuous-batching engine.
//!
//! - [`engine`] is policy: the scheduler, the sequence-ID manager, stopping and text assembly,
//!   and the engine thread that owns a [`backend::Backend`] and runs one decode per step.
//! - [`backend`] is mechanism: the trait the engine drives, the llama.cpp implementation (the
//!   only module that names `llama_cpp_2`) and a scripted fake for step-by-step tests.

pub mod backend;
pub mod engine;
pub mod ipc;
pub mod pin;

pub use backend::llama::{
    ContextConfig, FlashAttention, LlamaCppBackend, LoadError, Model, ModelOptions,
};
pub use engine::{EngineHandle, EngineRequest, EngineStats, EventSender, RunningEngine};
