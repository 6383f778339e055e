//! Validation of a generation body into a [`ValidRequest`]: the served model's name rule,
//! the fields this server refuses, `n` and `best_of`, the token limit, the stop strings and
//! the stream options, assembled around the prompt ([`super::prompt`]) and the sampling
//! parameters ([`GenerationBody::sampling`]). [`parse_generation`] is the entry of the OpenAI
//! endpoints; the native `/completion` calls the steps one by one.

use llamapool_common::protocol::{GenerateRequest, Prompt};
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::{RequestId, SamplingParams, StoppingParams};
use serde_json::Value;

use super::body::{is_neutral, GenerationBody, StopBody, UnsupportedFields, MAX_CHOICES};
use super::invalid::{parse_json, InvalidRequest};
use super::prompt::completion_prompts;

/// The model a server answers for, and what a request gets for the fields it leaves out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedModel {
    /// The name responses report: the first of `names`.
    pub alias: String,
    /// Every name the model is served under (`model.alias` split at commas, sorted).
    pub names: Vec<String>,
    /// `model.tags`, listed by `/v1/models`.
    pub tags: Vec<String>,
    /// `model.strict_name`: a request's `model` must equal the alias (404 otherwise). When
    /// false, any name is accepted, as llama-server does.
    pub strict_name: bool,
    /// `[generation]`: server-wide defaults.
    pub defaults: GenerationDefaults,
}

impl ServedModel {
    /// Serves `alias` with the built-in defaults and any model name accepted.
    pub fn new(alias: impl Into<String>) -> Self {
        let alias = alias.into();
        Self {
            names: vec![alias.clone()],
            alias,
            ..Self::default()
        }
    }

    /// Whether `name` is one of the served names.
    pub fn serves(&self, name: &str) -> bool {
        name == self.alias || self.names.iter().any(|n| n == name)
    }

