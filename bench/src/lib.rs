//! The reusable parts of llamapool-bench: the blocking HTTP/SSE client (also used by the
//! end-to-end tests) and the latency metrics.

pub mod http;
pub mod metrics;
