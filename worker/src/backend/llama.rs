//! The llama.cpp backend: the only module that names `llama_cpp_2`.
//!
//! - [`Model`]: a loaded GGUF model for the life of the process (a worker serves exactly one),
//!   with what the IPC side needs and that is safe to call from any thread: tokenization,
//!   detokenization, chat templates, model facts.
//! - [`LlamaCppBackend`]: one `LlamaContext` plus its batch, owned by the engine thread.
//! - [`embedding::LlamaEmbedder`]: an embedding worker's context, owned by its embedder
//!   thread.
//!
//! llama.cpp's process-wide backend is initialised once (`LlamaBackend::init` fails the second
//! time) and its logs go to `tracing` under the `llama.cpp` target.

pub mod embedding;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use llamapool_common::protocol::{ChatEnding, ChatPrompt, ToolChoice};
use llamapool_common::worker::{ContextConfig, ContextError, FlashAttention};
use llamapool_common::{
    ChatMessage, GrammarTrigger, JsonSchema, ModelInfo, RequestError, SamplingParams, Token,
};

use super::chat::{ChatTemplates, RenderInputs, Rendered};
use super::{Backend, BackendLimits, BatchEntry, DecodeFailure};
use crate::engine::seq_ids::SeqId;

/// Why a model or a context could not be set up. Fatal for a worker; reported with the path.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("llama.cpp backend initialisation failed: {0}")]
    Backend(String),
    #[error("model file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("loading model {path} failed: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("chat template {name:?} is not usable: {reason}")]
    ChatTemplate { name: String, reason: String },
    #[error("creating a llama.cpp context failed ({0}); is `context` too large for memory?")]
    Context(String),
    #[error("invalid context configuration: {0}")]
    Config(#[from] ContextError),
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// Layers to offload to the GPU (0 on CPU-only builds).
    pub gpu_layers: u32,
    /// A chat template to use instead of (or in the absence of) the model's own: a llama.cpp
    /// built-in name (`chatml`, `gemma`, `llama3`, …) or a template text.
    pub chat_template: Option<String>,
}

struct ModelInner {
    model: LlamaModel,
    chat: ChatTemplates,
    /// The configured template is a name of llama.cpp's built-in templates (`chatml`,
    /// `gemma`, …), rendered by llama.cpp's template matcher instead of as Jinja.
    builtin_template: bool,
    /// Every end-of-generation token, banned when a request sets `ignore_eos`.
    eog_tokens: Vec<Token>,
    info: ModelInfo,
}

/// A loaded model. Cheap to copy; lives until the process exits.
#[derive(Clone, Copy)]
pub struct Model(&'static ModelInner);

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.0.info).finish()
    }
}

fn backend() -> Result<&'static LlamaBackend, LoadError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| LoadError::Backend(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| b))
}

/// llama.cpp's load progress (0 to 1) as an info line at most once a second: a quick load
/// writes none, a slow one (a large file, a cold page cache, GPU offload) shows it moves.
fn load_progress() -> impl FnMut(f32) -> bool + 'static {
    let mut last = std::time::Instant::now();
    move |progress| {
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            last = std::time::Instant::now();
            let percent = (progress.clamp(0.0, 1.0) * 100.0).round() as u32;
            tracing::info!(percent, "loading the model");
        }
        true
    }
}

