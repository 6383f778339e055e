//! Sampling and stopping parameters of one request, validated where they are built.
//!
//! The router builds them from HTTP bodies (and reports the offending field); the engine turns
//! them into a sampler chain and a stop checker. Defaults follow llama-server's.

use serde::{Deserialize, Serialize};

use crate::Token;

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the repetition penalty.
    pub repeat_penalty: f32,
    /// How many of the last tokens the penalties look at (0 disables all three penalties).
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `None` draws a fresh seed per request.
    pub seed: Option<u32>,
    /// Added to the logits of the given tokens before sampling; `f32::NEG_INFINITY` bans a token.
    pub logit_bias: Vec<(Token, f32)>,
    /// llama-server's text form of `logit_bias`: the bias applies to every token of the text
    /// (tokenized by the worker without special tokens, which then moves them into
    /// `logit_bias`).
    pub logit_bias_text: Vec<(String, f32)>,
    /// A GBNF grammar (llama.cpp's format, start rule `root`) every generated text must match.
    /// The worker parses it before accepting the request; a grammar llama.cpp refuses is a
    /// request error naming `grammar`.
    pub grammar: Option<String>,
    /// A JSON schema's text (`response_format`, `json_schema`) every generated text must
    /// match: the worker turns it into a grammar with llama.cpp's own converter (for a chat
    /// request, together with the tools), so what llama-server accepts is accepted here.
    /// Never set together with `grammar`.
    pub json_schema: Option<JsonSchema>,
    /// Set by the worker for a grammar that llama.cpp's chat code made (tool calls, a schema):
    /// when not empty the grammar is lazy, applied only from the first trigger on (a tool
    /// call's opener), as llama-server does.
    pub grammar_triggers: Vec<GrammarTrigger>,
    /// Set by the worker: tokens the grammar accepts before the first generated one (the
    /// assistant turn's opening the template already wrote, llama-server's prefill).
    pub grammar_prefill: Vec<Token>,
    /// Log probabilities: `None` computes none (the default; greedy keeps its argmax
    /// shortcut); `Some(n)` sends, with every generated token, its log probability over the
    /// full vocabulary and the `n` (at most [`Self::MAX_TOP_LOGPROBS`]) most likely tokens.
    pub logprobs: Option<u8>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            logit_bias_text: Vec::new(),
            grammar: None,
            json_schema: None,
            grammar_triggers: Vec::new(),
            grammar_prefill: Vec::new(),
            logprobs: None,
        }
    }
}

/// A JSON schema's text and the request field it came in (`response_format`, `json_schema`),
/// which an error about it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonSchema {
    pub field: String,
    pub text: String,
}

/// What switches a lazy grammar on: a token, or a regular expression over the generated text
/// (llama.cpp's trigger words are escaped into patterns; a full pattern is anchored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrammarTrigger {
    Token(Token),
    Pattern(String),
}

impl SamplingParams {
    /// Greedy decoding with no penalties: the deterministic settings tests and benchmarks use.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Temperatures below this sample like 0: dividing logits by a smaller one overflows
    /// f32 into infinities and NaN, and long before that the distribution is one-hot.
    pub const GREEDY_BELOW: f32 = 1e-5;

    pub fn is_greedy(&self) -> bool {
        self.temperature < Self::GREEDY_BELOW
    }

