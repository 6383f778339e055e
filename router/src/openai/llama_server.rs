//! llama-server's own response bodies, as types serialized once: the native `/completion`
//! results ([`NativePartial`] while streaming, [`NativeFinal`] at the end, also the
//! `__verbose` of an OpenAI-shaped response), `generation_settings`, and the bodies of
//! `/props`, `/slots`, `/apply-template` and `/chat/completions/input_tokens`. Pure: built
//! from what the router knows, nothing here reads a request or asks a worker.

use llamapool_common::{Finish, FinishReason, SamplingParams, StoppingParams, Token};
use serde::Serialize;

use super::logprobs::NativeProbs;
use super::request::StreamReports;
use super::timings::{ProgressBody, TimingsBody};
use super::FINGERPRINT;

/// llama-server's "no seed given: a random one" value in `generation_settings`.
pub const RANDOM_SEED: u32 = u32::MAX;

/// llama-server's `generation_settings` (`task_params::to_json`), for the settings this
/// server has: `n_predict` -1 is no limit, `seed` 4294967295 a random one per request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSettings {
    pub seed: u32,
    pub temperature: f64,
    pub top_k: i32,
    pub top_p: f64,
    pub min_p: f64,
    pub typical_p: f64,
    pub repeat_last_n: i32,
    pub repeat_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub max_tokens: i64,
    pub n_predict: i64,
    pub n_keep: u32,
    pub ignore_eos: bool,
    pub cache_prompt: bool,
    pub stream: bool,
    pub stop: Vec<String>,
    pub n_probs: u8,
    pub min_keep: u32,
    pub logit_bias: Vec<LogitBiasEntry>,
}

/// One entry of `generation_settings.logit_bias`: a ban's bias is `null` (JSON has no −∞).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LogitBiasEntry {
    pub bias: Option<f64>,
    pub token: Token,
}

impl GenerationSettings {
    /// The settings of a request; `logit_bias` lists its biases, then the tokens `ignore_eos`
    /// bans (`ignored_eog`), as llama-server reports them.
    pub fn new(
        sampling: &SamplingParams,
        stopping: &StoppingParams,
        stream: bool,
        ignored_eog: &[Token],
    ) -> Self {
        let n_predict = stopping.max_tokens.map_or(-1, i64::from);
        let banned_eog = ignored_eog.iter().map(|&t| (t, f32::NEG_INFINITY));
        let logit_bias = sampling
            .logit_bias
            .iter()
            .copied()
            .chain(banned_eog)
            .map(|(token, bias)| LogitBiasEntry {
                bias: bias.is_finite().then_some(f64::from(bias)),
                token,
            })
            .collect();
        Self {
            seed: sampling.seed.unwrap_or(RANDOM_SEED),
            temperature: f64::from(sampling.temperature),
            top_k: sampling.top_k,
            top_p: f64::from(sampling.top_p),
            min_p: f64::from(sampling.min_p),
            typical_p: 1.0,
            repeat_last_n: sampling.repeat_last_n,
            repeat_penalty: f64::from(sampling.repeat_penalty),
            presence_penalty: f64::from(sampling.presence_penalty),
            frequency_penalty: f64::from(sampling.frequency_penalty),
            max_tokens: n_predict,
            n_predict,
            n_keep: 0,
            ignore_eos: stopping.ignore_eos,
            cache_prompt: stopping.cache_prompt,
            stream,
            stop: stopping.stop.clone(),
            n_probs: sampling.logprobs.unwrap_or(0),
            min_keep: 0,
            logit_bias,
        }
    }
}

/// What a native result reports besides the text: the settings it ran with, its prompt, and
/// the options that shape it.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    pub model: String,
    pub settings: GenerationSettings,
    pub return_tokens: bool,
    /// Prompt tokens, when the prompt was given as tokens (known before the finish).
    pub prompt_tokens: Option<u32>,
    /// The prompt, when it was given as text (`prompt` of the final result).
    pub prompt: Option<String>,
    /// `post_sampling_probs`: `completion_probabilities` as probabilities (`prob`,
    /// `top_probs`) rather than log probabilities.
    pub post_sampling_probs: bool,
    /// `return_progress` and `timings_per_token` (streams only).
    pub reports: StreamReports,
}