impl Model {
    /// Loads a GGUF file. The model is kept for the rest of the process: contexts borrow it
    /// for `'static`, so the engine thread and the IPC thread can share it without locks.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::MissingFile(path.to_path_buf()));
        }
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(options.gpu_layers)
            .with_progress_callback(load_progress());
        let model = LlamaModel::load_from_file(backend()?, path, &params).map_err(|e| {
            LoadError::Model {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let template = options.chat_template.as_deref().filter(|t| !t.is_empty());
        if let Some(name) =
            template.filter(|t| !is_template_text(t) && !is_builtin_template_name(t))
        {
            return Err(LoadError::ChatTemplate {
                name: clean_message(name),
                reason: "it is neither one of llama.cpp's built-in template names (chatml, llama3, gemma, …) nor a Jinja template".into(),
            });
        }
        // SAFETY: the model is leaked below with the templates, so it outlives them.
        #[allow(unsafe_code)]
        let chat =
            unsafe { ChatTemplates::new(raw_model(&model), template) }.map_err(|reason| {
                LoadError::ChatTemplate {
                    name: template.map_or_else(|| "from the model".into(), clean_message),
                    reason: clean_message(&reason),
                }
            })?;
        let builtin_template = template.is_some_and(is_builtin_template_name);
        let vocab = model.vocab();
        let eog_tokens: Vec<Token> = vocab
            .tokens()
            .filter(|t| vocab.is_eog(*t))
            .map(|t| t.0)
            .collect();
        let info = ModelInfo {
            n_ctx_train: model.n_ctx_train(),
            n_params: model.n_params(),
            n_vocab: u32::try_from(model.n_vocab()).unwrap_or(0),
            size: model.size(),
            has_chat_template: true,
            chat_template: template
                .filter(|_| builtin_template)
                .map_or_else(|| chat.source().to_string(), str::to_string),
            eog_tokens: eog_tokens.clone(),
        };
        let inner = Box::leak(Box::new(ModelInner {
            model,
            chat,
            builtin_template,
            eog_tokens,
            info,
        }));
        Ok(Model(inner))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.0.info
    }

    /// Tokenizes text; special tokens written in the text are parsed as such (llama-server's
    /// behaviour), and `add_special` adds BOS when the model wants one.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<Token> {
        let vocab = self.0.model.vocab();
        vocab
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Renders a conversation with the chat template (the GGUF's Jinja template, or
    /// `model.chat_template`) through llama.cpp's chat code, as llama-server's `--jinja` does:
    /// the prompt, and the grammar, triggers, stops and parser that go with it. `json_schema`
    /// (a structured-output request's schema) becomes part of the grammar.
    pub fn render_chat(
        &self,
        chat: &ChatPrompt,
        json_schema: Option<&str>,
    ) -> Result<Rendered, RequestError> {
        let messages = serde_json::Value::Array(chat.messages.iter().map(message_json).collect());
        let parse = |text: &str, param: &str| -> Result<Option<serde_json::Value>, RequestError> {
            if text.is_empty() {
                return Ok(None);
            }
            serde_json::from_str(text)
                .map(Some)
                .map_err(|e| RequestError::InvalidParam {
                    param: param.into(),
                    message: format!("{param} is not valid JSON ({e})"),
                })
        };
        let tools = parse(&chat.tools.tools, "tools")?;
        let kwargs = parse(&chat.template_kwargs, "chat_template_kwargs")?;
        let inputs = RenderInputs {
            messages,
            tools,
            tool_choice: Some(match chat.tools.choice {
                ToolChoice::Auto => "auto",
                ToolChoice::None => "none",
                ToolChoice::Required => "required",
            }),
            parallel_tool_calls: chat.tools.parallel,
            add_generation_prompt: chat.ending == ChatEnding::OpenAssistant,
            continue_final_message: chat.ending == ChatEnding::ContinueFinal,
            use_jinja: !self.0.builtin_template,
            chat_template_kwargs: kwargs,
            reasoning_format: chat.reasoning.format.name(),
            enable_thinking: chat.reasoning.enable_thinking,
            preserve_reasoning: chat.reasoning.preserve,
            json_schema,
        };
        self.0
            .chat
            .apply(&inputs)
            .map_err(|e| RequestError::ChatTemplate(clean_message(&e)))
    }

    /// llama.cpp's grammar for a JSON schema (its own converter, as llama-server's
    /// `json_schema`); a schema it cannot convert is a request error naming the field it came
    /// in.
    pub fn schema_grammar(&self, schema: &JsonSchema) -> Result<String, RequestError> {
        llama_cpp_2::json_schema_to_grammar(&schema.text).map_err(|e| RequestError::InvalidParam {
            param: schema.field.clone(),
            message: clean_message(&format!(
                "this JSON schema cannot be turned into a grammar ({e})"
            )),
        })
    }

    /// The tokens `texts` are when each is exactly one token (llama-server's preserved
    /// tokens: what a chat format's markers must stay as text).
    pub fn single_tokens(&self, texts: &[String]) -> Vec<(String, Token)> {
        texts
            .iter()
            .filter_map(|text| match self.tokenize(text, false).as_slice() {
                [token] => Some((text.clone(), *token)),
                _ => None,
            })
            .collect()
    }

    /// llama.cpp's grammar sampler for a GBNF grammar starting at `root`; a grammar llama.cpp
    /// cannot parse (or with left recursion) is a request error naming `grammar`. Only for a
    /// grammar [`llamapool_common::gbnf::check`] passed: llama.cpp's parser recurses per nested
    /// group and expands repetitions without limits of its own.
    fn grammar(&self, grammar: &str) -> Result<LlamaSampler, RequestError> {
        self.lazy_grammar(grammar, &[])
    }

    /// [`Self::grammar`], lazy when there are `triggers`: it constrains nothing until one of
    /// them (a token, or a pattern over the generated text) shows up, as llama-server's tool
    /// call grammars.
    fn lazy_grammar(
        &self,
        grammar: &str,
        triggers: &[GrammarTrigger],
    ) -> Result<LlamaSampler, RequestError> {
        let built = if triggers.is_empty() {
            LlamaSampler::grammar(&self.0.model, grammar, "root")
        } else {
            let mut patterns = Vec::new();
            let mut tokens = Vec::new();
            for trigger in triggers {
                match trigger {
                    GrammarTrigger::Token(t) => tokens.push(LlamaToken(*t)),
                    GrammarTrigger::Pattern(p) => patterns.push(p.clone()),
                }
            }
            LlamaSampler::grammar_lazy_patterns(&self.0.model, grammar, "root", &patterns, &tokens)
        };
        built.map_err(|e| {
            RequestError::InvalidParam {
                param: "grammar".into(),
                message: clean_message(&format!(
                    "the grammar is not valid GBNF with a `root` rule ({e}); llama.cpp's parser logs the details"
                )),
            }
        })
    }

    /// Checks a client's grammar the way the engine will use it: the bounded pre-check, then
    /// llama.cpp's parser (the sampler is built and dropped). Run on the prepare thread, whose
    /// stack is [`crate::ipc::PREPARE_STACK_BYTES`], so that the engine thread only ever parses
    /// grammars that parsed before; a refusal is a request error naming `grammar`.
    pub fn check_grammar(&self, grammar: &str) -> Result<(), RequestError> {
        llamapool_common::gbnf::check(grammar).map_err(|message| RequestError::InvalidParam {
            param: "grammar".into(),
            message,
        })?;
        self.grammar(grammar).map(drop)
    }

    /// Checks a grammar llama.cpp's chat code or schema converter made, with its triggers, by
    /// building the sampler once (on the prepare thread, as [`Self::check_grammar`]).
    pub fn check_generated_grammar(
        &self,
        grammar: &str,
        triggers: &[GrammarTrigger],
    ) -> Result<(), RequestError> {
        self.lazy_grammar(grammar, triggers).map(drop)
    }

    /// The text of one token (special tokens rendered), as llama-server's `/tokenize` pieces.
    pub fn piece(&self, token: Token) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_piece(token, &mut out, true);
        out
    }

    /// Detokenizes a whole token list, invalid UTF-8 replaced.
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            self.append_piece(t, &mut bytes, false);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn is_valid_token(&self, token: Token) -> bool {
        u32::try_from(token).is_ok_and(|t| t < self.0.info.n_vocab)
    }

    fn append_piece(&self, token: Token, out: &mut Vec<u8>, special: bool) {
        if self.is_valid_token(token) {
            self.0
                .model
                .vocab()
                .token_to_piece_into(LlamaToken(token), out, special, None);
        }
    }

    /// Creates a context and its batch for the engine thread; `config` is validated first.
    pub fn new_backend(&self, config: &ContextConfig) -> Result<LlamaCppBackend, LoadError> {
        let ctx = self.new_context(config, |params| params)?;
        let n_ctx = ctx.n_ctx() as usize;
        let n_seq_max = config.slots as usize;
        // The same per-sequence budget in both layouts: with a unified cache the slices are
        // not enforced by llama.cpp, but keeping every sequence within `n_ctx / n_seq_max`
        // means the shared cache can never run out of cells mid-generation.
        let n_ctx_per_seq = n_ctx / n_seq_max;
        let n_batch = ctx.n_batch() as usize;
        let limits = BackendLimits {
            n_batch,
            n_seq_max,
            n_ctx_per_seq,
            n_vocab: self.0.info.n_vocab as usize,
        };
        let model = &self.0.model;
        // A sliding window drops old cells, recurrent state has no cells to cut back: neither
        // can keep a prefix of a finished sequence.
        let sliding_window = model
            .meta_val_str("general.architecture")
            .ok()
            .and_then(|arch| {
                model
                    .meta_val_str(&format!("{arch}.attention.sliding_window"))
                    .ok()
            })
            .is_some();
        let keeps_prefix = !model.is_recurrent() && !model.is_hybrid() && !sliding_window;
        Ok(LlamaCppBackend {
            model: *self,
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            limits,
            keeps_prefix,
            // With one stream per sequence, llama.cpp copies whole streams, not ranges.
            shares_cells: keeps_prefix && config.kv_unified,
        })
    }

    /// A context of `config`'s shape (checked first), with `adjust` applied to its parameters
    /// last (an embedding context's batch sizes and pooling).
    fn new_context(
        &self,
        config: &ContextConfig,
        adjust: impl FnOnce(LlamaContextParams) -> LlamaContextParams,
    ) -> Result<LlamaContext<'static>, LoadError> {
        config.validate()?;
        let threads = i32::try_from(config.threads)
            .expect("validate() keeps threads within MAX_THREADS, an i32");
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(config.context))
            .with_n_batch(config.n_batch)
            .with_n_ubatch(config.n_ubatch.min(config.n_batch))
            .with_n_seq_max(config.slots)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(config.kv_unified)
            .with_flash_attention_policy(flash_attention_type(config.flash_attention));
        self.0
            .model
            .new_context(backend()?, adjust(params))
            .map_err(|e| LoadError::Context(e.to_string()))
    }
}

