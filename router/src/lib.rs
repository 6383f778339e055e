//! The llamapool router: OpenAI-compatible HTTP (axum on hyper 1.x) in front of a pool of
//! worker processes reached over Unix sockets. Modules depend in one direction:
//! `http` → `openai`, `dispatch`, `error`; `error` → `openai`, `dispatch`; `dispatch` →
//! `metrics`. docs/ARCHITECTURE.md traces a request through them.
//!
//! - [`config`]: settings from file, environment and flags.
//! - [`anthropic`]: Anthropic's Messages API bodies, both ways.
//! - [`http`]: the route table, handlers, SSE, body limits and API keys.
//! - [`openai`]: request bodies (typed, validated) and response shapes.
//! - [`error`]: the one mapping of every layer's errors to HTTP.
//! - [`dispatch`]: the pool, worker connections, abort guards; no HTTP types.
//! - [`drain`]: the node's drain flag (`/health` turns 503 while it is set).
//! - [`metrics`]: Prometheus counters.
//! - [`llama_flags`]: llama-server's command line, as configuration overrides.
//! - [`reload`]: the configuration source of `POST /admin/reload`.
//! - [`responses`]: OpenAI's Responses API bodies, both ways.

pub mod anthropic;
pub mod config;
pub mod dispatch;
pub mod drain;
pub mod error;
pub mod http;
pub mod llama_flags;
#[cfg(test)]
mod log_capture;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod reload;
pub mod responses;