/// A stream's `stop: false` event (llama-server's partial result): the output's text and
/// tokens, `id_slot` -1 as llama-server's partial results have it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NativePartial<'a> {
    pub index: usize,
    pub content: &'a str,
    pub tokens: &'a [Token],
    pub stop: bool,
    pub id_slot: i64,
    pub tokens_predicted: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_evaluated: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_probabilities: Option<NativeProbs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_progress: Option<ProgressBody>,
}

impl<'a> NativePartial<'a> {
    pub fn new(
        options: &NativeOptions,
        content: &'a str,
        tokens: &'a [Token],
        predicted: u32,
    ) -> Self {
        Self {
            index: 0,
            content,
            tokens,
            stop: false,
            id_slot: -1,
            tokens_predicted: predicted,
            tokens_evaluated: options.prompt_tokens,
            timings: None,
            completion_probabilities: None,
            prompt_progress: None,
        }
    }

    /// A progress event: no content, no tokens, the prompt's size and progress.
    pub fn progress(
        options: &NativeOptions,
        progress: ProgressBody,
        timings: Option<TimingsBody>,
    ) -> Self {
        Self {
            tokens_evaluated: Some(progress.total),
            timings,
            prompt_progress: Some(progress),
            ..Self::new(options, "", &[], 0)
        }
    }
}

/// llama-server's final result (`to_json_non_oaicompat`); `prompt` only for a text prompt,
/// `completion_probabilities` only when there are any.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NativeFinal<'a> {
    pub index: usize,
    pub content: &'a str,
    pub tokens: &'a [Token],
    pub id_slot: u32,
    pub stop: bool,
    pub model: &'a str,
    pub tokens_predicted: u32,
    pub tokens_evaluated: u32,
    pub generation_settings: &'a GenerationSettings,
    pub has_new_line: bool,
    pub truncated: bool,
    pub stop_type: &'static str,
    pub stopping_word: &'a str,
    pub tokens_cached: u32,
    pub timings: TimingsBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_probabilities: Option<NativeProbs>,
}

impl<'a> NativeFinal<'a> {
    pub fn new(
        options: &'a NativeOptions,
        slot: u32,
        content: &'a str,
        tokens: &'a [Token],
        finish: &'a Finish,
    ) -> Self {
        let (stop_type, stopping_word) = stop_type(finish);
        Self {
            index: 0,
            content,
            tokens,
            id_slot: slot,
            stop: true,
            model: &options.model,
            tokens_predicted: finish.usage.completion_tokens,
            tokens_evaluated: finish.usage.prompt_tokens,
            generation_settings: &options.settings,
            has_new_line: content.contains('\n'),
            truncated: false,
            stop_type,
            stopping_word,
            tokens_cached: finish.usage.cached_tokens,
            timings: TimingsBody::finished(&finish.usage, &finish.timings),
            prompt: options.prompt.as_deref(),
            completion_probabilities: None,
        }
    }
}

/// `stop_type` and `stopping_word`: `word` and the string for a stop string, `eos` for an
/// end-of-generation token, `limit` for the token limit or a full context.
pub fn stop_type(finish: &Finish) -> (&'static str, &str) {
    match (finish.reason, &finish.stop_word) {
        (FinishReason::Stop, Some(word)) => ("word", word),
        (FinishReason::Stop, None) => ("eos", ""),
        (FinishReason::Length, _) => ("limit", ""),
        (FinishReason::Cancelled, _) => ("none", ""),
    }
}

/// `GET /props`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PropsBody<'a> {
    pub default_generation_settings: DefaultSettings,
    pub total_slots: usize,
    pub model_alias: &'a str,
    pub model_path: &'a str,
    pub modalities: Modalities,
    pub endpoint_slots: bool,
    pub endpoint_props: bool,
    pub endpoint_metrics: bool,
    pub chat_template: &'a str,
    pub build_info: &'static str,
    pub is_sleeping: bool,
}

/// `/props`' `default_generation_settings`: the `[generation]` defaults, and the
/// per-sequence context (`null` while no worker is ready).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DefaultSettings {
    pub params: GenerationSettings,
    pub n_ctx: Option<u32>,
}

