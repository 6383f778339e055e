//! The `request` span of one generation request and the line that ends it.
//!
//! [`RequestLog::start`] opens an `info` span named `request` with the request's `endpoint`
//! and `request_id` (its `x-request-id`); the handler runs inside it, and so does a stream's
//! producer task, so every router line about the request carries both. The other fields are
//! recorded when the request ends, and one line, `request finished`, reports them:
//!
//! | field | value |
//! |---|---|
//! | `endpoint` | `chat` or `completions` |
//! | `request_id` | the `x-request-id` sent back to the client |
//! | `worker` | index of the worker that ran it last (a request moves when its worker dies) |
//! | `prompt_tokens`, `generated_tokens` | usage; for an unfinished request, the tokens received so far and no prompt count |
//! | `ttft_ms` | from the handler's start to the first generated token |
//! | `duration_ms` | from the handler's start to the end |
//! | `status` | the HTTP status sent (200 for a stream, even one that ends with an error event) |
//! | `outcome` | `ok`, `client_error` (4xx other than 429), `cancelled` (the client went away or stopped reading), `failed` (429, 5xx, or a stream's error event) |
//!
//! The line is `info`, or `warn` for `failed`, with the error's message in `error`. It is
//! written when the [`RequestLog`] is dropped, so a request whose handler hyper drops (its
//! client left) still gets one.

use std::time::{Duration, Instant};

use llamapool_common::{Finish, FinishReason, SeqOutput};
use tracing::field::Empty;
use tracing::Span;

use crate::error::ApiError;
use crate::openai::Endpoint;

/// How a request ended, as the `outcome` field says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ClientError,
    Cancelled,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    /// A refusal's outcome by its status: the request's own fault (4xx) or not (429, 5xx).
    pub fn of_error(error: &ApiError) -> Self {
        if error.status.is_client_error() && error.status.as_u16() != 429 {
            Self::ClientError
        } else {
            Self::Failed
        }
    }
}

/// One generation request's span and what its last line reports; see the module doc.
#[derive(Debug)]
pub struct RequestLog {
    span: Span,
    started: Instant,
    worker: Option<usize>,
    ttft: Option<Duration>,
    /// Tokens received so far.
    generated: usize,
    /// The status sent, once committed.
    status: Option<u16>,
    end: Option<End>,
}

#[derive(Debug)]
struct End {
    outcome: Outcome,
    usage: Option<(u32, u32)>,
    error: Option<String>,
}

impl RequestLog {
    pub fn start(endpoint: Endpoint, request_id: &str) -> Self {
        let endpoint = match endpoint {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        };
        let span = tracing::info_span!(
            "request",
            endpoint,
            request_id,
            worker = Empty,
            prompt_tokens = Empty,
            generated_tokens = Empty,
            ttft_ms = Empty,
            duration_ms = Empty,
            status = Empty,
            outcome = Empty,
        );
        Self {
            span,
            started: Instant::now(),
            worker: None,
            ttft: None,
            generated: 0,
            status: None,
            end: None,
        }
    }

    /// The span to run the request's work in (`tracing::Instrument`).
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The request is on `worker` now.
    pub fn on_worker(&mut self, worker: usize) {
        self.worker = Some(worker);
    }

    /// The response is committed with `status` (a stream's 200 before its first event).
    pub fn committed(&mut self, status: u16) {
        self.status = Some(status);
    }

    /// An output arrived from `worker`.
    pub fn on_output(&mut self, output: &SeqOutput, worker: usize) {
        self.worker = Some(worker);
        if !output.tokens.is_empty() && self.ttft.is_none() {
            self.ttft = Some(self.started.elapsed());
        }
        self.generated += output.tokens.len();
    }

    /// The request finished with `finish` (and its response was or will be sent whole).
    pub fn finished(&mut self, finish: &Finish) {
        self.status.get_or_insert(200);
        let outcome = match finish.reason {
            FinishReason::Cancelled => Outcome::Cancelled,
            FinishReason::Stop | FinishReason::Length => Outcome::Ok,
        };
        self.end = Some(End {
            outcome,
            usage: Some((finish.usage.prompt_tokens, finish.usage.completion_tokens)),
            error: None,
        });
    }

    /// The request ended with `error`: its response, or a stream's error event.
    pub fn failed(&mut self, error: &ApiError) {
        // A stream's error event keeps the stream's 200; the error still says whose fault.
        self.status.get_or_insert(error.status.as_u16());
        self.end = Some(End {
            outcome: Outcome::of_error(error),
            usage: None,
            error: Some(error.message.clone()),
        });
    }
}

