//! llama-server's native completion, `POST /completion` (and `/completions`): the request
//! adapter ([`plan`]: the body validated like an OpenAI completion, with the native prompt
//! forms — a list mixing text and token ids is tokenized here through the workers'
//! `Tokenize` call — and a batch of prompts fanned out) and the response adapter
//! ([`NativeReply`]). Admission, dispatch, the request log and the stream's plumbing are
//! [`super::pipeline`]'s and [`super::stream`]'s; the bodies are
//! [`crate::openai::llama_server`]'s.
//!
//! A stream is `data: {"content", "stop": false, ...}` events, then one event with
//! `"stop": true` and the whole result, and no `[DONE]` (llama-server's native format).
//! With `return_progress`, `prompt_progress` events (empty `content`) come before the first
//! token's; with `timings_per_token`, every event carries the `timings` so far. A batch of
//! prompts is answered at once, as an array of results each with its `index`.

use axum::response::sse::Event;
use axum::response::IntoResponse;
use axum::Json;
use llamapool_common::protocol::{ControlCall, ControlReply, Prompt};
use llamapool_common::{Finish, RequestId, SeqOutput, Token};

use super::choices::{choice_requests, Collected};
use super::pipeline::{serve, Answer, GenerationCall, Plan, Reply};
use super::slots::{ignored_eog, SlotIds};
use super::stream::{data, StreamFormat};
use super::SharedState;
use crate::dispatch::DispatchError;
use crate::error::ApiError;
use crate::openai::llama_server::{GenerationSettings, NativeFinal, NativeOptions, NativePartial};
use crate::openai::logprobs;
use crate::openai::request::{
    native_prompts, parse_json, GenerationBody, NativePrompt, PromptPart, ServedModel,
};
use crate::openai::timings::RunningTimings;
use crate::openai::{Endpoint, InvalidRequest, ValidRequest};

/// `POST /completion` and `POST /completions`: llama-server's native completion, logged as a
/// completions request like the OpenAI endpoint.
pub async fn completion(call: GenerationCall) -> Answer {
    let plan = plan(&call.state, &call.body);
    serve(&call.state, &call.request_id, Endpoint::Completions, plan).await
}

/// The request adapter: one generation per prompt (a batch is not streamed: 400).
async fn plan(state: &SharedState, body: &[u8]) -> Result<Plan<NativeReply>, ApiError> {
    let parsed = parse_native(state, body, state.next_request_id()).await?;
    let valid = parsed.valid;
    let batch = !valid.more_prompts.is_empty();
    if batch && valid.stream {
        return Err(InvalidRequest::Field {
            param: "stream".into(),
            message: "a batch of prompts is answered at once: send it without stream, or one \
                      prompt per streamed request"
                .into(),
        }
        .into());
    }
    let stopping = &valid.generate.stopping;
    let options = NativeOptions {
        model: state.served.alias.clone(),
        settings: GenerationSettings::new(
            &valid.generate.sampling,
            stopping,
            valid.stream,
            &ignored_eog(state, stopping),
        ),
        return_tokens: parsed.return_tokens,
        prompt_tokens: None,
        prompt: None,
        post_sampling_probs: parsed.post_sampling_probs,
        reports: valid.reports,
    };
    let stream = valid.stream;
    let requests = choice_requests(valid.generate, 1, valid.more_prompts, &state.next_id);
    let options = requests
        .iter()
        .map(|r| for_prompt(&options, &r.prompt))
        .collect();
    Ok(Plan {
        requests,
        per_prompt: 1,
        stream,
        reply: NativeReply {
            state: state.clone(),
            options,
            batch,
            slots: SlotIds::of(state),
        },
    })
}

/// `options` for `prompt`: its length when given as tokens, its text when a string.
fn for_prompt(options: &NativeOptions, prompt: &Prompt) -> NativeOptions {
    NativeOptions {
        prompt_tokens: match prompt {
            Prompt::Tokens(t) => Some(u32::try_from(t.len()).unwrap_or(u32::MAX)),
            _ => None,
        },
        prompt: match prompt {
            Prompt::Text(text) => Some(text.clone()),
            _ => None,
        },
        ..options.clone()
    }
}

/// The response adapter of the native route.
struct NativeReply {
    state: SharedState,
    /// Each prompt's options, in order.
    options: Vec<NativeOptions>,
    /// A batch is answered as an array.
    batch: bool,
    /// The pool's slot numbering when the request came in (a stream's `id_slot`).
    slots: SlotIds,
}

impl Reply for NativeReply {
    type Stream = NativeStream;

    fn stream(mut self, _choices: usize) -> NativeStream {
        NativeStream {
            options: self.options.swap_remove(0),
            slots: self.slots,
            predicted: 0,
            timings: RunningTimings::default(),
        }
    }

    /// Each result as llama-server's final result: token ids only with `return_tokens`, and
    /// `completion_probabilities` when there are any (as llama-server: only a non-streamed
    /// final result has them).
    async fn respond(self, collected: Vec<Collected>) -> Answer {
        // The numbering now, once for every result of a batch.
        let slots = SlotIds::of(&self.state);
        let results: Vec<NativeFinal> = collected
            .iter()
            .zip(&self.options)
            .enumerate()
            .map(|(index, (c, options))| {
                let slot = slots.of_worker(c.worker).unwrap_or(0);
                let tokens: &[Token] = if options.return_tokens {
                    &c.tokens
                } else {
                    &[]
                };
                let mut result = NativeFinal::new(options, slot, &c.text, tokens, &c.finish);
                result.index = index;
                result.completion_probabilities = (!c.logprobs.is_empty())
                    .then(|| logprobs::native(&c.logprobs, options.post_sampling_probs));
                result
            })
            .collect();
        Ok(if self.batch {
            Json(results).into_response()
        } else {
            Json(&results[0]).into_response()
        })
    }
}

