//! The one path every generating route takes ([`serve`]): the request's log and span,
//! admission (429 when full), the route's request adapter ([`Plan`]), dispatch of every
//! choice, then either the route's streamed shape fed by a producer task ([`super::stream`])
//! or the collected outputs handed to the route's response adapter ([`Reply`]).
//!
//! A route is thus two adapters: a function that turns a body into a [`Plan`] (the
//! `GenerateRequest`s to run and a [`Reply`]), and that [`Reply`]: how a finished request's
//! outputs become a body, and how a stream's outputs become events. Admission, dispatch,
//! the request log, metrics timers, aborts and client disconnects are handled here alike.
//!
//! Several choices (`n` > 1, or a batch of prompts) fan out here, in the router: independent
//! `GenerateRequest`s ([`choice_requests`]), each holding one admission permit (a choice
//! occupies a sequence like any request; 429 when the pool cannot take them all), submitted
//! together, so they may run on different workers. The response is committed once every
//! choice was accepted; their outputs are merged as they come ([`Choices`]), and the first
//! failure ends the whole request (the other choices are aborted).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::{Finish, FinishReason, RequestId, SeqOutput, Token, TokenLogprob};
use tracing::Instrument;

use super::request_log::RequestLog;
use super::stream::{feed, sse_channel, StreamFormat};
use super::SharedState;
use crate::dispatch::{DispatchError, RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::response::sum_usage;
use crate::openai::Endpoint;

/// What a route's request adapter makes of a body.
pub(super) struct Plan<R> {
    /// The generations to run, prompt-major: `per_prompt` choices for each prompt.
    pub requests: Vec<GenerateRequest>,
    pub per_prompt: usize,
    pub stream: bool,
    /// How the outputs are answered.
    pub reply: R,
}

/// A route's response adapter.
pub(super) trait Reply: Send + 'static {
    type Stream: StreamFormat;

    /// The streamed shape, for a request of `choices` choices.
    fn stream(self, choices: usize) -> Self::Stream;

    /// The whole response to a request whose choices finished with `collected`.
    fn respond(
        self,
        state: &SharedState,
        collected: Vec<Collected>,
    ) -> impl Future<Output = Result<Response, ApiError>> + Send;
}

/// Serves one generating request: [`run`] in the request's span, logged as `logged_as`; an
/// error response ends the request's log. `plan` is the route's request adapter, called
/// once a permit is held, with the request's id.
pub(super) async fn serve<R, P, F>(
    state: &SharedState,
    request_id: String,
    logged_as: Endpoint,
    plan: P,
) -> Result<Response, ApiError>
where
    R: Reply,
    P: FnOnce(RequestId) -> F,
    F: Future<Output = Result<Plan<R>, ApiError>>,
{
    let log = RequestLog::start(logged_as, &request_id);
    let span = log.span().clone();
    let mut log = Some(log);
    let result = run(state, request_id, plan, &mut log)
        .instrument(span)
        .await;
    if let (Err(error), Some(log)) = (&result, log.as_mut()) {
        log.failed(error);
    }
    result
}

