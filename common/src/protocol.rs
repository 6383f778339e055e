//! The router ⇄ worker protocol: the messages, and the version both sides check on `Hello`.
//!
//! One Unix-socket connection per worker. The router sends [`ToWorker`]; the worker answers
//! with [`FromWorker`]. The generation events of one engine loop iteration (acceptances,
//! outputs, rejections, in the order the engine sent them) travel as one `Events` frame.
//! Encoding lives in [`crate::codec`].

use serde::{Deserialize, Serialize};

use crate::worker::Pooling;

use crate::{
    ChatMessage, GenerationEvent, ModelInfo, RequestError, RequestId, SamplingParams,
    StoppingParams, Token,
};

/// Bumped on any incompatible change of these types.
pub const PROTOCOL_VERSION: u32 = 17;

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// Raw text, tokenized with BOS and special tokens parsed (completions).
    Text(String),
    /// Token ids as given (completions with a token-array prompt).
    Tokens(Vec<Token>),
    /// Rendered with the model's chat template (chat completions).
    Chat(ChatPrompt),
}

/// A conversation to render with the model's chat template, how the rendering ends, and what
/// else the template and the output parser need (llama-server's `--jinja` inputs).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatPrompt {
    pub messages: Vec<ChatMessage>,
    pub ending: ChatEnding,
    pub tools: ChatTools,
    /// `chat_template_kwargs`: a JSON object's text (empty for none), each value passed to the
    /// template as the variable of its key (`enable_thinking`, …).
    pub template_kwargs: String,
    pub reasoning: Reasoning,
}

/// The tools a chat request offers (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatTools {
    /// OpenAI's `tools` array as JSON text (empty for none): the router checked each is a
    /// `function` with a name and an object of parameters.
    pub tools: String,
    pub choice: ToolChoice,
    /// `parallel_tool_calls`; `None` lets the template decide (llama-server's default).
    pub parallel: Option<bool>,
}

/// `tool_choice`; a named function is sent as `Required` with only that tool offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
}

/// How the model's reasoning is handled: where it goes in the answer (`reasoning_format`) and
/// whether the template is asked to think (`enable_thinking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reasoning {
    pub format: ReasoningFormat,
    pub enable_thinking: bool,
    /// Earlier assistant turns keep their reasoning in the prompt (llama-server's
    /// `--reasoning-preserve`, on by default): the template argument `preserve_reasoning`,
    /// which a request's `chat_template_kwargs` may set otherwise.
    pub preserve: bool,
}

impl Default for Reasoning {
    fn default() -> Self {
        Self {
            format: ReasoningFormat::Deepseek,
            enable_thinking: true,
            preserve: true,
        }
    }
}

/// llama-server's `--reasoning-format`: `none` leaves thinking in the content; `auto` and
/// `deepseek` move it to `reasoning_content`; `deepseek-legacy` does so in the final message
/// but leaves `<think>` inline in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReasoningFormat {
    None,
    #[default]
    Auto,
    Deepseek,
    DeepseekLegacy,
}

impl ReasoningFormat {
    /// llama.cpp's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Auto => "auto",
            Self::Deepseek => "deepseek",
            Self::DeepseekLegacy => "deepseek-legacy",
        }
    }

    /// The format llama.cpp names so, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::None, Self::Auto, Self::Deepseek, Self::DeepseekLegacy]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// How a rendered conversation ends: llama-server's `add_generation_prompt` and
/// `continue_final_message`, as one value so the forbidden pair cannot be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChatEnding {
    /// The assistant's turn opened after the last message (`add_generation_prompt: true`).
    #[default]
    OpenAssistant,
    /// The messages as the template renders them, nothing added (`add_generation_prompt:
    /// false`).
    AsRendered,
    /// The final message, an assistant's, left open so the generation continues its text
    /// (`continue_final_message`, or llama-server's assistant prefill): the text ends with
    /// that message's content, without the template's end-of-turn.
    ContinueFinal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub id: RequestId,
    /// The HTTP request's `x-request-id` (the client's, or one the router made): for log
    /// lines only, so the worker's lines about this request carry it. `id` is what the
    /// protocol and the engine use.
    pub request_id: String,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// Tokens already generated for this request by a worker that died (empty for a new
    /// request). The worker appends them to the prompt and continues the generation; their
    /// text was already sent, and usage still counts them as generated.
    pub resumed: Vec<Token>,
    /// Send `SeqOutput::progress` reports while the prompt is processed (a stream that asked
    /// for llama-server's `return_progress` or `timings_per_token`).
    pub report_progress: bool,
}