/// llama.cpp's name for a flash-attention policy.
fn flash_attention_type(policy: FlashAttention) -> llama_cpp_sys_2::llama_flash_attn_type {
    match policy {
        FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
}

/// Sampling for one request: a plain argmax over the logits when greedy needs nothing else
/// (it skips building a candidate array over the whole vocabulary), else a llama.cpp chain,
/// with a grammar in front of it when the request has one.
pub enum LlamaSampling {
    Argmax { banned: &'static [Token] },
    Chain(LlamaSampler),
    Grammar(Box<Constrained>),
}

/// A grammar-constrained request. The grammar is not inside the chain: llama.cpp's grammar
/// throws a C++ exception (which aborts the process) when it is made to accept a token it does
/// not allow, as `llama_sampler_sample` would when every allowed token has been banned (a
/// `logit_bias`, `ignore_eos` at the grammar's end). So sampling is done step by step here,
/// and only a token the grammar allows is accepted; when none is left the sequence gets an
/// end-of-generation token instead.
///
/// llama.cpp's grammar keeps one parse stack per way the text so far can be read, with no
/// limit: an ambiguous grammar (`r ::= "a" r "b" | "a" r "c" | "d"`) doubles them with every
/// token, and the time of each step with them (17 s by the 14th "a"), on the engine thread.
/// So a step whose grammar work takes more than [`MAX_GRAMMAR_STEP`] is the grammar's last:
/// from then on the sequence gets the end-of-generation token, as when the grammar is complete.
pub struct Constrained {
    grammar: LlamaSampler,
    chain: LlamaSampler,
    /// The candidate array, kept between steps to reuse its allocation.
    candidates: Vec<LlamaTokenData>,
    /// Returned, unaccepted, when the grammar allows nothing any more.
    end: Token,
    /// A step took longer than [`MAX_GRAMMAR_STEP`]: the grammar is not used again.
    spent: bool,
}

/// The most one token's grammar work (masking, accepting) may take; a grammar that needs more
/// ends its request's generation (`finish_reason` `stop`, a warning in the worker's log).
pub const MAX_GRAMMAR_STEP: std::time::Duration = std::time::Duration::from_millis(250);

impl Constrained {
    /// llama-server's order: the chain picks from the plain logits first, and only when the
    /// grammar refuses that token is it asked to mask the whole vocabulary and the chain picks
    /// again. The same token for greedy requests, at a fraction of the cost per step.
    fn sample(&mut self, logits: &[f32]) -> Token {
        if self.spent {
            return self.end;
        }
        let start = std::time::Instant::now();
        let token = self.sample_with_grammar(logits);
        let took = start.elapsed();
        if took > MAX_GRAMMAR_STEP {
            self.spent = true;
            tracing::warn!(
                ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                "the request's grammar took too long for one token (an ambiguous grammar); its generation ends here"
            );
        }
        token
    }

    fn sample_with_grammar(&mut self, logits: &[f32]) -> Token {
        let fast = self.pick(logits, false);
        let picked = match fast {
            Some(token) if self.allows(token.0) => Some(token),
            _ => self.pick(logits, true),
        };
        match picked {
            Some(token) => {
                // llama.cpp throws (caught by its shim) when the text leaves the grammar with
                // no way on, say a lazy grammar's trigger followed by text it does not
                // match; its next mask would abort the process. So that was its last step.
                if self.grammar.try_accept(token).is_err() {
                    self.spent = true;
                    tracing::warn!(
                        "the generated text left the request's grammar; its generation ends here"
                    );
                }
                self.chain.accept(token);
                token.0
            }
            None => self.end,
        }
    }

    /// The chain's choice among `logits`, masked by the grammar first when `constrained`;
    /// `None` when every candidate was excluded.
    fn pick(&mut self, logits: &[f32], constrained: bool) -> Option<LlamaToken> {
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &logit)| LlamaTokenData::new(LlamaToken(i as Token), logit, 0.0)),
        );
        let mut array = LlamaTokenDataArray::new(candidates, false);
        if constrained {
            array.apply_sampler(&mut self.grammar);
        }
        array.apply_sampler(&mut self.chain);
        let picked = array
            .selected
            .map(|i| array.data[i])
            .filter(|d| d.logit() > f32::NEG_INFINITY)
            .map(|d| d.id());
        self.candidates = array.data;
        picked
    }

    /// Whether the grammar, in its current state, allows `token` next.
    fn allows(&mut self, token: Token) -> bool {
        let mut one = LlamaTokenDataArray::new(
            vec![LlamaTokenData::new(LlamaToken(token), 0.0, 0.0)],
            false,
        );
        one.apply_sampler(&mut self.grammar);
        one.data[0].logit() > f32::NEG_INFINITY
    }
}

