//! The llamapool router: OpenAI-compatible HTTP (hyper 1.x) in front of a pool of worker
//! processes reached over Unix sockets.
//!
//! - [`config`]: settings from file, environment and flags.
//! - [`openai`]: request validation and response shapes; [`error`]: the one error → HTTP map.
//! - [`server`]: routing, handlers, SSE; [`dispatch`]: the pool, worker connections, abort guards.
//! - [`metrics`]: Prometheus counters.

pub mod config;
pub mod dispatch;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod server;