/// Admits, plans, dispatches and answers. A stream takes `log` to its producer task; else it
/// stays with the caller, who drops it (writing its line) when the handler ends or is
/// dropped.
async fn run<R, P, F>(
    state: &SharedState,
    request_id: String,
    plan: P,
    log: &mut Option<RequestLog>,
) -> Result<Response, ApiError>
where
    R: Reply,
    P: FnOnce(RequestId) -> F,
    F: Future<Output = Result<Plan<R>, ApiError>>,
{
    let timer = RequestTimer::start(state.pool.metrics().clone());
    // The permit first: parsing a large body (a token array) costs many times its size.
    let mut permit = state.admit()?;
    let id = RequestId(state.next_id.fetch_add(1, Ordering::Relaxed));
    let Plan {
        mut requests,
        per_prompt,
        stream,
        reply,
    } = plan(id).await?;
    for request in &mut requests {
        request.request_id.clone_from(&request_id);
    }
    // One permit per choice: each takes a sequence of its own.
    let more = u32::try_from(requests.len() - 1).unwrap_or(u32::MAX);
    state.admit_more(&mut permit, more)?;
    // Committed to a status only once a worker accepted every choice; a refusal drops (and
    // so aborts) the choices already accepted.
    let handles = state.pool.submit_all(requests).await?;
    let timers = choice_timers(state, timer, handles.len());
    let mut choices = Choices::new(handles, timers, per_prompt);
    let served_by = workers_header(&choices.last_workers);
    if stream {
        let (sink, body) = sse_channel(state);
        let mut log = log.take().expect("only a stream takes the log");
        log.on_worker(choices.first_worker);
        log.committed(200);
        let format = reply.stream(choices.len());
        tokio::spawn(feed(choices, format, sink, permit, log).instrument(tracing::Span::current()));
        Ok((served_by, body).into_response())
    } else {
        let log = log.as_mut().expect("a non-streamed request keeps its log");
        log.on_worker(choices.first_worker);
        let collected = collect(&mut choices, log).await?;
        log.finished(&choices.total());
        drop(permit);
        // A moved request ends on another worker than it started on.
        let served_by = workers_header(&choices.last_workers);
        let body = reply.respond(state, collected).await?;
        Ok((served_by, body).into_response())
    }
}

/// The requests of one HTTP request, prompt-major: `n` for `first`'s prompt, then `n` for
/// each of `more_prompts` (OpenAI's batch). The first is `first`; the others are copies with
/// their prompt, ids of their own (taken from `next_id` in one block) and, when seeded, the
/// seed + the choice's index within its prompt, so that a seeded request is reproducible
/// (alone or in a batch) and its choices still differ when sampling.
pub(super) fn choice_requests(
    first: GenerateRequest,
    n: u32,
    more_prompts: Vec<Prompt>,
    next_id: &AtomicU64,
) -> Vec<GenerateRequest> {
    let total = n as usize * (1 + more_prompts.len());
    let mut requests = Vec::with_capacity(total);
    if total > 1 {
        let mut next = next_id.fetch_add(total as u64 - 1, Ordering::Relaxed);
        let prompts = std::iter::once(None).chain(more_prompts.into_iter().map(Some));
        for (p, prompt) in prompts.enumerate() {
            for index in 0..n {
                if p == 0 && index == 0 {
                    continue;
                }
                let mut request = first.clone();
                if let Some(prompt) = &prompt {
                    request.prompt = prompt.clone();
                }
                request.id = RequestId(next);
                next += 1;
                request.sampling.seed = first.sampling.seed.map(|s| s.wrapping_add(index));
                requests.push(request);
            }
        }
    }
    requests.insert(0, first);
    requests
}

/// One metrics timer per choice: `first` (started when the request came in), then fresh ones.
fn choice_timers(state: &SharedState, first: RequestTimer, choices: usize) -> Vec<RequestTimer> {
    std::iter::once(first)
        .chain((1..choices).map(|_| RequestTimer::start(state.pool.metrics().clone())))
        .collect()
}

/// `x-llamapool-worker`: the workers of the choices (where they were accepted, or where
/// they finished), one id or several joined by commas.
fn workers_header(workers: &[usize]) -> [(&'static str, String); 1] {
    let ids: Vec<String> = workers.iter().map(usize::to_string).collect();
    [("x-llamapool-worker", ids.join(","))]
}

/// One output of one choice, from the worker that produced it.
pub(super) struct ChoiceOutput {
    pub index: usize,
    pub worker: usize,
    pub output: SeqOutput,
}

/// One output of one choice, or the error that ended it.
struct ChoiceEvent {
    index: usize,
    worker: usize,
    output: Result<SeqOutput, ApiError>,
}

/// One choice's outputs until its finish or error; dropping it unfinished aborts the request.
fn choice_events(index: usize, handle: RequestHandle) -> BoxStream<'static, ChoiceEvent> {
    futures_util::stream::unfold(Some(handle), move |handle| async move {
        let mut handle = handle?;
        let output = next_output(&mut handle).await;
        let worker = handle.worker();
        let more = match &output {
            Ok(o) if o.finish.is_some() => {
                handle.guard.finished();
                false
            }
            Ok(_) => true,
            Err(_) => false,
        };
        let event = ChoiceEvent {
            index,
            worker,
            output,
        };
        Some((event, more.then_some(handle)))
    })
    .boxed()
}