/// A native stream: a `stop: false` event per output that has text (or tokens), then the
/// final `stop: true` event. No `[DONE]`. With `reports`, progress reports before the first
/// token become `prompt_progress` events and token events carry `timings`.
struct NativeStream {
    options: NativeOptions,
    slots: SlotIds,
    /// Tokens generated so far.
    predicted: u32,
    timings: RunningTimings,
}

impl StreamFormat for NativeStream {
    fn output(&mut self, _index: usize, worker: usize, o: &SeqOutput) -> Vec<Event> {
        let options = &self.options;
        if o.is_progress() {
            return self
                .timings
                .report(o, options.reports)
                .map(|(progress, running)| {
                    data(&NativePartial::progress(options, progress, running))
                })
                .into_iter()
                .collect();
        }
        self.timings.on_output(o);
        self.predicted += u32::try_from(o.tokens.len()).unwrap_or(u32::MAX);
        let mut events = Vec::new();
        // One event per token, as llama-server (text held back for a possible stop string
        // makes an empty `content`); the last token's only if it has text.
        if !o.text.is_empty() || (o.finish.is_none() && !o.tokens.is_empty()) {
            let mut partial = NativePartial::new(options, &o.text, &o.tokens, self.predicted);
            partial.tokens_evaluated = self.timings.prompt_tokens().or(options.prompt_tokens);
            partial.timings = options.reports.timings.then(|| self.timings.body());
            partial.completion_probabilities = (!o.logprobs.is_empty())
                .then(|| logprobs::native(&o.logprobs, options.post_sampling_probs));
            events.push(data(&partial));
        }
        if let Some(finish) = &o.finish {
            // As llama-server: the final event of a stream repeats no text or tokens.
            let slot = self.slots.first_of(worker);
            events.push(data(&NativeFinal::new(options, slot, "", &[], finish)));
        }
        events
    }

    fn closing(&mut self, _total: &Finish) -> Vec<Event> {
        Vec::new()
    }
}

/// Most strings in the mixed prompts (`["text", 123, "text"]`) of one request: each is a
/// `Tokenize` control call to a worker, made one after another under one control permit.
pub const MAX_PROMPT_TEXT_PARTS: usize = 256;

/// A native body, validated.
struct ParsedNative {
    /// Validated like an OpenAI completion; a batch's prompts after the first in
    /// `more_prompts`.
    valid: ValidRequest,
    return_tokens: bool,
    post_sampling_probs: bool,
}

/// The body validated like an OpenAI completion, with the native prompt forms; a mixed
/// prompt is tokenized here (its first text part with BOS, as llama-server does).
async fn parse_native(
    state: &SharedState,
    body: &[u8],
    id: RequestId,
) -> Result<ParsedNative, ApiError> {
    let mut body: GenerationBody = parse_json(body)?;
    let served: &ServedModel = &state.served;
    body.check_common(served)?;
    // llama-server's native result has no list of choices.
    if body.choices()? != 1 {
        return Err(InvalidRequest::Field {
            param: "n".into(),
            message: "the native /completion endpoint returns one result; n must be 1".into(),
        }
        .into());
    }
    let sampling = body.sampling(&served.defaults)?;
    let return_tokens = body.return_tokens.unwrap_or(false);
    let post_sampling_probs = body.post_sampling_probs.unwrap_or(false);
    let native = native_prompts(body.prompt.take())?;
    let texts: usize = native
        .iter()
        .map(|prompt| match prompt {
            NativePrompt::Mixed(parts) => parts
                .iter()
                .filter(|part| matches!(part, PromptPart::Text(_)))
                .count(),
            NativePrompt::Ready(_) => 0,
        })
        .sum();
    if texts > MAX_PROMPT_TEXT_PARTS {
        return Err(InvalidRequest::Field {
            param: "prompt".into(),
            message: format!(
                "a request's prompts mixing text and token ids may hold at most {MAX_PROMPT_TEXT_PARTS} strings in all (each is a tokenize call), got {texts}"
            ),
        }
        .into());
    }
    // The tokenize calls count against the control-call limit, as /tokenize's do.
    let _permit = (texts > 0).then(|| state.admit_control()).transpose()?;
    let mut prompts = Vec::new();
    for prompt in native {
        prompts.push(match prompt {
            NativePrompt::Ready(prompt) => prompt,
            NativePrompt::Mixed(parts) => Prompt::Tokens(tokenize_mixed(state, parts).await?),
        });
    }
    let first = prompts.remove(0);
    let mut valid = body.finish_valid(Endpoint::Completions, served, id, first, sampling)?;
    valid.more_prompts = prompts;
    Ok(ParsedNative {
        valid,
        return_tokens,
        post_sampling_probs,
    })
}

async fn tokenize_mixed(
    state: &SharedState,
    parts: Vec<PromptPart>,
) -> Result<Vec<Token>, ApiError> {
    let mut tokens = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        match part {
            PromptPart::Token(t) => tokens.push(t),
            PromptPart::Text(content) => {
                let call = ControlCall::Tokenize {
                    content,
                    add_special: i == 0,
                    with_pieces: false,
                };
                match state.pool.control(call).await? {
                    ControlReply::Tokenized { tokens: t, .. } => tokens.extend(t),
                    ControlReply::Failed { message } => {
                        return Err(ApiError::refused("prompt", message))
                    }
                    other => {
                        return Err(DispatchError::UnexpectedReply(format!("{other:?}")).into())
                    }
                }
            }
        }
    }
    Ok(tokens)
}