/// A call that expects exactly one answer with the same `call` number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlCall {
    Tokenize {
        content: String,
        add_special: bool,
        with_pieces: bool,
    },
    Detokenize {
        tokens: Vec<Token>,
    },
    /// Renders messages with the chat template, as a chat request's prompt would be, and
    /// returns the text (llama-server's `/apply-template`). Answered with `Rendered`.
    ApplyTemplate {
        chat: ChatPrompt,
    },
    /// One input's embedding, from an embedding worker (llama-server's one task per input of
    /// `/v1/embeddings` or document of `/v1/rerank`). `normalize` is llama-server's
    /// `embd_normalize`: -1 none, 0 max-absolute to int16 range, 2 Euclidean, p > 2 p-norm;
    /// pooled vectors only. Answered with `Embedded`, or `Refused` for a bad input.
    Embed {
        input: EmbedInput,
        normalize: i32,
    },
}

/// One input of an embedding call, tokenized by the worker as llama-server does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EmbedInput {
    /// Text and token ids in order, one sequence: the first part, when it is text, gets the
    /// model's special tokens (BOS, …); special tokens written in text are parsed.
    Parts(Vec<InputPart>),
    /// A query and a document for a ranking model: the model's `rerank` chat template with
    /// both filled in, or else `BOS query EOS SEP document EOS` as the vocabulary adds them.
    Rerank { query: String, document: String },
}

/// A piece of an [`EmbedInput::Parts`] input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InputPart {
    Text(String),
    Tokens(Vec<Token>),
}

// A message lives only between the socket and its handler, one at a time: boxing the large
// `Generate` would add an allocation per request to save stack space nobody holds.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    Hello {
        version: u32,
    },
    Generate(GenerateRequest),
    /// Idempotent: unknown or finished ids are ignored.
    Abort {
        ids: Vec<RequestId>,
    },
    Control {
        call: u64,
        body: ControlCall,
    },
    /// "Are you alive?" for an idle worker (one with work proves it with `Progress`). Answered
    /// with `Pong` by the thread that reads frames, never behind tokenization or an engine step.
    Ping {
        nonce: u64,
    },
    /// Finish what is running, accept nothing new, then exit.
    Drain,
}

/// What a worker is, sent once in `Ready`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub version: u32,
    pub pid: u32,
    pub cpus: Vec<usize>,
    pub threads: u32,
    pub slots: u32,
    pub n_ctx_per_seq: u32,
    pub model: ModelInfo,
    /// An embedding worker's pooling, as its context runs it (`Pooling::Model` resolved to
    /// the model's own); `None` for a generation worker.
    pub embedding: Option<Pooling>,
}

/// The worker's progress and load after an engine step, pushed as `Progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WorkerStats {
    /// Engine steps (loop iterations that decoded) since the worker started: the router's
    /// hang watchdog sees progress when this grows.
    pub steps: u64,
    /// Unix time of the last step, in milliseconds.
    pub last_step_unix_ms: u64,
    /// Requests holding a sequence (prefilling or decoding).
    pub running: u32,
    /// Requests queued for a free sequence.
    pub waiting: u32,
    /// `decode` calls since the worker started.
    pub decode_calls: u64,
    /// KV cache cells held by the running sequences (each sequence's prompt and generated
    /// tokens decoded so far, summed).
    pub kv_cells_used: u32,
    /// An adaptive worker whose CPUs no process outside the pool keeps busy: the router packs
    /// requests onto the first such worker while it has free slots (it widens once the other
    /// workers are idle). Always false for a fixed worker.
    pub packable: bool,
    /// An adaptive worker running wide now (its threads over all of its wide CPUs).
    pub wide: bool,
    /// Threads its decode runs with now (an adaptive worker's change with its shape; 0 from
    /// a fixed worker, which does not report it).
    pub threads_in_use: u32,
    /// Switches between wide and narrow since the worker started.
    pub shape_changes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    Tokenized {
        tokens: Vec<Token>,
        pieces: Option<Vec<Vec<u8>>>,
    },
    Detokenized {
        content: String,
    },
    Rendered {
        prompt: String,
    },
    /// An `Embed` call's result: one pooled vector (a ranking model's: its score first), or
    /// with pooling `none` one vector per token; and the tokens the input had.
    Embedded {
        vectors: Vec<Vec<f32>>,
        n_tokens: u32,
    },
    /// A call refused for its input (too long, invalid token, …) or failed for it.
    Refused(RequestError),
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    Ready(WorkerInfo),
    /// One engine loop iteration's events, any number of requests, in the order the engine
    /// sent them; a request rejected before it reached the engine gets a frame of its own.
    Events(Vec<GenerationEvent>),
    /// Sent after every engine loop iteration that ran a step or changed the load (so also
    /// when the last request leaves): the router caches it for `/workers` and `/metrics`, and
    /// its hang watchdog uses it. Never asked for.
    Progress(WorkerStats),
    /// The answer to `Ping`.
    Pong {
        nonce: u64,
    },
    Control {
        call: u64,
        reply: ControlReply,
    },
    /// Last words before the worker exits on an unrecoverable error.
    Fatal {
        message: String,
    },
}
