//! An embedding worker's llama.cpp context ([`LlamaEmbedder`]): a context created in embedding
//! mode with one pooling, which decodes whole inputs side by side (one sequence each, every
//! token an output) and reads back each input's pooled vector, or with pooling `none` one
//! vector per token. Owned by the embedder thread ([`crate::embed`]); the tokens it gets were
//! checked on the prepare thread ([`Model::embedding_tokens`]).

use llama_cpp_2::context::params::LlamaPoolingType;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llamapool_common::protocol::{EmbedInput, InputPart};
use llamapool_common::worker::{ContextConfig, Pooling};
use llamapool_common::{RequestError, Token};

use super::{LoadError, Model};
use crate::embed::{EmbedLimits, Embedder, Embeddings};

/// One embedding context and its batch.
pub struct LlamaEmbedder {
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    pooling: Pooling,
    limits: EmbedLimits,
}

impl std::fmt::Debug for LlamaEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaEmbedder")
            .field("pooling", &self.pooling)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// The pooling a context of this model runs with `configured`: itself, or for
    /// `Pooling::Model` what the GGUF's `<arch>.pooling_type` says (none when it says
    /// nothing, as llama.cpp reads it).
    pub fn effective_pooling(&self, configured: Pooling) -> Pooling {
        if configured != Pooling::Model {
            return configured;
        }
        let model = &self.0.model;
        let declared = model
            .meta_val_str("general.architecture")
            .ok()
            .and_then(|arch| model.meta_val_str(&format!("{arch}.pooling_type")).ok())
            .and_then(|value| value.trim().parse::<i32>().ok());
        match declared {
            Some(1) => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            Some(4) => Pooling::Rank,
            _ => Pooling::None,
        }
    }

    /// The width of one embedding vector.
    pub fn n_embd(&self) -> usize {
        usize::try_from(self.0.model.n_embd_out()).unwrap_or(0)
    }

    /// Creates an embedding context of `config`'s shape: `n_batch` and `n_ubatch` both the
    /// smaller of the two, so an input of up to that many tokens is computed in one step (a
    /// pooled embedding needs all of a sequence's tokens in one ubatch).
    pub fn new_embedder(
        &self,
        config: &ContextConfig,
        pooling: Pooling,
    ) -> Result<LlamaEmbedder, LoadError> {
        let pooling = self.effective_pooling(pooling);
        let n_batch = config.n_batch.min(config.n_ubatch);
        let ctx = self.new_context(config, |params| {
            params
                .with_n_batch(n_batch)
                .with_n_ubatch(n_batch)
                .with_embeddings(true)
                .with_pooling_type(pooling_type(pooling))
        })?;
        let n_seq_max = config.slots as usize;
        let n_batch = ctx.n_batch() as usize;
        let limits = EmbedLimits {
            n_batch,
            n_seq_max,
            n_ctx_per_seq: ctx.n_ctx() as usize / n_seq_max,
            n_embd: self.n_embd(),
        };
        Ok(LlamaEmbedder {
            ctx,
            batch: LlamaBatch::new(n_batch, 1),
            pooling,
            limits,
        })
    }

    /// An embedding input's tokens as llama-server makes them: text parts tokenized with
    /// special tokens parsed (the first part, when text, with the model's BOS/EOS), token ids
    /// as given but checked against the vocabulary; a rerank pair through the model's `rerank`
    /// template, or as `BOS query EOS SEP document EOS` where the vocabulary adds those.
    pub fn embedding_tokens(&self, input: &EmbedInput) -> Result<Vec<Token>, RequestError> {
        let tokens = match input {
            EmbedInput::Parts(parts) => {
                let mut tokens = Vec::new();
                for (index, part) in parts.iter().enumerate() {
                    match part {
                        InputPart::Text(text) => {
                            tokens.extend(self.tokenize(text, index == 0));
                        }
                        InputPart::Tokens(ids) => tokens.extend_from_slice(ids),
                    }
                }
                tokens
            }
            EmbedInput::Rerank { query, document } => self.rerank_tokens(query, document),
        };
        if let Some(&token) = tokens.iter().find(|&&t| !self.is_valid_token(t)) {
            return Err(RequestError::InvalidToken {
                token,
                n_vocab: self.info().n_vocab,
            });
        }
        if tokens.is_empty() {
            return Err(RequestError::InvalidParam {
                param: "input".into(),
                message: "Input content cannot be empty".into(),
            });
        }
        Ok(tokens)
    }

    /// llama-server's `format_prompt_rerank`.
    fn rerank_tokens(&self, query: &str, document: &str) -> Vec<Token> {
        let model = &self.0.model;
        if let Some(template) = model
            .chat_template(Some("rerank"))
            .ok()
            .and_then(|t| t.to_string().ok())
        {
            let prompt = template
                .replace("{query}", query)
                .replace("{document}", document);
            return self.tokenize(&prompt, false);
        }
        let vocab = model.vocab();
        let eos = match vocab.eos().0 {
            -1 => vocab.sep().0,
            eos => eos,
        };
        let mut tokens = Vec::new();
        if vocab.should_add_bos() {
            tokens.push(vocab.bos().0);
        }
        tokens.extend(self.tokenize(query, false));
        if vocab.should_add_eos() {
            tokens.push(eos);
        }
        if vocab.should_add_sep() {
            tokens.push(vocab.sep().0);
        }
        tokens.extend(self.tokenize(document, false));
        if vocab.should_add_eos() {
            tokens.push(eos);
        }
        tokens
    }
}