    /// True when no penalty would change a logit.
    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }

    /// Most alternatives `logprobs` may ask for (OpenAI's `top_logprobs` limit).
    pub const MAX_TOP_LOGPROBS: u8 = 20;

    /// Longest grammar accepted, in bytes (a JSON schema's grammar is a few KiB).
    pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

    /// Most `logit_bias` entries (token ids, and texts before the worker tokenizes them; after,
    /// the tokens the texts became): the sampler walks them at every step. OpenAI allows 300,
    /// llama-server any number.
    pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ParamError> {
        let bounds = [
            Bound::closed("temperature", self.temperature, 0.0, 2.0),
            Bound::left_open("top_p", self.top_p, 0.0, Some(1.0)),
            Bound::closed("min_p", self.min_p, 0.0, 1.0),
            Bound::left_open("repeat_penalty", self.repeat_penalty, 0.0, None),
            Bound::closed("presence_penalty", self.presence_penalty, -2.0, 2.0),
            Bound::closed("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ];
        for bound in bounds {
            bound.check()?;
        }
        if self.top_k < 0 {
            return Err(ParamError::new(
                "top_k",
                format!("top_k must be 0 (disabled) or positive, got {}", self.top_k),
            ));
        }
        if self.repeat_last_n < 0 {
            return Err(ParamError::new(
                "repeat_last_n",
                format!(
                    "repeat_last_n must be 0 or positive, got {}",
                    self.repeat_last_n
                ),
            ));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > Self::MAX_TOP_LOGPROBS) {
            return Err(ParamError::new(
                "top_logprobs",
                format!(
                    "top_logprobs must be between 0 and {}, got {n}",
                    Self::MAX_TOP_LOGPROBS
                ),
            ));
        }
        let entries = self.logit_bias.len() + self.logit_bias_text.len();
        if entries > Self::MAX_LOGIT_BIAS_ENTRIES {
            return Err(ParamError::new(
                "logit_bias",
                format!(
                    "logit_bias may have at most {} entries (tokens), got {entries}",
                    Self::MAX_LOGIT_BIAS_ENTRIES
                ),
            ));
        }
        self.logit_bias.iter().try_for_each(check_bias)?;
        self.logit_bias_text
            .iter()
            .try_for_each(|(_, bias)| check_bias(&(0, *bias)))?;
        self.grammar.as_deref().map_or(Ok(()), check_grammar)?;
        if let Some(JsonSchema { field, text }) = &self.json_schema {
            if self.grammar.is_some() {
                return Err(ParamError::new(
                    field,
                    format!("{field} and grammar cannot be used together: give one constraint"),
                ));
            }
            if text.len() > Self::MAX_GRAMMAR_BYTES {
                return Err(ParamError::new(
                    field,
                    format!(
                        "a JSON schema may be at most {} bytes, got {}",
                        Self::MAX_GRAMMAR_BYTES,
                        text.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What can be checked without llama.cpp's parser: size, NUL bytes, and [`crate::gbnf::check`]'s
/// bounds (nesting, rules, expanded size) and a `root` rule to start from.
fn check_grammar(grammar: &str) -> Result<(), ParamError> {
    if grammar.len() > SamplingParams::MAX_GRAMMAR_BYTES {
        return Err(ParamError::new(
            "grammar",
            format!(
                "grammar may be at most {} bytes, got {}",
                SamplingParams::MAX_GRAMMAR_BYTES,
                grammar.len()
            ),
        ));
    }
    if grammar.contains('\0') {
        return Err(ParamError::new("grammar", "grammar contains a NUL byte"));
    }
    crate::gbnf::check(grammar)
        .map(drop)
        .map_err(|message| ParamError::new("grammar", message))
}

/// Largest logit bias magnitude (OpenAI's range); `-inf` (a ban) is also accepted.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

fn check_bias(&(token, bias): &(Token, f32)) -> Result<(), ParamError> {
    if token < 0 {
        return Err(ParamError::new(
            "logit_bias",
            format!("logit_bias has a negative token id {token}"),
        ));
    }
    if bias == f32::NEG_INFINITY || (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
        return Ok(());
    }
    Err(ParamError::new(
        "logit_bias",
        format!(
            "logit_bias for token {token} must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS} (or false to ban it), got {bias}"
        ),
    ))
}

/// A sampling parameter's allowed interval: `[min, max]`, or `(min, max]` / `(min, ∞)`.
struct Bound {
    name: &'static str,
    value: f32,
    min: f32,
    min_included: bool,
    max: Option<f32>,
}

impl Bound {
    fn closed(name: &'static str, value: f32, min: f32, max: f32) -> Self {
        Self {
            name,
            value,
            min,
            min_included: true,
            max: Some(max),
        }
    }

    fn left_open(name: &'static str, value: f32, min: f32, max: Option<f32>) -> Self {
        Self {
            name,
            value,
            min,
            min_included: false,
            max,
        }
    }

    fn check(&self) -> Result<(), ParamError> {
        let v = self.value;
        let above_min = if self.min_included {
            v >= self.min
        } else {
            v > self.min
        };
        // NaN fails every comparison, infinities fail the finite check.
        if v.is_finite() && above_min && self.max.is_none_or(|max| v <= max) {
            return Ok(());
        }
        let open = if self.min_included { "[" } else { "(" };
        let interval = match self.max {
            Some(max) => format!("{open}{}, {max}]", self.min),
            None => format!("{open}{}, ∞)", self.min),
        };
        Err(ParamError::new(
            self.name,
            format!(
                "{} must be a finite number in {interval}, got {v}",
                self.name
            ),
        ))
    }
}

/// When generation ends, besides end-of-generation tokens; and how the worker may run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppingParams {
    /// Most tokens to generate; `None` means until the sequence's context is full.
    pub max_tokens: Option<u32>,
    /// Generation stops before any of these strings; the string itself is not emitted.
    pub stop: Vec<String>,
    /// Never stop at an end-of-generation token (benchmarks): exactly `max_tokens` are generated.
    pub ignore_eos: bool,
    /// llama-server's `cache_prompt` (default true): the worker may start from KV cells that a
    /// finished request left for the same prompt prefix, instead of evaluating it again.
    #[serde(default = "yes")]
    pub cache_prompt: bool,
}

fn yes() -> bool {
    true
}

impl Default for StoppingParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            cache_prompt: true,
        }
    }
}

impl StoppingParams {
    pub const MAX_STOP_STRINGS: usize = 16;
    /// Longest stop string, in bytes: the engine holds back up to this much text per request.
    pub const MAX_STOP_BYTES: usize = 1024;

    pub fn validate(&self) -> Result<(), ParamError> {
        if self.max_tokens == Some(0) {
            return Err(ParamError::new(
                "max_tokens",
                "max_tokens must be at least 1, got 0",
            ));
        }
        if self.stop.len() > Self::MAX_STOP_STRINGS {
            return Err(ParamError::new(
                "stop",
                format!(
                    "at most {} stop strings are allowed, got {}",
                    Self::MAX_STOP_STRINGS,
                    self.stop.len()
                ),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(ParamError::new("stop", "stop strings must not be empty"));
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > Self::MAX_STOP_BYTES) {
            return Err(ParamError::new(
                "stop",
                format!(
                    "stop strings may be at most {} bytes, got one of {}",
                    Self::MAX_STOP_BYTES,
                    long.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A parameter out of range: which one, and a sentence for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
        SamplingParams::greedy().validate().unwrap();
        StoppingParams::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let p = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert_eq!(p.validate().unwrap_err().param, "temperature");
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(p.validate().unwrap_err().param, "top_p");
        let p = SamplingParams {
            logit_bias: vec![(-3, 1.0)],
            ..SamplingParams::default()
        };
        assert_eq!(p.validate().unwrap_err().param, "logit_bias");
        let s = StoppingParams {
            max_tokens: Some(0),
            ..StoppingParams::default()
        };
        assert_eq!(s.validate().unwrap_err().param, "max_tokens");
        let s = StoppingParams {
            stop: vec![String::new()],
            ..StoppingParams::default()
        };
        assert_eq!(s.validate().unwrap_err().param, "stop");
        let s = StoppingParams {
            stop: vec!["x".repeat(StoppingParams::MAX_STOP_BYTES + 1)],
            ..StoppingParams::default()
        };
        assert_eq!(s.validate().unwrap_err().param, "stop");
        for (param, p) in [
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..SamplingParams::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.5,
                    ..SamplingParams::default()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: f32::INFINITY,
                    ..SamplingParams::default()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: -3.0,
                    ..SamplingParams::default()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(1, 1e30)],
                    ..SamplingParams::default()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(1, f32::NAN)],
                    ..SamplingParams::default()
                },
            ),
        ] {
            assert_eq!(p.validate().unwrap_err().param, param);
        }
        for grammar in ["", "start ::= \"x\"", "root ::= \"\0\""] {
            let p = SamplingParams {
                grammar: Some(grammar.into()),
                ..SamplingParams::default()
            };
            assert_eq!(p.validate().unwrap_err().param, "grammar");
        }
        SamplingParams {
            grammar: Some("root ::= \"yes\" | \"no\"".into()),
            ..SamplingParams::default()
        }
        .validate()
        .unwrap();
        let many = SamplingParams {
            logit_bias: vec![(1, 1.0); SamplingParams::MAX_LOGIT_BIAS_ENTRIES],
            logit_bias_text: vec![("x".into(), 1.0)],
            ..SamplingParams::default()
        };
        assert_eq!(many.validate().unwrap_err().param, "logit_bias");
        SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY), (2, -100.0), (3, 100.0)],
            ..SamplingParams::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn a_vanishing_temperature_is_greedy() {
        for temperature in [0.0, 1e-40, 1e-6] {
            assert!(SamplingParams {
                temperature,
                ..SamplingParams::default()
            }
            .is_greedy());
        }
        assert!(!SamplingParams {
            temperature: 0.01,
            ..SamplingParams::default()
        }
        .is_greedy());
    }

    #[test]
    fn penalties_are_detected() {
        assert!(!SamplingParams::greedy().has_penalties());
        let p = SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        };
        assert!(p.has_penalties());
        let p = SamplingParams {
            presence_penalty: 0.5,
            repeat_last_n: 0,
            ..SamplingParams::greedy()
        };
        assert!(!p.has_penalties());
    }
}