/// The next output of a request, or the error that ended it (then nothing is left to abort).
/// A worker that takes over a moved request accepts it again: that is no output.
/// Cancel-safe: nothing happens before the receive completes.
async fn next_output(handle: &mut RequestHandle) -> Result<SeqOutput, ApiError> {
    loop {
        match handle.events.recv().await {
            Some(StreamEvent::Output(o)) => return Ok(o),
            Some(StreamEvent::Accepted) => continue,
            other => return Err(ended_with(handle, other)),
        }
    }
}

/// The error a request ended with; its guard has nothing left to abort.
fn ended_with(handle: &mut RequestHandle, event: Option<StreamEvent>) -> ApiError {
    handle.guard.finished();
    match event {
        Some(StreamEvent::Failed(e)) => ApiError::from(e),
        Some(StreamEvent::Unavailable(e)) => ApiError::from(e),
        _ => ApiError::from(DispatchError::WorkerGone),
    }
}

/// The choices of one request as they progress: their outputs merged in arrival order, each
/// choice's metrics timer, and the finishes so far. Dropping it aborts the unfinished ones.
pub(super) struct Choices {
    events: SelectAll<BoxStream<'static, ChoiceEvent>>,
    timers: Vec<Option<RequestTimer>>,
    finishes: Vec<Option<Finish>>,
    /// The worker of each choice's last output (or where it was accepted).
    last_workers: Vec<usize>,
    first_worker: usize,
    /// Choices for each prompt (`n`): a batch of prompts is prompt-major.
    per_prompt: usize,
}

impl Choices {
    fn new(handles: Vec<RequestHandle>, timers: Vec<RequestTimer>, per_prompt: usize) -> Self {
        let last_workers: Vec<usize> = handles.iter().map(RequestHandle::worker).collect();
        Self {
            per_prompt,
            first_worker: last_workers[0],
            finishes: vec![None; handles.len()],
            timers: timers.into_iter().map(Some).collect(),
            events: futures_util::stream::select_all(
                handles
                    .into_iter()
                    .enumerate()
                    .map(|(index, handle)| choice_events(index, handle)),
            ),
            last_workers,
        }
    }

    fn len(&self) -> usize {
        self.finishes.len()
    }

    /// The next output of any choice; `None` once every choice finished. Each output is
    /// logged in `log` and timed. Cancel-safe: the merged streams keep their state between
    /// calls.
    pub(super) async fn next(
        &mut self,
        log: &mut RequestLog,
    ) -> Option<Result<ChoiceOutput, ApiError>> {
        let event = self.events.next().await?;
        let output = match event.output {
            Ok(output) => output,
            Err(error) => return Some(Err(error)),
        };
        self.last_workers[event.index] = event.worker;
        log.on_output(&output, event.worker);
        if let Some(timer) = self.timers[event.index].as_mut() {
            timer.on_output(&output);
        }
        if let Some(finish) = &output.finish {
            if let Some(timer) = self.timers[event.index].take() {
                timer.finish();
            }
            self.finishes[event.index] = Some(finish.clone());
        }
        Some(Ok(ChoiceOutput {
            index: event.index,
            worker: event.worker,
            output,
        }))
    }

    /// Every choice's finish, in index order (once [`Choices::next`] returned `None`).
    fn finishes(&self) -> Vec<Finish> {
        self.finishes
            .iter()
            .map(|f| f.clone().expect("every choice finished"))
            .collect()
    }