/// Milliseconds to a tenth.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let end = self.end.take().unwrap_or(End {
            outcome: Outcome::Cancelled,
            usage: None,
            error: None,
        });
        let span = &self.span;
        if let Some(worker) = self.worker {
            span.record("worker", worker);
        }
        match end.usage {
            Some((prompt, generated)) => {
                span.record("prompt_tokens", prompt);
                span.record("generated_tokens", generated);
            }
            None if self.worker.is_some() => {
                span.record("generated_tokens", self.generated);
            }
            None => {}
        }
        if let Some(ttft) = self.ttft {
            span.record("ttft_ms", ms(ttft));
        }
        span.record("duration_ms", ms(self.started.elapsed()));
        if let Some(status) = self.status {
            span.record("status", status);
        }
        span.record("outcome", end.outcome.as_str());
        span.in_scope(|| {
            let error = end.error.as_deref();
            if end.outcome == Outcome::Failed {
                tracing::warn!(error, "request finished");
            } else {
                tracing::info!(error, "request finished");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use llamapool_common::{RequestId, Timings, Usage};
    use serde_json::Value;

    use super::*;
    use crate::log_capture::LogBuffer;

    /// Every line written while `f` runs, as JSON the way the router writes it.
    fn json_lines(f: impl FnOnce()) -> Vec<Value> {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        crate::log_capture::json_lines(&buffer.text())
    }

    fn output(tokens: usize, finish: Option<Finish>) -> SeqOutput {
        SeqOutput {
            id: RequestId(1),
            tokens: vec![7; tokens],
            text: "x".repeat(tokens),
            finish,
            logprobs: Vec::new(),
            progress: None,
            parsed: false,
            chat: Vec::new(),
        }
    }

    #[test]
    fn a_finished_request_reports_every_field_in_its_span() {
        let lines = json_lines(|| {
            let mut log = RequestLog::start(Endpoint::Chat, "test-123");
            log.span().in_scope(|| tracing::info!("inside"));
            log.on_worker(0);
            log.committed(200);
            log.on_output(&output(1, None), 1);
            let finish = Finish {
                reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 9,
                    completion_tokens: 3,
                    cached_tokens: 0,
                },
                timings: Timings::default(),
                stop_word: None,
            };
            log.on_output(&output(2, Some(finish.clone())), 1);
            log.finished(&finish);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["message"], "inside");
        assert_eq!(lines[0]["span"]["request_id"], "test-123");
        let end = &lines[1];
        assert_eq!(end["message"], "request finished");
        assert_eq!(end["level"], "INFO");
        let span = &end["span"];
        assert_eq!(span["name"], "request");
        assert_eq!(span["endpoint"], "chat");
        assert_eq!(span["request_id"], "test-123");
        assert_eq!(span["worker"], 1, "the worker that served it last");
        assert_eq!(span["prompt_tokens"], 9);
        assert_eq!(span["generated_tokens"], 3);
        assert!(span["ttft_ms"].as_f64().is_some(), "{span}");
        assert!(span["duration_ms"].as_f64().is_some(), "{span}");
        assert_eq!(span["status"], 200);
        assert_eq!(span["outcome"], "ok");
    }

    #[test]
    fn a_dropped_request_is_cancelled_and_errors_are_classified() {
        let lines = json_lines(|| {
            let mut log = RequestLog::start(Endpoint::Completions, "gone");
            log.on_worker(0);
            log.on_output(&output(2, None), 0);
            drop(log);
            let error = |status, message: &str| ApiError {
                status,
                kind: "x",
                message: message.into(),
                param: None,
                code: None,
                context: None,
                retry_after: None,
            };
            RequestLog::start(Endpoint::Chat, "bad").failed(&error(StatusCode::BAD_REQUEST, "no"));
            RequestLog::start(Endpoint::Chat, "full")
                .failed(&error(StatusCode::TOO_MANY_REQUESTS, "full"));
            let mut log = RequestLog::start(Endpoint::Chat, "mid-stream");
            log.committed(200);
            log.failed(&error(StatusCode::SERVICE_UNAVAILABLE, "lost"));
        });
        let field = |i: usize, name: &str| lines[i]["span"][name].clone();
        assert_eq!(field(0, "outcome"), "cancelled");
        assert_eq!(field(0, "generated_tokens"), 2);
        assert_eq!(field(0, "endpoint"), "completions");
        assert!(lines[0]["span"].get("status").is_none(), "nothing was sent");
        assert_eq!(
            (field(1, "outcome"), field(1, "status")),
            ("client_error".into(), 400.into())
        );
        assert_eq!(lines[1]["error"], "no");
        assert_eq!(
            (field(2, "outcome"), field(2, "status")),
            ("failed".into(), 429.into())
        );
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(
            (field(3, "outcome"), field(3, "status")),
            ("failed".into(), 200.into())
        );
    }
}
