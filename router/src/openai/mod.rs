//! The OpenAI-compatible API's shapes: [`request`] parses and validates bodies into what the
//! pool runs (every rejection names its field); [`response`] builds response bodies and stream
//! chunks. The endpoints and their deviations from OpenAI and llama-server are in docs/API.md.

#[cfg(test)]
mod fuzz_tests;
pub mod grammar;
pub mod llama_server;
pub mod logprobs;
pub mod request;
pub mod response;
#[cfg(test)]
mod shapes_tests;
pub mod timings;

pub use request::{Endpoint, InvalidRequest, ValidRequest};
pub use response::Envelope;