/// One llama.cpp context, driven by the engine thread.
pub struct LlamaCppBackend {
    model: Model,
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    limits: BackendLimits,
    /// See [`Backend::can_keep_prefix`].
    keeps_prefix: bool,
    /// See [`Backend::can_share_cells`].
    shares_cells: bool,
}

impl std::fmt::Debug for LlamaCppBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCppBackend")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Backend for LlamaCppBackend {
    type Sampler = LlamaSampling;

    fn limits(&self) -> BackendLimits {
        self.limits
    }

    fn new_sampler(
        &self,
        p: &SamplingParams,
        ignore_eos: bool,
        prompt: &[Token],
        resumed: usize,
    ) -> Result<LlamaSampling, RequestError> {
        let eog: &'static [Token] = if ignore_eos {
            &self.model.0.eog_tokens
        } else {
            &[]
        };
        if p.is_greedy() && p.logit_bias.is_empty() && !p.has_penalties() && p.grammar.is_none() {
            return Ok(LlamaSampling::Argmax { banned: eog });
        }
        let grammar = p
            .grammar
            .as_deref()
            .map(|g| self.model.lazy_grammar(g, &p.grammar_triggers))
            .transpose()?;
        let n_vocab = self.model.0.model.n_vocab();
        let mut chain = Vec::new();
        let biases: Vec<LlamaLogitBias> = p
            .logit_bias
            .iter()
            .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b))
            .chain(
                eog.iter()
                    .map(|&t| LlamaLogitBias::new(LlamaToken(t), f32::NEG_INFINITY)),
            )
            .collect();
        if !biases.is_empty() {
            chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
        }
        if p.has_penalties() {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                p.repeat_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            ));
        }
        if p.is_greedy() {
            chain.push(LlamaSampler::greedy());
        } else {
            // llama-server's order: top-k, top-p, min-p, then temperature, then the draw.
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(p.top_k));
            }
            if p.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(p.top_p, 1));
            }
            if p.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(p.min_p, 1));
            }
            chain.push(LlamaSampler::temp(p.temperature));
            // u32::MAX is LLAMA_DEFAULT_SEED: llama.cpp draws a random seed.
            chain.push(LlamaSampler::dist(p.seed.unwrap_or(u32::MAX)));
        }
        let mut sampler = LlamaSampler::chain_simple(chain);
        if p.has_penalties() {
            // Penalties see the prompt too, as in llama-server.
            let window = usize::try_from(p.repeat_last_n)
                .unwrap_or(0)
                .min(prompt.len());
            sampler.accept_many(
                prompt[prompt.len() - window..]
                    .iter()
                    .map(|&t| LlamaToken(t)),
            );
        }
        let Some(grammar) = grammar else {
            return Ok(LlamaSampling::Chain(sampler));
        };
        let mut constrained = Constrained {
            grammar,
            chain: sampler,
            candidates: Vec::new(),
            spent: false,
            end: self
                .model
                .0
                .eog_tokens
                .first()
                .copied()
                .unwrap_or_else(|| self.model.0.model.vocab().eos().0),
        };
        // The assistant turn's opening the template wrote is the grammar's start (llama-server's
        // prefill of its tool-call and schema grammars).
        for &token in &p.grammar_prefill {
            if constrained.grammar.try_accept(LlamaToken(token)).is_err() {
                return Err(RequestError::ChatTemplate(
                    "the chat format's grammar does not accept the assistant turn's opening".into(),
                ));
            }
        }
        // Tokens generated by a worker that died went through the same grammar: replay them.
        for &token in &prompt[prompt.len() - resumed.min(prompt.len())..] {
            if !constrained.allows(token) {
                return Err(RequestError::InvalidParam {
                    param: "grammar".into(),
                    message: "the text generated so far does not match the grammar".into(),
                });
            }
            if constrained.grammar.try_accept(LlamaToken(token)).is_err() {
                return Err(RequestError::InvalidParam {
                    param: "grammar".into(),
                    message: "the text generated so far does not match the grammar".into(),
                });
            }
        }
        Ok(LlamaSampling::Grammar(Box::new(constrained)))
    }

    fn clear_sequence(&mut self, seq: SeqId, from_pos: i32) {
        let from = u32::try_from(from_pos).ok().filter(|&p| p > 0);
        // Removing cells of a valid sequence id cannot fail for a non-recurrent model.
        let _ = self
            .ctx
            .clear_kv_cache_seq(Some(seq.get() as u32), from, None);
    }

    fn can_keep_prefix(&self) -> bool {
        self.keeps_prefix
    }

    fn can_share_cells(&self) -> bool {
        self.shares_cells
    }

    fn share_prefix(&mut self, from: SeqId, to: SeqId, from_pos: i32, to_pos: i32) {
        let position = |p: i32| Some(u32::try_from(p).expect("positions are non-negative"));
        // Only positions and sequence ids beyond i32 can fail, and neither reaches here.
        let _ =
            self.ctx
                .copy_kv_cache_seq(from.get(), to.get(), position(from_pos), position(to_pos));
    }

    fn decode(&mut self, entries: &[BatchEntry]) -> Result<(), DecodeFailure> {
        self.batch.clear();
        for e in entries {
            self.batch
                .add(LlamaToken(e.token), e.pos, &[e.seq.get()], e.logits)
                .map_err(|err| DecodeFailure::Other(format!("batch construction: {err}")))?;
        }
        match self.ctx.decode(&mut self.batch) {
            Ok(()) => Ok(()),
            Err(err) => {
                // llama.cpp may have kept cells of the ubatches that succeeded: remove them so
                // each sequence is exactly as it was before this step.
                for e in entries {
                    self.clear_sequence(e.seq, e.pos);
                }
                Err(match err {
                    DecodeError::NoKvCacheSlot => DecodeFailure::NoKvSlot,
                    other => DecodeFailure::Other(other.to_string()),
                })
            }
        }
    }

    fn sample(&mut self, sampler: &mut LlamaSampling, batch_index: usize) -> Token {
        let idx = i32::try_from(batch_index).expect("batch index fits in i32");
        match sampler {
            LlamaSampling::Chain(s) => s.sample(&self.ctx, idx).0,
            LlamaSampling::Argmax { banned } => argmax(self.ctx.get_logits_ith(idx), banned),
            LlamaSampling::Grammar(c) => c.sample(self.ctx.get_logits_ith(idx)),
        }
    }

    fn logits(&self, batch_index: usize) -> &[f32] {
        let idx = i32::try_from(batch_index).expect("batch index fits in i32");
        self.ctx.get_logits_ith(idx)
    }

    fn append_piece(&self, token: Token, out: &mut Vec<u8>, special: bool) {
        self.model.append_piece(token, out, special);
    }

    fn is_eog(&self, token: Token) -> bool {
        self.model.0.eog_tokens.contains(&token)
    }
}

