//! The reusable part of llamapool-bench: the latency metrics. (The blocking HTTP/SSE client it
//! drives routers with lives in `llamapool-testkit`, shared with the end-to-end tests.)

pub mod metrics;
