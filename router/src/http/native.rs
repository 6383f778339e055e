//! llama-server's native API, in its shapes: `POST /completion` (and `/completions`),
//! `GET /props`, `GET /slots` and `POST /apply-template`.
//!
//! `/completion` goes through the same admission, dispatch and request log as the OpenAI
//! endpoints ([`super::generate`]); only the body's prompt forms (a list mixing text and token
//! ids, tokenized here through the workers' `Tokenize` call), the response and the stream
//! differ. A stream is `data: {"content", "stop": false, ...}` events, then one event with
//! `"stop": true` and the whole result, and no `[DONE]` (llama-server's native format).
//! With `return_progress`, `prompt_progress` events (empty `content`) come before the first
//! token's; with `timings_per_token`, every event carries the `timings` so far.
//!
//! Slots: llama-server has one pool of slots; here each worker has its own. `/slots` lists
//! them worker-major (worker 0's slots first), numbered 0 to N-1 over the pool, built from the
//! configuration and the load each worker last pushed (`Progress`); nothing is asked of a
//! worker at request time. `id_slot` in a result is the first slot id of the worker that
//! finished it (which of its slots ran it is not reported by a worker).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llamapool_common::protocol::{ChatPrompt, ControlCall, ControlReply, Prompt};
use llamapool_common::{
    Finish, FinishReason, RequestId, SamplingParams, SeqOutput, StoppingParams, Token, TokenLogprob,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::generate::{
    choice_requests, choice_timers, data, next_output, sse_channel, worker_header, StreamSink,
};
use super::request_id::XRequestId;
use super::request_log::RequestLog;
use super::{LimitedBody, SharedState};
use crate::dispatch::{DispatchError, RequestHandle};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::logprobs;
use crate::openai::request::{
    chat_messages, chat_prompt, native_prompts, parse_json, GenerationBody, MessageBody,
    NativePrompt, PromptPart, ServedModel, StreamReports,
};
use crate::openai::response::{
    progress_json, sum_usage, timings_json, RunningTimings, FINGERPRINT,
};
use crate::openai::{Endpoint, ValidRequest};

/// llama-server's "no seed given: a random one" value in `generation_settings`.
const RANDOM_SEED: u32 = u32::MAX;

/// `POST /completion` and `POST /completions`: llama-server's native completion.
pub async fn completion(
    State(state): State<SharedState>,
    XRequestId(request_id): XRequestId,
    LimitedBody(body): LimitedBody,
) -> Result<Response, ApiError> {
    // Logged as a completions request, like the OpenAI endpoint.
    let log = RequestLog::start(Endpoint::Completions, &request_id);
    let span = log.span().clone();
    let mut log = Some(log);
    let result = respond(&state, request_id, &body, &mut log)
        .instrument(span)
        .await;
    if let (Err(error), Some(log)) = (&result, log.as_mut()) {
        log.failed(error);
    }
    result
}

/// What a native result reports besides the text: the settings it ran with, and whether to
/// return token ids.
#[derive(Debug, Clone)]
struct Native {
    model: String,
    settings: Value,
    return_tokens: bool,
    /// Prompt tokens, when the prompt was given as tokens (known before the finish).
    prompt_tokens: Option<u32>,
    /// The prompt, when it was given as text (`prompt` of the final result).
    prompt: Option<String>,
    /// `post_sampling_probs`: `completion_probabilities` as probabilities (`prob`,
    /// `top_probs`) rather than log probabilities.
    post_sampling_probs: bool,
    /// `return_progress` and `timings_per_token` (streams only).
    reports: StreamReports,
}

impl Native {
    /// These settings for `prompt`: its length when given as tokens, its text when a string.
    fn for_prompt(&self, prompt: &Prompt) -> Self {
        Self {
            prompt_tokens: match prompt {
                Prompt::Tokens(t) => Some(u32::try_from(t.len()).unwrap_or(u32::MAX)),
                _ => None,
            },
            prompt: match prompt {
                Prompt::Text(text) => Some(text.clone()),
                _ => None,
            },
            ..self.clone()
        }
    }
}

async fn respond(
    state: &SharedState,
    request_id: String,
    body: &[u8],
    log: &mut Option<RequestLog>,
) -> Result<Response, ApiError> {
    let timer = RequestTimer::start(state.pool.metrics().clone());
    let permit = state.admit()?;
    let id = RequestId(state.next_id.fetch_add(1, Ordering::Relaxed));
    let (mut valid, return_tokens, post_sampling_probs) = parse_native(state, body, id).await?;
    valid.generate.request_id = request_id;
    let native = Native {
        model: state.served.alias.clone(),
        settings: generation_settings(
            &valid.generate.sampling,
            &valid.generate.stopping,
            valid.stream,
            &ignored_eog(state, &valid.generate.stopping),
        ),
        return_tokens,
        prompt_tokens: None,
        prompt: None,
        post_sampling_probs,
        reports: valid.reports,
    }
    .for_prompt(&valid.generate.prompt);
    if !valid.more_prompts.is_empty() {
        let log = log.as_mut().expect("a batch keeps its log");
        return respond_batch(state, valid, &native, permit, timer, log).await;
    }
    let mut handle = state.pool.submit(valid.generate).await?;
    let first_slot = first_slot_of(state, handle.worker());
    if valid.stream {
        let (sink, body) = sse_channel(state);
        let mut log = log.take().expect("only a stream takes the log");
        log.on_worker(handle.worker());
        let served_by = worker_header(handle.worker());
        log.committed(200);
        let slots = SlotIds(state.pool.views().iter().map(|v| v.slots).collect());
        tokio::spawn(
            feed_stream(handle, native, slots, sink, permit, timer, log)
                .instrument(tracing::Span::current()),
        );
        Ok((served_by, body).into_response())
    } else {
        let log = log.as_mut().expect("a non-streamed request keeps its log");
        log.on_worker(handle.worker());
        let collected = collect(&mut handle, timer, Some(log)).await?;
        log.finished(&collected.finish);
        drop(permit);
        let slot = first_slot_of(state, handle.worker()).unwrap_or(first_slot.unwrap_or(0));
        let served_by = worker_header(handle.worker());
        Ok((served_by, Json(result_json(&native, slot, collected))).into_response())
    }
}

/// llama-server's batch on the native endpoint: one generation per prompt, all dispatched at
/// once (an admission permit each), answered together as an array of results, each with its
/// `index`. A batch is not streamed (400).
async fn respond_batch(
    state: &SharedState,
    valid: ValidRequest,
    native: &Native,
    mut permit: OwnedSemaphorePermit,
    timer: RequestTimer,
    log: &mut RequestLog,
) -> Result<Response, ApiError> {
    if valid.stream {
        return Err(crate::openai::InvalidRequest::Field {
            param: "stream".into(),
            message: "a batch of prompts is answered at once: send it without stream, or one \
                      prompt per streamed request"
                .into(),
        }
        .into());
    }
    state.admit_more(&mut permit, valid.total_choices() - 1)?;
    let requests = choice_requests(valid.generate, 1, valid.more_prompts, &state.next_id);
    let natives: Vec<Native> = requests
        .iter()
        .map(|r| native.for_prompt(&r.prompt))
        .collect();
    let mut handles = state.pool.submit_all(requests).await?;
    log.on_worker(handles[0].worker());
    let timers = choice_timers(state, timer, handles.len());
    let collected = futures_util::future::try_join_all(
        handles
            .iter_mut()
            .zip(timers)
            .map(|(handle, timer)| collect(handle, timer, None)),
    )
    .await?;
    let mut total = collected[0].finish.clone();
    total.usage = sum_usage(collected.iter().map(|c| &c.finish.usage), 1);
    log.finished(&total);
    drop(permit);
    let results: Vec<Value> = collected
        .into_iter()
        .zip(&natives)
        .zip(&handles)
        .enumerate()
        .map(|(index, ((collected, native), handle))| {
            let slot = first_slot_of(state, handle.worker()).unwrap_or(0);
            let mut result = result_json(native, slot, collected);
            result["index"] = json!(index);
            result
        })
        .collect();
    let served_by = worker_header(handles[0].worker());
    Ok((served_by, Json(Value::Array(results))).into_response())
}

/// A non-streamed generation's whole output.
struct Collected {
    text: String,
    tokens: Vec<Token>,
    probs: Vec<TokenLogprob>,
    finish: Finish,
}

/// Reads `handle` to its finish, timing it with `timer` and logging each output in `log`.
async fn collect(
    handle: &mut RequestHandle,
    mut timer: RequestTimer,
    mut log: Option<&mut RequestLog>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut probs = Vec::new();
    loop {
        let output = next_output(handle).await?;
        timer.on_output(&output);
        if let Some(log) = log.as_deref_mut() {
            log.on_output(&output, handle.worker());
        }
        text.push_str(&output.text);
        tokens.extend_from_slice(&output.tokens);
        probs.extend_from_slice(&output.logprobs);
        if let Some(finish) = output.finish {
            handle.guard.finished();
            timer.finish();
            return Ok(Collected {
                text,
                tokens,
                probs,
                finish,
            });
        }
    }
}

/// The final result of a collected generation: token ids only with `return_tokens`, and
/// `completion_probabilities` when there are any (as llama-server: only a non-streamed final
/// result has them).
fn result_json(native: &Native, slot: u32, collected: Collected) -> Value {
    let tokens = if native.return_tokens {
        collected.tokens
    } else {
        Vec::new()
    };
    let mut result = final_result(native, slot, &collected.text, &tokens, &collected.finish);
    if !collected.probs.is_empty() {
        result["completion_probabilities"] =
            logprobs::native(&collected.probs, native.post_sampling_probs);
    }
    result
}

/// Most strings in the mixed prompts (`["text", 123, "text"]`) of one request: each is a
/// `Tokenize` control call to a worker, made one after another under one control permit.
pub const MAX_PROMPT_TEXT_PARTS: usize = 256;

/// The body validated like an OpenAI completion, with the native prompt forms (a batch's
/// prompts after the first in `more_prompts`); a mixed prompt is tokenized here (its first
/// text part with BOS, as llama-server does).
async fn parse_native(
    state: &SharedState,
    body: &[u8],
    id: RequestId,
) -> Result<(ValidRequest, bool, bool), ApiError> {
    let mut body: GenerationBody = parse_json(body)?;
    let served: &ServedModel = &state.served;
    body.check_common(served)?;
    // llama-server's native result has no list of choices.
    if body.choices()? != 1 {
        return Err(crate::openai::InvalidRequest::Field {
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
        return Err(crate::openai::InvalidRequest::Field {
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
    Ok((valid, return_tokens, post_sampling_probs))
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

/// Each worker's slot count, in worker order: maps a worker to its first pool-wide slot id.
#[derive(Debug, Clone)]
struct SlotIds(Vec<u32>);

impl SlotIds {
    fn first_of(&self, worker: usize) -> u32 {
        self.0.iter().take(worker).sum()
    }
}

pub(super) fn first_slot_of(state: &SharedState, worker: usize) -> Option<u32> {
    let views = state.pool.views();
    (worker < views.len())
        .then(|| SlotIds(views.iter().map(|v| v.slots).collect()).first_of(worker))
}

/// Feeds one native stream: a `stop: false` event per output that has text (or tokens, with
/// `return_tokens`), then the final `stop: true` event. No `[DONE]`. With `native.reports`,
/// progress reports before the first token become `prompt_progress` events and token events
/// carry `timings`.
async fn feed_stream(
    mut handle: RequestHandle,
    native: Native,
    slots: SlotIds,
    sink: StreamSink,
    _permit: OwnedSemaphorePermit,
    mut timer: RequestTimer,
    mut log: RequestLog,
) {
    let mut predicted: u32 = 0;
    let mut timings = RunningTimings::default();
    loop {
        let output = tokio::select! {
            output = next_output(&mut handle) => output,
            () = sink.tx.closed() => return,
        };
        match output {
            Ok(o) if o.is_progress() => {
                log.on_output(&o, handle.worker());
                if let Some(chunk) = progress_result(&native, &mut timings, &o) {
                    if !sink.send(data(&chunk)).await {
                        return;
                    }
                }
            }
            Ok(o) => {
                timings.on_output(&o);
                timer.on_output(&o);
                log.on_output(&o, handle.worker());
                predicted += u32::try_from(o.tokens.len()).unwrap_or(u32::MAX);
                let slot = slots.first_of(handle.worker());
                // One event per token, as llama-server (text held back for a possible stop
                // string makes an empty `content`); the last token's only if it has text.
                if !o.text.is_empty() || (o.finish.is_none() && !o.tokens.is_empty()) {
                    let mut chunk = partial_result(&native, &o.text, &o.tokens, predicted);
                    if let Some(n) = timings.prompt_tokens() {
                        chunk["tokens_evaluated"] = json!(n);
                    }
                    if native.reports.timings {
                        chunk["timings"] = timings.json();
                    }
                    if !o.logprobs.is_empty() {
                        chunk["completion_probabilities"] =
                            logprobs::native(&o.logprobs, native.post_sampling_probs);
                    }
                    if !sink.send(data(&chunk)).await {
                        return;
                    }
                }
                if let Some(finish) = o.finish {
                    handle.guard.finished();
                    timer.finish();
                    log.finished(&finish);
                    // As llama-server: the final event of a stream repeats no text or tokens.
                    sink.send(data(&final_result(&native, slot, "", &[], &finish)))
                        .await;
                    return;
                }
            }
            Err(error) => {
                log.failed(&error);
                sink.send(data(&error.body_json())).await;
                return;
            }
        }
    }
}

/// A progress event (llama-server's partial result with `prompt_progress`: no content, no
/// tokens), if it is to be sent ([`RunningTimings::report`]).
fn progress_result(
    native: &Native,
    timings: &mut RunningTimings,
    output: &SeqOutput,
) -> Option<Value> {
    let (progress, running) = timings.report(output, native.reports)?;
    let mut chunk = partial_result(native, "", &[], 0);
    chunk["tokens_evaluated"] = json!(progress.total);
    if let Some(running) = running {
        chunk["timings"] = running;
    }
    chunk["prompt_progress"] = progress_json(&progress);
    Some(chunk)
}

/// A stream's `stop: false` event: the output's text and tokens (always, as llama-server),
/// `id_slot` -1 as llama-server's partial results have it.
fn partial_result(native: &Native, text: &str, tokens: &[Token], predicted: u32) -> Value {
    let mut chunk = json!({
        "index": 0,
        "content": text,
        "tokens": tokens,
        "stop": false,
        "id_slot": -1,
        "tokens_predicted": predicted,
    });
    if let Some(n) = native.prompt_tokens {
        chunk["tokens_evaluated"] = json!(n);
    }
    chunk
}

/// llama-server's final result (`to_json_non_oaicompat`), without `completion_probabilities`;
/// `prompt` only for a text prompt; `stop_type` as [`stop_type`] says.
fn final_result(
    native: &Native,
    slot: u32,
    text: &str,
    tokens: &[Token],
    finish: &Finish,
) -> Value {
    let (stop_type, stopping_word) = stop_type(finish);
    let mut result = json!({
        "index": 0,
        "content": text,
        "tokens": tokens,
        "id_slot": slot,
        "stop": true,
        "model": native.model,
        "tokens_predicted": finish.usage.completion_tokens,
        "tokens_evaluated": finish.usage.prompt_tokens,
        "generation_settings": native.settings,
        "has_new_line": text.contains('\n'),
        "truncated": false,
        "stop_type": stop_type,
        "stopping_word": stopping_word,
        "tokens_cached": finish.usage.cached_tokens,
        "timings": timings_json(&finish.usage, &finish.timings),
    });
    if let Some(prompt) = &native.prompt {
        result["prompt"] = json!(prompt);
    }
    result
}

/// The tokens `ignore_eos` bans: the served model's end-of-generation tokens, as a ready worker
/// reported them; none without `ignore_eos` (or while no worker is ready).
pub(super) fn ignored_eog(state: &SharedState, stopping: &StoppingParams) -> Vec<Token> {
    if !stopping.ignore_eos {
        return Vec::new();
    }
    state
        .pool
        .worker_info()
        .map(|info| info.model.eog_tokens)
        .unwrap_or_default()
}

/// llama-server's `__verbose` of a non-streamed OpenAI-shaped result: the native final result
/// of the first choice, with the prompt as text when there is one (no token ids).
pub(super) fn verbose_result(
    model: &str,
    settings: Value,
    prompt: Option<String>,
    slot: u32,
    text: &str,
    finish: &Finish,
) -> Value {
    let native = Native {
        model: model.to_owned(),
        settings,
        return_tokens: false,
        prompt_tokens: None,
        prompt,
        post_sampling_probs: false,
        reports: StreamReports::default(),
    };
    final_result(&native, slot, text, &[], finish)
}

/// `stop_type` and `stopping_word`: `word` and the string for a stop string, `eos` for an
/// end-of-generation token, `limit` for the token limit or a full context.
fn stop_type(finish: &Finish) -> (&'static str, &str) {
    match (finish.reason, &finish.stop_word) {
        (FinishReason::Stop, Some(word)) => ("word", word),
        (FinishReason::Stop, None) => ("eos", ""),
        (FinishReason::Length, _) => ("limit", ""),
        (FinishReason::Cancelled, _) => ("none", ""),
    }
}

/// llama-server's `generation_settings` (`task_params::to_json`), for the settings this
/// server has: `n_predict` -1 is no limit, `seed` 4294967295 a random one per request.
/// `logit_bias` lists `{"bias", "token"}` (a ban's bias is `null`, JSON's −∞), then the
/// tokens `ignore_eos` bans ([`ignored_eog`]), as llama-server reports them.
pub(super) fn generation_settings(
    sampling: &SamplingParams,
    stopping: &StoppingParams,
    stream: bool,
    ignored_eog: &[Token],
) -> Value {
    let n_predict = stopping.max_tokens.map_or(-1, i64::from);
    let banned_eog = ignored_eog.iter().map(|&t| (t, f32::NEG_INFINITY));
    let logit_bias: Vec<Value> = sampling
        .logit_bias
        .iter()
        .copied()
        .chain(banned_eog)
        .map(|(token, bias)| json!({"bias": bias.is_finite().then_some(bias), "token": token}))
        .collect();
    json!({
        "seed": sampling.seed.unwrap_or(RANDOM_SEED),
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "typical_p": 1.0,
        "repeat_last_n": sampling.repeat_last_n,
        "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "ignore_eos": stopping.ignore_eos,
        "cache_prompt": stopping.cache_prompt,
        "stream": stream,
        "stop": stopping.stop,
        "n_probs": sampling.logprobs.unwrap_or(0),
        "min_keep": 0,
        "logit_bias": logit_bias,
    })
}

/// `GET /props`: the server's defaults and what it serves. `default_generation_settings.params`
/// are the `[generation]` defaults; `n_ctx` is the largest per-sequence context of the ready
/// workers (`null` while none is ready); `chat_template` the one the workers use.
pub async fn props(State(state): State<SharedState>) -> Json<Value> {
    let info = state.pool.worker_info();
    let defaults = &state.served.defaults;
    let stopping = StoppingParams {
        max_tokens: defaults.max_tokens(),
        ..StoppingParams::default()
    };
    let params = generation_settings(&defaults.sampling(), &stopping, false, &[]);
    Json(json!({
        "default_generation_settings": {
            "params": params,
            "n_ctx": info.as_ref().map(|i| i.n_ctx_per_seq),
        },
        "total_slots": state.pool.total_slots(),
        "model_alias": state.served.alias,
        "model_path": state.model_path,
        "modalities": {"vision": false, "video": false, "audio": false},
        "endpoint_slots": true,
        "endpoint_props": true,
        "endpoint_metrics": true,
        "chat_template": info.as_ref().map_or("", |i| i.model.chat_template.as_str()),
        "build_info": FINGERPRINT,
        "is_sleeping": false,
    }))
}

/// `GET /slots`: one entry per slot of the pool, worker-major, ids 0 to N-1. `is_processing`
/// counts a worker's first `running` slots as busy (a worker reports how many sequences run,
/// not which); `n_ctx` is its per-sequence context (before its first start: the configured
/// `context / slots`, so a worker still loading shows what it will hold). 501 with
/// `server.slots_endpoint = false` (llama-server's `--no-slots`).
pub async fn slots(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    if !state.slots_endpoint {
        return Err(ApiError::not_supported(
            "This server does not support slots endpoint. Start it with `--slots`",
        ));
    }
    let mut slots = Vec::new();
    let mut next_id: u32 = 0;
    for view in state.pool.views() {
        let running = view.running.unwrap_or(0);
        for j in 0..view.slots {
            slots.push(json!({
                "id": next_id,
                "id_worker": view.id,
                "n_ctx": view.n_ctx_per_seq.unwrap_or(view.context / view.slots.max(1)),
                "speculative": false,
                "is_processing": j < running,
            }));
            next_id += 1;
        }
    }
    Ok(Json(Value::Array(slots)))
}

/// The part of an `/apply-template` or `/chat/completions/input_tokens` body that is read.
#[derive(Debug, Deserialize)]
struct ApplyTemplateBody {
    messages: Option<Vec<MessageBody>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
}

/// `POST /apply-template`: `{"messages"}` rendered with the model's chat template by a worker,
/// as a chat request's prompt would be → `{"prompt"}`. Holds a tokenize-call permit.
pub async fn apply_template(
    State(state): State<SharedState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Value>, ApiError> {
    let _permit = state.admit_control()?;
    let prompt = render_chat(&state, &body).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// `POST /chat/completions/input_tokens` (also under `/v1`), llama-server's token count: how
/// many prompt tokens a chat request with these `messages` would have (the template rendered
/// and tokenized by a worker, as for generation) → `{"input_tokens"}`. The rest of the chat
/// body is ignored. Holds a tokenize-call permit.
pub async fn chat_input_tokens(
    State(state): State<SharedState>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Value>, ApiError> {
    let _permit = state.admit_control()?;
    let content = render_chat(&state, &body).await?;
    let call = ControlCall::Tokenize {
        content,
        add_special: true,
        with_pieces: false,
    };
    match state.pool.control(call).await? {
        ControlReply::Tokenized { tokens, .. } => Ok(Json(json!({ "input_tokens": tokens.len() }))),
        ControlReply::Failed { message } => Err(ApiError::refused("messages", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

/// A prompt as text for `__verbose`: a text prompt as given, a chat rendered by a worker (one
/// control call; `None` if it fails), token ids not at all.
pub(super) async fn prompt_text(state: &SharedState, prompt: Prompt) -> Option<String> {
    match prompt {
        Prompt::Text(text) => Some(text),
        Prompt::Tokens(_) => None,
        Prompt::Chat(chat) => apply_template_call(state, chat).await.ok(),
    }
}

/// The `messages` of a body rendered by a worker with the chat template, ending as its
/// `add_generation_prompt` and `continue_final_message` say.
async fn render_chat(state: &SharedState, body: &[u8]) -> Result<String, ApiError> {
    let body: ApplyTemplateBody = parse_json(body)?;
    let chat = chat_prompt(
        chat_messages(body.messages)?,
        body.add_generation_prompt,
        body.continue_final_message,
    )?;
    apply_template_call(state, chat).await
}

/// `chat` rendered by a worker with the chat template (the `ApplyTemplate` control call).
async fn apply_template_call(state: &SharedState, chat: ChatPrompt) -> Result<String, ApiError> {
    match state
        .pool
        .control(ControlCall::ApplyTemplate { chat })
        .await?
    {
        ControlReply::Rendered { prompt } => Ok(prompt),
        ControlReply::Failed { message } => Err(ApiError::refused("messages", message)),
        other => Err(DispatchError::UnexpectedReply(format!("{other:?}")).into()),
    }
}

#[cfg(test)]
mod tests {
    use llamapool_common::{PromptProgress, RequestId, Timings, Usage};

    use super::*;

    #[test]
    fn final_result_has_llama_server_fields() {
        let native = Native {
            model: "m".into(),
            settings: generation_settings(
                &SamplingParams::greedy(),
                &StoppingParams {
                    max_tokens: Some(4),
                    ..StoppingParams::default()
                },
                false,
                &[2],
            ),
            return_tokens: true,
            prompt_tokens: None,
            prompt: Some("p".into()),
            post_sampling_probs: false,
            reports: StreamReports::default(),
        };
        let finish = Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 1,
            },
            timings: Timings {
                queue_ms: 0.0,
                prompt_ms: 3.0,
                predicted_ms: 8.0,
            },
            stop_word: None,
        };
        let r = final_result(&native, 2, "a\nb", &[1, 2], &finish);
        assert_eq!(r["stop"], true);
        assert_eq!(r["stop_type"], "limit");
        assert_eq!(r["tokens_predicted"], 4);
        assert_eq!(r["tokens_evaluated"], 3);
        assert_eq!(r["has_new_line"], true);
        assert_eq!(r["id_slot"], 2);
        assert_eq!(r["tokens"], json!([1, 2]));
        assert_eq!(r["generation_settings"]["n_predict"], 4);
        assert_eq!(r["generation_settings"]["seed"], u64::from(RANDOM_SEED));
        // 4 tokens, 3 decode steps after the first in 8 ms.
        assert_eq!(r["timings"]["predicted_per_second"], 375.0);
        assert_eq!(r["tokens_cached"], 1);
        assert_eq!(r["timings"]["cache_n"], 1);
        assert_eq!(r["timings"]["prompt_n"], 2);
        assert_eq!(r["generation_settings"]["cache_prompt"], true);
        let word = Finish {
            reason: FinishReason::Stop,
            stop_word: Some(".".into()),
            ..finish.clone()
        };
        assert_eq!(stop_type(&word), ("word", "."));
        let eos = Finish {
            stop_word: None,
            ..word
        };
        assert_eq!(stop_type(&eos), ("eos", ""));
        assert_eq!(r["prompt"], "p");
        let chunk = partial_result(&native, "x", &[], 1);
        assert_eq!(chunk["stop"], false);
        assert!(chunk.get("tokens_evaluated").is_none());
        assert_eq!(SlotIds(vec![2, 3, 1]).first_of(2), 5);
    }

    #[test]
    fn progress_events_have_llama_server_shape_until_the_first_token() {
        let native = Native {
            model: "m".into(),
            settings: Value::Null,
            return_tokens: false,
            prompt_tokens: None,
            prompt: None,
            post_sampling_probs: false,
            reports: StreamReports {
                progress: true,
                timings: true,
            },
        };
        let report = SeqOutput::progress(
            RequestId(1),
            PromptProgress {
                total: 5,
                cache: 1,
                processed: 3,
                time_ms: 2.0,
            },
        );
        let mut timings = RunningTimings::default();
        let chunk = progress_result(&native, &mut timings, &report).unwrap();
        assert_eq!(chunk["content"], "");
        assert_eq!(chunk["tokens"], json!([]));
        assert_eq!(chunk["stop"], false);
        assert_eq!(chunk["tokens_evaluated"], 5);
        assert_eq!(
            chunk["prompt_progress"],
            json!({"total": 5, "cache": 1, "processed": 3, "time_ms": 2.0})
        );
        assert_eq!(chunk["timings"]["prompt_n"], 2);
        assert_eq!(chunk["timings"]["predicted_n"], 0);
        // Not asked for: nothing; after the first token: nothing.
        let quiet = Native {
            reports: StreamReports::default(),
            ..native.clone()
        };
        assert!(progress_result(&quiet, &mut RunningTimings::default(), &report).is_none());
        timings.on_output(&SeqOutput {
            tokens: vec![7],
            progress: None,
            ..report.clone()
        });
        assert!(progress_result(&native, &mut timings, &report).is_none());
    }
}