/// Index of the largest logit, skipping banned tokens; ties go to the lowest index, as in
/// llama.cpp's greedy sampler.
fn argmax(logits: &[f32], banned: &[Token]) -> Token {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        // `banned` is only consulted for a new maximum, which is rare.
        if v > best_value && !banned.contains(&(i as Token)) {
            best = i;
            best_value = v;
        }
    }
    best as Token
}

/// A message in OpenAI's shape, for llama.cpp's `common_chat_msgs_parse_oaicompat`.
fn message_json(message: &ChatMessage) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut out = Map::new();
    out.insert("role".into(), Value::from(message.role.as_str()));
    let content = if message.text_parts.is_empty() {
        Value::from(message.content.as_str())
    } else {
        message
            .text_parts
            .iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect()
    };
    out.insert("content".into(), content);
    if !message.tool_calls.is_empty() {
        let calls = message
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = json!({
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if !c.id.is_empty() {
                    call["id"] = Value::from(c.id.as_str());
                }
                call
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    for (key, value) in [
        ("tool_call_id", &message.tool_call_id),
        ("name", &message.name),
        ("reasoning_content", &message.reasoning_content),
    ] {
        if !value.is_empty() {
            out.insert(key.into(), Value::from(value.as_str()));
        }
    }
    Value::Object(out)
}

/// llama-cpp-2 keeps its model pointer private; the chat code needs it (the template
/// variants in the GGUF, the BOS and EOS texts). `LlamaModel` is that one pointer.
#[allow(unsafe_code)]
fn raw_model(model: &LlamaModel) -> *const llama_cpp_sys_2::llama_model {
    const _: () = assert!(
        std::mem::size_of::<LlamaModel>() == std::mem::size_of::<*const ()>(),
        "llama-cpp-2's LlamaModel is no longer one pointer"
    );
    // SAFETY: `LlamaModel` holds exactly one `NonNull<llama_model>` (checked above).
    let ptr =
        unsafe { *(model as *const LlamaModel).cast::<*const llama_cpp_sys_2::llama_model>() };
    // SAFETY: a live model; the check that the pointer is the model's own.
    let n_params = unsafe { llama_cpp_sys_2::llama_model_n_params(ptr) };
    assert_eq!(
        n_params,
        model.n_params(),
        "the model pointer is the model's"
    );
    ptr
}

/// Whether `text` is written in Jinja (has a tag or an expression): a single word without
/// either is a template name, and one llama.cpp does not know is a mistake, not a template
/// that renders that word.
fn is_template_text(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// Whether `name` is one of llama.cpp's built-in template names (`chatml`, `gemma`, …).
#[allow(unsafe_code)]
fn is_builtin_template_name(name: &str) -> bool {
    let mut names = vec![std::ptr::null(); 128];
    // SAFETY: llama.cpp writes at most `names.len()` static strings.
    let n =
        unsafe { llama_cpp_sys_2::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    let n = usize::try_from(n).unwrap_or(0).min(names.len());
    names[..n].iter().any(|&p| {
        // SAFETY: static NUL-terminated names.
        !p.is_null() && unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes() == name.as_bytes()
    })
}

/// A message for a client from text llama.cpp produced: control characters escaped, at most
/// 300 characters.
fn clean_message(text: &str) -> String {
    const MAX_MESSAGE_CHARS: usize = 300;
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{argmax, clean_message};

    #[test]
    fn argmax_skips_banned_and_prefers_first() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0], &[]), 1);
        assert_eq!(argmax(&[0.0, 3.0, 2.0, 1.0], &[1]), 2);
    }

    /// The figures in docs/RELIABILITY.md ("Grammar and schema bombs"): what llama.cpp's
    /// parser costs, without and within `gbnf::check`'s bounds. Run by hand:
    /// `cargo test --release -p llamapool-worker --lib grammar_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, with SmolLM2"]
    fn grammar_costs() {
        let path = llamapool_common::settings::models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = super::Model::load(&path, &super::ModelOptions::default()).unwrap();
        let hwm = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .find(|l| l.starts_with("VmHWM"))
                .unwrap()
                .to_string()
        };
        eprintln!("model loaded: {}", hwm());
        let literal = format!("\"{}\"", "x".repeat(1000));
        let chain: String = (0..9_998)
            .map(|i| format!("r{i} ::= r{}\n", i + 1))
            .collect::<String>()
            + "r9998 ::= \"a\"\nroot ::= r0\n";
        let mut layered = String::from("root ::= r0\n");
        for i in 0..11 {
            layered.push_str(&format!("r{i} ::= r{} \"a\" | r{} \"b\"\n", i + 1, i + 1));
        }
        layered.push_str("r11 ::= \"c\"\n");
        let cases = [
            ("11 layered rules (2048 start paths)", layered, true),
            (
                "1000-char literal {2000} x 10 (unchecked)",
                format!("root ::= {}", format!("{literal}{{2000}} ").repeat(10)),
                false,
            ),
            (
                "1000-char literal {1000} (1M elements)",
                format!("root ::= {literal}{{1000}}"),
                true,
            ),
            ("chain of 10 000 rules", chain, true),
            (
                "128 nested groups",
                format!("root ::= {}\"a\"{}", "(".repeat(128), ")".repeat(128)),
                true,
            ),
        ];
        for (name, grammar, checked) in cases {
            if checked {
                llamapool_common::gbnf::check(&grammar).unwrap();
            }
            let start = std::time::Instant::now();
            let ok = std::thread::scope(|s| {
                // The engine thread's stack.
                std::thread::Builder::new()
                    .stack_size(2 << 20)
                    .spawn_scoped(s, || model.grammar(&grammar).is_ok())
                    .unwrap()
                    .join()
                    .unwrap()
            });
            eprintln!(
                "{name}: {} bytes, parsed {ok} in {:?}, {}",
                grammar.len(),
                start.elapsed(),
                hwm()
            );
        }
    }

    #[test]
    fn messages_from_llama_cpp_are_one_short_line() {
        assert_eq!(clean_message("a\nb\x1b"), "a\\nb\\u{1b}");
        let long = clean_message(&"x".repeat(10_000));
        assert_eq!(long.chars().count(), 301);
    }
}