fn pooling_type(pooling: Pooling) -> LlamaPoolingType {
    match pooling {
        Pooling::Model => LlamaPoolingType::Unspecified,
        Pooling::None => LlamaPoolingType::None,
        Pooling::Mean => LlamaPoolingType::Mean,
        Pooling::Cls => LlamaPoolingType::Cls,
        Pooling::Last => LlamaPoolingType::Last,
        Pooling::Rank => LlamaPoolingType::Rank,
    }
}

impl Embedder for LlamaEmbedder {
    fn limits(&self) -> EmbedLimits {
        self.limits
    }

    fn pooling(&self) -> Pooling {
        self.pooling
    }

    fn embed(&mut self, inputs: &[&[Token]]) -> Result<Vec<Embeddings>, String> {
        self.batch.clear();
        for (seq, tokens) in inputs.iter().enumerate() {
            let seq = i32::try_from(seq).map_err(|e| e.to_string())?;
            for (pos, &token) in tokens.iter().enumerate() {
                let pos = i32::try_from(pos).map_err(|e| e.to_string())?;
                self.batch
                    .add(LlamaToken(token), pos, &[seq], true)
                    .map_err(|e| format!("batch construction: {e}"))?;
            }
        }
        let decoded = self.ctx.decode(&mut self.batch);
        let result = decoded
            .map_err(|e| e.to_string())
            .and_then(|()| self.read_embeddings(inputs));
        // Each call starts from an empty cache: nothing of one input may leak into another.
        self.ctx.clear_kv_cache();
        result
    }
}

impl LlamaEmbedder {
    /// After a decode of `inputs` (sequence `i` is input `i`, its tokens in order).
    fn read_embeddings(&self, inputs: &[&[Token]]) -> Result<Vec<Embeddings>, String> {
        let mut out = Vec::with_capacity(inputs.len());
        let mut first_index = 0i32;
        for (seq, tokens) in inputs.iter().enumerate() {
            let n = i32::try_from(tokens.len()).map_err(|e| e.to_string())?;
            let vectors = if self.pooling == Pooling::None {
                (first_index..first_index + n)
                    .map(|i| {
                        self.ctx
                            .embeddings_ith(i)
                            .map(<[f32]>::to_vec)
                            .map_err(|e| format!("no embedding for token {i}: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let seq = i32::try_from(seq).map_err(|e| e.to_string())?;
                vec![self
                    .ctx
                    .embeddings_seq_ith(seq)
                    .map(<[f32]>::to_vec)
                    .map_err(|e| format!("no embedding for sequence {seq}: {e}"))?]
            };
            first_index += n;
            out.push(vectors);
        }
        Ok(out)
    }
}
