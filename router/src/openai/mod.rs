//! The API's shapes, both ways: [`request`] parses and validates bodies into what the pool
//! runs (every rejection names its field); the response bodies are types serialized once:
//! OpenAI's ([`response`]), llama-server's own ([`llama_server`]), the `timings` and
//! `prompt_progress` both report ([`timings`]) and the log probabilities in their three shapes
//! ([`logprobs`]). The error body is `crate::error`'s. The endpoints and their deviations from
//! OpenAI and llama-server are in docs/API.md.

pub mod embeddings;
#[cfg(test)]
mod fuzz_tests;
pub mod llama_server;
pub mod logprobs;
pub mod parsed;
pub mod request;
pub mod response;
#[cfg(test)]
mod shapes_tests;
pub mod timings;

pub use request::{Endpoint, InvalidRequest, ValidRequest};
pub use response::Envelope;

/// `system_fingerprint` and llama-server's `build_info`: this build.
pub const FINGERPRINT: &str = concat!("llamapool-", env!("CARGO_PKG_VERSION"));
