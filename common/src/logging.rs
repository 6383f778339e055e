//! The log set-up of the router's and the worker's binaries (the `logging` feature).

use std::io::IsTerminal;

use crate::settings::LogFormat;

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), in `format`: text (colours
/// only on a terminal) or JSON (none; one object per line, the event's fields at the top
/// level, the current span's, such as a request's `request_id`, under `span`).
pub fn init(format: LogFormat, default_filter: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
