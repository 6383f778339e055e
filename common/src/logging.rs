//! The log set-up of the router's and the worker's binaries (the `logging` feature).

use std::io::IsTerminal;

use crate::settings::LogFormat;

/// Set by the router on the workers it starts: their log lines go to stdout, which the router
/// reads as the worker's own (trusted) lines, while stderr keeps only what native code prints
/// there (llama.cpp's and ggml's own prints, aborts), which the router escapes and wraps.
pub const LOG_TO_STDOUT_ENV: &str = "LLAMAPOOL_LOG_TO_STDOUT";

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), in `format`: text (colours
/// only on a terminal) or JSON (none; one object per line, the event's fields at the top
/// level, the current span's, such as a request's `request_id`, under `span`).
pub fn init(format: LogFormat, default_filter: &str) {
    init_on(format, default_filter, false);
}

/// [`init`], writing to stdout instead of stderr when `to_stdout`.
pub fn init_on(format: LogFormat, default_filter: &str, to_stdout: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let terminal = if to_stdout {
        std::io::stdout().is_terminal()
    } else {
        std::io::stderr().is_terminal()
    };
    let writer = move || -> Box<dyn std::io::Write> {
        if to_stdout {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::io::stderr())
        }
    };
    let builder = builder.with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
}
