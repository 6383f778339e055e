//! The sampling parameters of a generation body over the server's `[generation]` defaults:
//! temperature and the other samplers, the seed, `logit_bias` (token ids and texts), the
//! log probabilities asked for, and the grammar ([`super::grammar_choice`]); checked by
//! [`SamplingParams::validate`].

use llamapool_common::params::MAX_LOGIT_BIAS;
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::{JsonSchema, SamplingParams};
use serde_json::Value;

use super::body::{BiasBody, GenerationBody, LogitBiasBody, TokenOrText};
use super::grammar_choice::Constraint;
use super::invalid::InvalidRequest;

impl GenerationBody {
    /// The request's sampling fields over the server's defaults (`[generation]`).
    pub(crate) fn sampling(
        &self,
        server: &GenerationDefaults,
    ) -> Result<SamplingParams, InvalidRequest> {
        let defaults = server.sampling();
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(k) => i32::try_from(k)
                .map_err(|_| InvalidRequest::field("top_k", "top_k is out of range"))?,
        };
        let biases = logit_bias(self.logit_bias.as_ref())?;
        let (grammar, json_schema) = match self.constraint()? {
            None => (None, None),
            Some(Constraint::Grammar(g)) => (Some(g), None),
            Some(Constraint::Schema(field, text)) => (
                None,
                Some(JsonSchema {
                    field: field.into(),
                    text,
                }),
            ),
        };
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k,
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            repeat_last_n: defaults.repeat_last_n,
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            // -1 is llama-server's "random".
            seed: match self.seed {
                None => defaults.seed,
                Some(-1) => None,
                Some(s) => Some((s as u64 & 0xffff_ffff) as u32),
            },
            logit_bias: biases.0,
            logit_bias_text: biases.1,
            grammar,
            json_schema,
            logprobs: self.logprobs()?,
            ..SamplingParams::default()
        };
        sampling.validate()?;
        Ok(sampling)
    }

    /// How many alternatives to report with each token, if log probabilities were asked for:
    /// chat's `logprobs: true` with `top_logprobs` (default 0), legacy completions'
    /// `logprobs: N`, or llama-server's `n_probs: N` (0 asks for none, as llama-server).
    fn logprobs(&self) -> Result<Option<u8>, InvalidRequest> {
        let count = |param: &str, n: i64| {
            u8::try_from(n)
                .ok()
                .filter(|&n| n <= SamplingParams::MAX_TOP_LOGPROBS)
                .ok_or_else(|| {
                    InvalidRequest::field(
                        param,
                        format!(
                            "{param} must be between 0 and {}, got {n}",
                            SamplingParams::MAX_TOP_LOGPROBS
                        ),
                    )
                })
        };
        let top = self
            .top_logprobs
            .map(|n| count("top_logprobs", n))
            .transpose()?;
        let requested = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(top.unwrap_or(0)),
            Some(Value::Number(n)) => {
                let n = n.as_i64().ok_or_else(|| {
                    InvalidRequest::field(
                        "logprobs",
                        format!("logprobs must be an integer, got {n}"),
                    )
                })?;
                Some(count("logprobs", n)?)
            }
            Some(other) => {
                return Err(InvalidRequest::field(
                    "logprobs",
                    format!("logprobs must be a boolean or an integer, got {other}"),
                ))
            }
        };
        if top.is_some_and(|n| n > 0) && requested.is_none() {
            return Err(InvalidRequest::field(
                "top_logprobs",
                "top_logprobs requires logprobs to be set to true",
            ));
        }
        let n_probs = self
            .n_probs
            .map(|n| count("n_probs", n))
            .transpose()?
            .filter(|&n| n > 0);
        Ok(requested.or(n_probs))
    }
}

/// Token biases and text biases (the worker tokenizes the texts).
type Biases = (Vec<(i32, f32)>, Vec<(String, f32)>);

fn logit_bias(biases: Option<&LogitBiasBody>) -> Result<Biases, InvalidRequest> {
    /// An entry's key, whichever form it came in.
    enum Key<'a> {
        Token(i64),
        Text(&'a str),
    }
    let entries: Vec<(Key, &BiasBody)> = match biases {
        None => Vec::new(),
        Some(LogitBiasBody::Map(map)) => map
            .iter()
            .map(|(key, bias)| match key.parse::<i64>() {
                Ok(token) => (Key::Token(token), bias),
                Err(_) => (Key::Text(key), bias),
            })
            .collect(),
        Some(LogitBiasBody::Pairs(pairs)) => pairs
            .iter()
            .map(|(key, bias)| match key {
                TokenOrText::Token(token) => (Key::Token(*token), bias),
                TokenOrText::Text(text) => (Key::Text(text), bias),
            })
            .collect(),
    };
    let mut tokens = Vec::new();
    let mut texts = Vec::new();
    for (key, bias) in entries {
        match key {
            Key::Token(token) => {
                let id = i32::try_from(token).map_err(|_| {
                    InvalidRequest::field(
                        "logit_bias",
                        format!("logit_bias key {token} is not a token id"),
                    )
                })?;
                tokens.push((id, bias_value(&token.to_string(), bias)?));
            }
            Key::Text(text) => {
                let bias = bias_value(&format!("{text:?}"), bias)?;
                texts.push((text.to_owned(), bias));
            }
        }
    }
    Ok((tokens, texts))
}

/// One bias: a finite number, or `false` (a ban).
fn bias_value(key: &str, bias: &BiasBody) -> Result<f32, InvalidRequest> {
    match *bias {
        BiasBody::Value(v) if v.is_finite() => Ok(v),
        // Beyond f32's range the number became an infinity: -1e39 is not a ban.
        BiasBody::Value(_) => Err(InvalidRequest::field(
            "logit_bias",
            format!(
                "logit_bias for {key} must be a number between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, or false to ban it"
            ),
        )),
        BiasBody::Ban(false) => Ok(f32::NEG_INFINITY),
        BiasBody::Ban(true) => Err(InvalidRequest::field(
            "logit_bias",
            format!("logit_bias for {key} must be a number or false"),
        )),
    }
}