/// What a model takes besides text: nothing here.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Modalities {
    pub vision: bool,
    pub video: bool,
    pub audio: bool,
}

impl<'a> PropsBody<'a> {
    /// The props of a server with these defaults and model, every endpoint on.
    pub fn new(
        default_generation_settings: DefaultSettings,
        total_slots: usize,
        (model_alias, model_path): (&'a str, &'a str),
        chat_template: &'a str,
    ) -> Self {
        Self {
            default_generation_settings,
            total_slots,
            model_alias,
            model_path,
            modalities: Modalities::default(),
            endpoint_slots: true,
            endpoint_props: true,
            endpoint_metrics: true,
            chat_template,
            build_info: FINGERPRINT,
            is_sleeping: false,
        }
    }
}

/// One entry of `GET /slots`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SlotBody {
    pub id: u32,
    /// The worker the slot belongs to (not llama-server's).
    pub id_worker: usize,
    pub n_ctx: u32,
    pub speculative: bool,
    pub is_processing: bool,
}

/// `POST /apply-template`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderedBody {
    pub prompt: String,
}

/// `POST /chat/completions/input_tokens`' answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InputTokensBody {
    pub input_tokens: usize,
}

#[cfg(test)]
mod tests {
    use llamapool_common::{PromptProgress, Timings, Usage};
    use serde_json::{json, Value};

    use super::*;

    fn json_of(value: impl Serialize) -> Value {
        serde_json::to_value(value).unwrap()
    }

    fn options(reports: StreamReports) -> NativeOptions {
        NativeOptions {
            model: "m".into(),
            settings: GenerationSettings::new(
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
            reports,
        }
    }

    #[test]
    fn final_result_has_llama_server_fields() {
        let options = options(StreamReports::default());
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
        let r = json_of(NativeFinal::new(&options, 2, "a\nb", &[1, 2], &finish));
        assert_eq!(r["stop"], true);
        assert_eq!(r["stop_type"], "limit");
        assert_eq!(r["tokens_predicted"], 4);
        assert_eq!(r["tokens_evaluated"], 3);
        assert_eq!(r["has_new_line"], true);
        assert_eq!(r["id_slot"], 2);
        assert_eq!(r["tokens"], json!([1, 2]));
        assert_eq!(r["generation_settings"]["n_predict"], 4);
        assert_eq!(r["generation_settings"]["seed"], u64::from(RANDOM_SEED));
        assert_eq!(
            r["generation_settings"]["logit_bias"],
            json!([{"bias": null, "token": 2}])
        );
        // 4 tokens, 3 decode steps after the first in 8 ms.
        assert_eq!(r["timings"]["predicted_per_second"], 375.0);
        assert_eq!(r["tokens_cached"], 1);
        assert_eq!(r["timings"]["cache_n"], 1);
        assert_eq!(r["timings"]["prompt_n"], 2);
        assert_eq!(r["generation_settings"]["cache_prompt"], true);
        assert!(r.get("completion_probabilities").is_none());
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
        let chunk = json_of(NativePartial::new(&options, "x", &[], 1));
        assert_eq!(chunk["stop"], false);
        assert_eq!(chunk["id_slot"], -1);
        assert!(chunk.get("tokens_evaluated").is_none());
    }

    #[test]
    fn progress_events_have_llama_server_shape() {
        let options = options(StreamReports {
            progress: true,
            timings: true,
        });
        let progress = ProgressBody::from(&PromptProgress {
            total: 5,
            cache: 1,
            processed: 3,
            time_ms: 2.0,
        });
        let chunk = json_of(NativePartial::progress(&options, progress, None));
        assert_eq!(chunk["content"], "");
        assert_eq!(chunk["tokens"], json!([]));
        assert_eq!(chunk["stop"], false);
        assert_eq!(chunk["tokens_evaluated"], 5);
        assert_eq!(
            chunk["prompt_progress"],
            json!({"total": 5, "cache": 1, "processed": 3, "time_ms": 2.0})
        );
        assert!(chunk.get("timings").is_none());
    }
}