    /// The whole request's finish: the first choice's reason and timings, usage summed
    /// ([`sum_usage`]); a cancelled choice makes it cancelled.
    pub(super) fn total(&self) -> Finish {
        let finishes = self.finishes();
        let mut total = finishes[0].clone();
        total.usage = sum_usage(finishes.iter().map(|f| &f.usage), self.per_prompt);
        if let Some(cancelled) = finishes
            .iter()
            .find(|f| f.reason == FinishReason::Cancelled)
        {
            total.reason = cancelled.reason;
        }
        total
    }
}

/// One choice's whole output, collected for a non-streamed response.
#[derive(Debug)]
pub(super) struct Collected {
    pub text: String,
    pub tokens: Vec<Token>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Finish,
    /// The worker that finished it.
    pub worker: usize,
}

/// Every choice's whole output, in index order.
async fn collect(choices: &mut Choices, log: &mut RequestLog) -> Result<Vec<Collected>, ApiError> {
    let mut parts: Vec<(String, Vec<Token>, Vec<TokenLogprob>)> =
        (0..choices.len()).map(|_| Default::default()).collect();
    while let Some(event) = choices.next(log).await {
        let ChoiceOutput { index, output, .. } = event?;
        let (text, tokens, logprobs) = &mut parts[index];
        text.push_str(&output.text);
        tokens.extend_from_slice(&output.tokens);
        logprobs.extend_from_slice(&output.logprobs);
    }
    Ok(parts
        .into_iter()
        .zip(choices.finishes())
        .zip(&choices.last_workers)
        .map(|(((text, tokens, logprobs), finish), &worker)| Collected {
            text,
            tokens,
            logprobs,
            finish,
            worker,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::{parse_generation, ServedModel};

    fn request(seed: &str) -> GenerateRequest {
        let body = format!(r#"{{"prompt":"x","n":3{seed}}}"#);
        let served = ServedModel::new("m");
        parse_generation(
            body.as_bytes(),
            Endpoint::Completions,
            &served,
            RequestId(7),
        )
        .unwrap()
        .generate
    }

    #[test]
    fn choices_get_ids_of_their_own_and_seeds_offset_by_their_index() {
        let next_id = AtomicU64::new(8);
        let requests = choice_requests(request(r#","seed":41"#), 3, Vec::new(), &next_id);
        let ids: Vec<u64> = requests.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [7, 8, 9]);
        assert_eq!(next_id.load(Ordering::Relaxed), 10);
        let seeds: Vec<Option<u32>> = requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds, [Some(41), Some(42), Some(43)]);
        assert!(requests.iter().all(|r| r.prompt == requests[0].prompt));
        // Unseeded choices draw their own seeds; one choice is the request itself.
        let unseeded = choice_requests(request(""), 3, Vec::new(), &next_id);
        assert!(unseeded.iter().all(|r| r.sampling.seed.is_none()));
        let one = choice_requests(request(r#","seed":5"#), 1, Vec::new(), &next_id);
        assert_eq!(one, [request(r#","seed":5"#)]);
        assert_eq!(next_id.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_batch_of_prompts_is_prompt_major_with_n_choices_each() {
        let next_id = AtomicU64::new(8);
        let batch = vec![Prompt::Text("y".into()), Prompt::Tokens(vec![1, 2])];
        let requests = choice_requests(request(r#","seed":41"#), 3, batch, &next_id);
        assert_eq!(requests.len(), 9);
        let ids: Vec<u64> = requests.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, [7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(requests[0].prompt, Prompt::Text("x".into()));
        assert_eq!(requests[3].prompt, Prompt::Text("y".into()));
        assert_eq!(requests[8].prompt, Prompt::Tokens(vec![1, 2]));
        // Each prompt's choices are seeded as that prompt alone would be.
        let seeds: Vec<Option<u32>> = requests.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds[3..6], [Some(41), Some(42), Some(43)]);
    }
}
