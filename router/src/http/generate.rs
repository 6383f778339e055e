//! OpenAI's chat and text completions (`POST /v1/chat/completions`, `POST /v1/completions`):
//! the request adapter ([`plan`]: the body parsed and validated, `n` choices and a batch of
//! prompts fanned out) and the response adapter ([`OpenAiReply`]: the whole response, or
//! the stream's chunks and `[DONE]`). Admission, dispatch, the request log and the stream's
//! plumbing are [`super::pipeline`]'s and [`super::stream`]'s.

use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::protocol::Prompt;
use llamapool_common::{Finish, SeqOutput};

use super::choices::{choice_requests, Collected};
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::slots::{first_slot_of, ignored_eog};
use super::stream::{data, StreamFormat};
use super::template::prompt_text;
use super::SharedState;
use crate::error::ApiError;
use crate::openai::llama_server::{GenerationSettings, NativeFinal, NativeOptions};
use crate::openai::logprobs::Logprobs;
use crate::openai::request::{parse_generation, StreamReports};
use crate::openai::response::FinishedChoice;
use crate::openai::timings::RunningTimings;
use crate::openai::{Endpoint, Envelope};

/// `POST /v1/chat/completions` (and `/chat/completions`).
pub async fn chat(call: GenerationCall) -> Answer {
    openai_route(call, Endpoint::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(call: GenerationCall) -> Answer {
    openai_route(call, Endpoint::Completions).await
}

/// One OpenAI generation, through the one pipeline.
async fn openai_route(call: GenerationCall, endpoint: Endpoint) -> Answer {
    let plan = async { plan(&call.state, &call.body, endpoint) };
    serve(&call.state, &call.request_id, endpoint, plan).await
}

/// The request adapter: the body validated ([`parse_generation`]), its choices fanned out
/// ([`choice_requests`]: `n` for each prompt).
fn plan(
    state: &SharedState,
    body: &[u8],
    endpoint: Endpoint,
) -> Result<Plan<OpenAiReply>, ApiError> {
    let id = state.next_request_id();
    let valid = parse_generation(body, endpoint, &state.served, id)?;
    let verbose = valid.verbose.then(|| {
        let stopping = &valid.generate.stopping;
        let settings = GenerationSettings::new(
            &valid.generate.sampling,
            stopping,
            false,
            &ignored_eog(state, stopping),
        );
        (settings, valid.generate.prompt.clone())
    });
    let reply = OpenAiReply {
        state: state.clone(),
        envelope: Envelope::new(endpoint, &state.served.alias),
        wants_logprobs: valid.generate.sampling.logprobs.is_some(),
        per_prompt: valid.n as usize,
        extras: StreamExtras {
            include_usage: valid.include_usage,
            reports: valid.reports,
        },
        verbose,
    };
    Ok(Plan {
        requests: choice_requests(valid.generate, valid.n, valid.more_prompts, &state.next_id),
        per_prompt: valid.n as usize,
        stream: valid.stream,
        reply,
    })
}

/// What a stream sends besides its text and finish chunks.
#[derive(Debug, Clone, Copy)]
struct StreamExtras {
    /// `stream_options.include_usage`: the usage chunk before `[DONE]`.
    include_usage: bool,
    /// Progress chunks and per-token timings.
    reports: StreamReports,
}

/// The response adapter of the OpenAI routes.
struct OpenAiReply {
    state: SharedState,
    envelope: Envelope,
    wants_logprobs: bool,
    /// Choices for each prompt (`n`).
    per_prompt: usize,
    extras: StreamExtras,
    /// `"verbose": true` (llama-server's): the settings and prompt of the native result
    /// added as `__verbose`.
    verbose: Option<(GenerationSettings, Prompt)>,
}

impl Reply for OpenAiReply {
    type Stream = OpenAiStream;

    fn stream(self, choices: usize) -> OpenAiStream {
        let endpoint = self.envelope.endpoint;
        OpenAiStream {
            logprobs: (0..choices)
                .map(|_| Logprobs::new(endpoint, self.wants_logprobs))
                .collect(),
            timings: vec![RunningTimings::default(); choices],
            made_calls: vec![false; choices],
            envelope: self.envelope,
            extras: self.extras,
        }
    }

    /// The whole response, with `__verbose` when asked for: the first choice's native result
    /// (its prompt as text, rendered by a worker for a chat).
    async fn respond(self, collected: Vec<Collected>) -> Answer {
        let state = &self.state;
        let first = &collected[0];
        let verbose = match self.verbose {
            Some((settings, prompt)) => Some(NativeOptions {
                model: state.served.alias.clone(),
                settings,
                return_tokens: false,
                prompt_tokens: None,
                prompt: prompt_text(state, prompt).await,
                post_sampling_probs: false,
                reports: StreamReports::default(),
            }),
            None => None,
        };
        let endpoint = self.envelope.endpoint;
        let choices = collected
            .iter()
            .map(|c| {
                let mut logprobs = Logprobs::new(endpoint, self.wants_logprobs);
                logprobs.push(&c.logprobs);
                FinishedChoice {
                    text: &c.text,
                    parsed: c.parsed.as_ref(),
                    finish: &c.finish,
                    logprobs: logprobs.take(),
                }
            })
            .collect();
        let mut body = self.envelope.response(choices, self.per_prompt);
        if let Some(options) = &verbose {
            let slot = first_slot_of(state, first.worker).unwrap_or(0);
            body.verbose = Some(NativeFinal::new(
                options,
                slot,
                &first.text,
                &[],
                &first.finish,
            ));
        }
        Ok(Json(body).into_response())
    }
}

/// An OpenAI stream: each choice's role chunk (chat), then the choices' text chunks and
/// finish chunks (each with its `index`) as they come, then the optional usage chunk (summed
/// over the choices) and one `[DONE]`. With `reports`, a choice's progress reports before
/// its first token become `prompt_progress` chunks, and its text chunks carry the `timings`
/// so far.
struct OpenAiStream {
    envelope: Envelope,
    extras: StreamExtras,
    logprobs: Vec<Logprobs>,
    timings: Vec<RunningTimings>,
    /// Per choice: a tool call was streamed, so a stop finishes with `tool_calls`.
    made_calls: Vec<bool>,
}

impl StreamFormat for OpenAiStream {
    fn opening(&mut self) -> Vec<Event> {
        match self.envelope.endpoint {
            Endpoint::Chat => (0..self.timings.len())
                .map(|index| data(&self.envelope.role_chunk(index)))
                .collect(),
            Endpoint::Completions => Vec::new(),
        }
    }

    fn output(&mut self, index: usize, _worker: usize, o: &SeqOutput) -> Vec<Event> {
        let (envelope, reports) = (&self.envelope, self.extras.reports);
        let timings = &mut self.timings[index];
        if o.is_progress() {
            return timings
                .report(o, reports)
                .map(|(progress, running)| data(&envelope.progress_chunk(index, progress, running)))
                .into_iter()
                .collect();
        }
        timings.on_output(o);
        // A chunk carries the log probabilities of the tokens since the last chunk (text held
        // back for a stop string or a partial character waits with them).
        let logprobs = &mut self.logprobs[index];
        logprobs.push(&o.logprobs);
        let mut events = Vec::new();
        let running = || reports.timings.then(|| timings.body());
        if o.parsed {
            // One chunk per change, as llama-server streams a parsed answer.
            for delta in &o.chat {
                self.made_calls[index] |= delta.tool_call.is_some();
                let chunk = envelope.delta_chunk(index, delta, logprobs.take(), running());
                events.push(data(&chunk));
            }
        } else if !o.text.is_empty() {
            let chunk = envelope.text_chunk(index, &o.text, logprobs.take(), running());
            events.push(data(&chunk));
        }
        if let Some(finish) = &o.finish {
            let held_back = logprobs.has_pending().then(|| logprobs.take()).flatten();
            let made_calls = self.made_calls[index];
            events.push(data(
                &envelope.finish_chunk(index, finish, made_calls, held_back),
            ));
        }
        events
    }

    fn closing(&mut self, total: &Finish) -> Vec<Event> {
        let mut events = Vec::new();
        if self.extras.include_usage {
            events.push(data(&self.envelope.usage_chunk(total)));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }
}
