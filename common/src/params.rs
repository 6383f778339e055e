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
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties: the deterministic settings tests and benchmarks use.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// True when no penalty would change a logit.
    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ParamError> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(ParamError::new(
                    name,
                    format!("{name} must be a finite number"),
                ))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repeat_penalty", self.repeat_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(ParamError::new(
                "temperature",
                format!(
                    "temperature must be between 0 and 2, got {}",
                    self.temperature
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return Err(ParamError::new(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ParamError::new(
                "min_p",
                format!("min_p must be between 0 and 1, got {}", self.min_p),
            ));
        }
        if self.top_k < 0 {
            return Err(ParamError::new(
                "top_k",
                format!("top_k must be 0 (disabled) or positive, got {}", self.top_k),
            ));
        }
        if self.repeat_penalty <= 0.0 {
            return Err(ParamError::new(
                "repeat_penalty",
                format!(
                    "repeat_penalty must be positive, got {}",
                    self.repeat_penalty
                ),
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
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(ParamError::new(
                "presence_penalty",
                format!(
                    "presence_penalty must be between -2 and 2, got {}",
                    self.presence_penalty
                ),
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(ParamError::new(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be between -2 and 2, got {}",
                    self.frequency_penalty
                ),
            ));
        }
        for (token, bias) in &self.logit_bias {
            if *token < 0 {
                return Err(ParamError::new(
                    "logit_bias",
                    format!("logit_bias has a negative token id {token}"),
                ));
            }
            if bias.is_nan() {
                return Err(ParamError::new(
                    "logit_bias",
                    format!("logit_bias for token {token} is not a number"),
                ));
            }
        }
        Ok(())
    }
}

/// When generation ends, besides end-of-generation tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StoppingParams {
    /// Most tokens to generate; `None` means until the sequence's context is full.
    pub max_tokens: Option<u32>,
    /// Generation stops before any of these strings; the string itself is not emitted.
    pub stop: Vec<String>,
    /// Never stop at an end-of-generation token (benchmarks): exactly `max_tokens` are generated.
    pub ignore_eos: bool,
}

impl StoppingParams {
    pub const MAX_STOP_STRINGS: usize = 16;

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
