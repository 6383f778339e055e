//! Shared by the real-model engine tests: the SmolLM2 model (loaded once per test process)
//! and helpers to run requests to completion.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::Duration;

pub use llamapool_common::settings::models_dir;
use llamapool_common::{
    Finish, GenerationEvent, RequestError, RequestId, SamplingParams, StoppingParams, Token,
};
use llamapool_worker::{
    ContextConfig, EngineHandle, EngineRequest, Model, ModelOptions, RunningEngine,
};

pub fn smollm2_path() -> PathBuf {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup first",
        path.display()
    );
    path
}

pub fn smollm2() -> Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    *MODEL.get_or_init(|| {
        Model::load(&smollm2_path(), &ModelOptions::default()).expect("SmolLM2 loads")
    })
}

pub fn engine(slots: u32, context: u32, n_batch: u32) -> RunningEngine {
    let backend = smollm2()
        .new_backend(&ContextConfig {
            slots,
            context,
            n_batch,
            n_ubatch: n_batch,
            threads: 1,
            ..ContextConfig::default()
        })
        .expect("context");
    RunningEngine::spawn(backend).expect("engine thread")
}

pub fn greedy(id: u64, prompt: &str, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        id: RequestId(id),
        prompt: smollm2().tokenize(prompt, true),
        sampling: SamplingParams::greedy(),
        stopping: StoppingParams {
            max_tokens: Some(max_tokens),
            ..StoppingParams::default()
        },
        resumed: 0,
        report_progress: false,
        special_tokens: Vec::new(),
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub tokens: Vec<Token>,
    pub text: String,
    pub finish: Option<Finish>,
    pub error: Option<RequestError>,
}

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Reads events until the final one.
pub fn wait(rx: &Receiver<GenerationEvent>) -> Outcome {
    let mut out = Outcome::default();
    loop {
        let event = rx
            .recv_timeout(TIMEOUT)
            .expect("the engine answers in time");
        let last = event.is_final();
        match event {
            GenerationEvent::Output(o) => {
                out.tokens.extend(o.tokens);
                out.text.push_str(&o.text);
                out.finish = o.finish;
            }
            GenerationEvent::Rejected { error, .. } => out.error = Some(error),
            GenerationEvent::Accepted { .. } => {}
        }
        if last {
            return out;
        }
    }
}

pub fn run(handle: &EngineHandle, request: EngineRequest) -> Outcome {
    let (tx, rx) = mpsc::channel();
    handle.submit(request, tx);
    wait(&rx)
}