    /// A request's `model`: any name is accepted unless `model.strict_name` is set
    /// (llama-server serves whatever name a client hard-codes, such as `gpt-3.5-turbo`).
    pub fn check_name(&self, requested: Option<&str>) -> Result<(), InvalidRequest> {
        match requested {
            Some(name) if self.strict_name && !self.serves(name) => {
                Err(InvalidRequest::UnknownModel {
                    requested: name.to_string(),
                    served: self.alias.clone(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Which endpoint a generation request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl UnsupportedFields {
    /// The first field given a value that would need a feature this server lacks.
    fn check(&self) -> Result<(), InvalidRequest> {
        let fields: [(&'static str, &Option<Value>, NeutralTest); 4] = [
            ("functions", &self.functions, is_neutral),
            ("function_call", &self.function_call, |v| {
                is_neutral(v) || v == "none" || v == "auto"
            }),
            ("echo", &self.echo, is_neutral),
            ("suffix", &self.suffix, is_neutral),
        ];
        for (param, value, neutral) in fields {
            if let Some(v) = value {
                if !neutral(v) {
                    return Err(InvalidRequest::Unsupported {
                        param,
                        detail: format!(" (got {v})"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// `best_of` asks for nothing beyond `n` choices only when it is neutral or equal to `n`
/// (OpenAI's default is `n`); generating more candidates than are returned is not supported.
fn check_best_of(best_of: Option<&Value>, n: u32) -> Result<(), InvalidRequest> {
    match best_of {
        Some(v) if !is_neutral(v) && v.as_f64() != Some(f64::from(n)) => {
            Err(InvalidRequest::Unsupported {
                param: "best_of",
                detail: format!(" unless it equals n (got {v}, n = {n})"),
            })
        }
        _ => Ok(()),
    }
}

/// Whether an unsupported field's value asks for nothing.
type NeutralTest = fn(&Value) -> bool;

/// A generation request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    /// Choices asked for (`n`), 1 to [`MAX_CHOICES`]; `generate` is the first one's request.
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub reports: StreamReports,
    /// `verbose` on a non-streamed request: add `__verbose`.
    pub verbose: bool,
    pub generate: GenerateRequest,
    /// OpenAI's batch of prompts (`/v1/completions`): the prompts after `generate`'s, each
    /// with `n` choices of its own.
    pub more_prompts: Vec<Prompt>,
}

impl ValidRequest {
    /// Choices in the response: `n` for each prompt, prompt-major. Saturates rather than
    /// wraps, so that a huge batch cannot pass the [`MAX_CHOICES`] check as a small number.
    pub fn total_choices(&self) -> u32 {
        let prompts = u32::try_from(self.more_prompts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        self.n.saturating_mul(prompts)
    }
}

/// What a stream reports besides the text (llama-server's `return_progress` and
/// `timings_per_token`); both off for a non-streamed request, whose result has its timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamReports {
    /// `prompt_progress` chunks before the first token.
    pub progress: bool,
    /// `timings` on every token chunk.
    pub timings: bool,
}

impl StreamReports {
    fn new(stream: bool, return_progress: Option<bool>, timings_per_token: Option<bool>) -> Self {
        Self {
            progress: stream && return_progress.unwrap_or(false),
            timings: stream && timings_per_token.unwrap_or(false),
        }
    }

    /// Whether the worker must send progress reports: per-token timings take their prompt
    /// side from them.
    pub fn needs_progress(self) -> bool {
        self.progress || self.timings
    }
}

/// Parses and validates a generation body for `endpoint`, with `served`'s model-name rule
/// and defaults.
pub fn parse_generation(
    body: &[u8],
    endpoint: Endpoint,
    served: &ServedModel,
    id: RequestId,
) -> Result<ValidRequest, InvalidRequest> {
    let body: GenerationBody = parse_json(body)?;
    body.into_valid(endpoint, served, id)
}

impl GenerationBody {
    pub fn into_valid(
        mut self,
        endpoint: Endpoint,
        served: &ServedModel,
        id: RequestId,
    ) -> Result<ValidRequest, InvalidRequest> {
        self.check_common(served)?;
        let sampling = self.sampling(&served.defaults)?;
        let prompt = match endpoint {
            Endpoint::Chat => {
                let chat = self.chat(&served.defaults)?;
                if !chat.tools.tools.is_empty() && sampling.grammar.is_some() {
                    return Err(InvalidRequest::field(
                        "grammar",
                        "Cannot use custom grammar constraints with tools.",
                    ));
                }
                Prompt::Chat(chat)
            }
            Endpoint::Completions => {
                let mut prompts = completion_prompts(self.prompt.take())?;
                let first = prompts.remove(0);
                let mut valid = self.finish_valid(endpoint, served, id, first, sampling)?;
                valid.more_prompts = prompts;
                if valid.total_choices() > MAX_CHOICES {
                    return Err(InvalidRequest::field(
                        "prompt",
                        format!(
                            "{} prompts of n = {} are more than {MAX_CHOICES} choices",
                            valid.more_prompts.len() + 1,
                            valid.n
                        ),
                    ));
                }
                return Ok(valid);
            }
        };
        self.finish_valid(endpoint, served, id, prompt, sampling)
    }

    /// The checks every endpoint makes first: the model name, unsupported fields, `n` (and
    /// `best_of` against it).
    pub(crate) fn check_common(&self, served: &ServedModel) -> Result<(), InvalidRequest> {
        self.check_model(served)?;
        self.unsupported.check()?;
        check_best_of(self.unsupported.best_of.as_ref(), self.choices()?)
    }

    /// `n`: 1 when absent or `null`, else 1 to [`MAX_CHOICES`].
    pub(crate) fn choices(&self) -> Result<u32, InvalidRequest> {
        match self.n {
            None => Ok(1),
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    InvalidRequest::field(
                        "n",
                        format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
                    )
                }),
        }
    }

    /// The stopping fields checked, and the request assembled around `prompt`.
    pub(crate) fn finish_valid(
        self,
        endpoint: Endpoint,
        served: &ServedModel,
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
    ) -> Result<ValidRequest, InvalidRequest> {
        let n = self.choices()?;
        let stopping = StoppingParams {
            max_tokens: max_tokens(self.max_completion_tokens, self.max_tokens, self.n_predict)?
                .unwrap_or_else(|| served.defaults.max_tokens()),
            stop: match self.stop {
                None => Vec::new(),
                Some(StopBody::One(s)) => vec![s],
                Some(StopBody::Many(list)) => list,
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            cache_prompt: self.cache_prompt.unwrap_or(true),
        };
        stopping.validate()?;
        let stream = self.stream.unwrap_or(false);
        let reports = StreamReports::new(stream, self.return_progress, self.timings_per_token);
        Ok(ValidRequest {
            endpoint,
            n,
            stream,
            reports,
            verbose: !stream && self.verbose.or(served.defaults.verbose).unwrap_or(false),
            include_usage: self
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            generate: GenerateRequest {
                id,
                // The handler sets it from the request's `x-request-id`.
                request_id: String::new(),
                prompt,
                sampling,
                stopping,
                resumed: Vec::new(),
                report_progress: reports.needs_progress(),
            },
            more_prompts: Vec::new(),
        })
    }

    /// See [`ServedModel::check_name`].
    fn check_model(&self, served: &ServedModel) -> Result<(), InvalidRequest> {
        served.check_name(self.model.as_deref())
    }
}

/// `max_completion_tokens` wins over the older `max_tokens`, which wins over llama-server's
/// `n_predict` (negative: no limit); the error names the one given. `None`: none was given
/// (the server's default applies); `Some(None)`: no limit.
fn max_tokens(
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
    n_predict: Option<i64>,
) -> Result<Option<Option<u32>>, InvalidRequest> {
    let (name, value) = match (max_completion_tokens, max_tokens, n_predict) {
        (Some(v), _, _) => ("max_completion_tokens", v),
        (None, Some(v), _) => ("max_tokens", v),
        (None, None, Some(v)) if v < 0 => return Ok(Some(None)),
        (None, None, Some(v)) => ("n_predict", v),
        (None, None, None) => return Ok(None),
    };
    if value < 1 {
        return Err(InvalidRequest::field(
            name,
            format!("{name} must be at least 1, got {value}"),
        ));
    }
    u32::try_from(value)
        .map(|v| Some(Some(v)))
        .map_err(|_| InvalidRequest::field(name, format!("{name} is too large: {value}")))
}
