//! A request's choices: the `GenerateRequest`s one HTTP request fans out to (`n` > 1, or a
//! batch of prompts: [`choice_requests`]), and [`Choices`], which merges their outputs as
//! they come (each tagged with its choice's index and worker), times and logs them, keeps
//! their finishes, and aborts the unfinished ones when dropped; [`collect`] reads them whole.
//! The first failure of any choice ends the whole request.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::{Finish, FinishReason, RequestId, SeqOutput, Token, TokenLogprob};

use super::request_log::RequestLog;
use super::SharedState;
use crate::dispatch::{DispatchError, RequestHandle, StreamEvent};
use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::parsed::ParsedMessage;
use crate::openai::response::sum_usage;

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
pub(super) fn choice_timers(
    state: &SharedState,
    first: RequestTimer,
    choices: usize,
) -> Vec<RequestTimer> {
    std::iter::once(first)
        .chain((1..choices).map(|_| RequestTimer::start(state.pool.metrics().clone())))
        .collect()
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
    pub(super) last_workers: Vec<usize>,
    pub(super) first_worker: usize,
    /// Choices for each prompt (`n`): a batch of prompts is prompt-major.
    per_prompt: usize,
}

impl Choices {
    pub(super) fn new(
        handles: Vec<RequestHandle>,
        timers: Vec<RequestTimer>,
        per_prompt: usize,
    ) -> Self {
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

    pub(super) fn len(&self) -> usize {
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
    /// A chat answer the worker parsed (content, reasoning, tool calls).
    pub parsed: Option<ParsedMessage>,
    pub tokens: Vec<Token>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Finish,
    /// The worker that finished it.
    pub worker: usize,
}

/// Every choice's whole output, in index order.
pub(super) async fn collect(
    choices: &mut Choices,
    log: &mut RequestLog,
) -> Result<Vec<Collected>, ApiError> {
    type Parts = (String, Option<ParsedMessage>, Vec<Token>, Vec<TokenLogprob>);
    let mut parts: Vec<Parts> = (0..choices.len()).map(|_| Default::default()).collect();
    while let Some(event) = choices.next(log).await {
        let ChoiceOutput { index, output, .. } = event?;
        let (text, parsed, tokens, logprobs) = &mut parts[index];
        text.push_str(&output.text);
        if output.parsed {
            let parsed = parsed.get_or_insert_with(ParsedMessage::default);
            output.chat.iter().for_each(|d| parsed.apply(d));
        }
        tokens.extend_from_slice(&output.tokens);
        logprobs.extend_from_slice(&output.logprobs);
    }
    Ok(parts
        .into_iter()
        .zip(choices.finishes())
        .zip(&choices.last_workers)
        .map(
            |(((text, parsed, tokens, logprobs), finish), &worker)| Collected {
                text,
                parsed,
                tokens,
                logprobs,
                finish,
                worker,
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::{parse_generation, ServedModel};
    use crate::openai::Endpoint;

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
