//! The embedder: an embedding worker's thread, which owns its embedding context (an
//! [`Embedder`]) and answers `Embed` calls.
//!
//! The prepare thread tokenizes and checks each call's input ([`EmbedLimits::check`]) and
//! submits it as an [`EmbedJob`] through an [`EmbedHandle`]. The thread takes the jobs in
//! order and decodes as many side by side as one batch holds (at most `n_seq_max` inputs and
//! `n_batch` tokens): the inputs of one request, or of many concurrent ones, share a decode.
//! Each job's reply (`Embedded`, or `Refused` when the decode failed) and the worker's
//! `Progress` (so the router's hang watchdog sees every decode) go out through the sink it was
//! started with. Policy only: the llama.cpp side is `backend::llama::embedding`.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use llamapool_common::protocol::{ControlReply, FromWorker, WorkerStats};
use llamapool_common::worker::Pooling;
use llamapool_common::{RequestError, Token};

/// One input's vectors: one pooled vector, or one per token for pooling `none`.
pub type Embeddings = Vec<Vec<f32>>;

/// What the embedder thread drives: a context in embedding mode.
pub trait Embedder {
    fn limits(&self) -> EmbedLimits;
    /// The pooling the context runs (never `Pooling::Model`).
    fn pooling(&self) -> Pooling;
    /// Decodes the inputs side by side (each at most `n_batch` tokens, together too, and at
    /// most `n_seq_max` of them) and returns each one's vectors, not normalised. The context
    /// holds nothing of them afterwards.
    fn embed(&mut self, inputs: &[&[Token]]) -> Result<Vec<Embeddings>, String>;
}

/// Sizes fixed when the context was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedLimits {
    /// Most tokens of one decode, and so of one input.
    pub n_batch: usize,
    /// Most inputs of one decode.
    pub n_seq_max: usize,
    /// Most tokens one sequence may hold.
    pub n_ctx_per_seq: usize,
    /// The width of a vector.
    pub n_embd: usize,
}

impl EmbedLimits {
    /// Refuses an input longer than one decode or one sequence holds, with llama-server's
    /// words.
    pub fn check(&self, n_tokens: usize) -> Result<(), RequestError> {
        if n_tokens > self.n_batch {
            return Err(RequestError::InvalidParam {
                param: "input".into(),
                message: format!(
                    "input ({n_tokens} tokens) is too large to process. increase the physical \
                     batch size (current batch size: {})",
                    self.n_batch
                ),
            });
        }
        if n_tokens > self.n_ctx_per_seq {
            return Err(RequestError::InvalidParam {
                param: "input".into(),
                message: format!(
                    "input ({n_tokens} tokens) is too large to process: a sequence holds at \
                     most {} tokens",
                    self.n_ctx_per_seq
                ),
            });
        }
        Ok(())
    }
}

/// One checked input, and the call its reply answers.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedJob {
    pub call: u64,
    pub tokens: Vec<Token>,
    /// llama-server's `embd_normalize` (see [`normalize`]); pooled vectors only.
    pub normalize: i32,
}

enum Command {
    Job(EmbedJob),
    Shutdown { drain: bool },
}

/// Where the embedder's frames go (the IPC writer).
pub type FrameSink = Box<dyn FnMut(FromWorker) + Send>;

/// Talks to a running embedder. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbedHandle {
    commands: Sender<Command>,
    limits: EmbedLimits,
    pooling: Pooling,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Job(job) => write!(f, "Job({})", job.call),
            Self::Shutdown { drain } => write!(f, "Shutdown {{ drain: {drain} }}"),
        }
    }
}

impl EmbedHandle {
    /// Queues a job. Returns it when the embedder has stopped.
    pub fn submit(&self, job: EmbedJob) -> Result<(), EmbedJob> {
        self.commands
            .send(Command::Job(job))
            .map_err(|mpsc::SendError(command)| match command {
                Command::Job(job) => job,
                Command::Shutdown { .. } => unreachable!("a job was sent"),
            })
    }

    /// Stops the embedder; with `drain`, after the jobs it has.
    pub fn shutdown(&self, drain: bool) {
        let _ = self.commands.send(Command::Shutdown { drain });
    }

    pub fn limits(&self) -> EmbedLimits {
        self.limits
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }
}

/// A started embedder: its handle and its thread.
#[derive(Debug)]
pub struct RunningEmbedder {
    pub handle: EmbedHandle,
    thread: JoinHandle<()>,
}

impl RunningEmbedder {
    /// Starts the embedder thread over `embedder`; its replies and progress go to `sink`.
    pub fn spawn<E>(embedder: E, sink: FrameSink) -> std::io::Result<Self>
    where
        E: Embedder + Send + 'static,
    {
        let (commands, inbox) = mpsc::channel();
        let handle = EmbedHandle {
            commands,
            limits: embedder.limits(),
            pooling: embedder.pooling(),
        };
        let thread = std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || Thread::new(embedder, sink).run(&inbox))?;
        Ok(Self { handle, thread })
    }

    /// Stops the embedder (draining or not) and waits for its thread.
    pub fn stop(self, drain: bool) {
        self.handle.shutdown(drain);
        drop(self.handle);
        if self.thread.join().is_err() {
            tracing::error!("the embedder thread panicked");
        }
    }
}

/// The embedder thread's state.
struct Thread<E> {
    embedder: E,
    sink: FrameSink,
    queue: VecDeque<EmbedJob>,
    stats: WorkerStats,
    /// A draining shutdown came: stop once the queue is empty.
    draining: bool,
}

impl<E: Embedder> Thread<E> {
    fn new(embedder: E, sink: FrameSink) -> Self {
        Self {
            embedder,
            sink,
            queue: VecDeque::new(),
            stats: WorkerStats::default(),
            draining: false,
        }
    }

    fn run(mut self, inbox: &Receiver<Command>) {
        loop {
            if self.queue.is_empty() {
                if self.draining {
                    return;
                }
                match inbox.recv() {
                    Ok(command) => {
                        if !self.apply(command) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            // Whatever else came meanwhile joins this decode.
            while let Ok(command) = inbox.try_recv() {
                if !self.apply(command) {
                    return;
                }
            }
            if !self.queue.is_empty() {
                self.decode_wave();
            }
        }
    }

    /// Applies a command; false: stop now.
    fn apply(&mut self, command: Command) -> bool {
        match command {
            Command::Job(job) => {
                self.queue.push_back(job);
                true
            }
            Command::Shutdown { drain } => {
                self.draining = true;
                drain
            }
        }
    }

    /// Decodes the next wave of queued jobs and answers each.
    fn decode_wave(&mut self) {
        let wave = take_wave(&mut self.queue, self.embedder.limits());
        self.report(wave.len());
        let inputs: Vec<&[Token]> = wave.iter().map(|job| job.tokens.as_slice()).collect();
        let result = self.embedder.embed(&inputs);
        self.stepped();
        match result {
            Ok(outputs) => {
                for (job, vectors) in wave.iter().zip(outputs) {
                    self.answer(job, Ok(vectors));
                }
            }
            // One input may be what failed the decode: try each alone, so the others
            // still get their embeddings.
            Err(_) if wave.len() > 1 => {
                for job in &wave {
                    let result = self.embedder.embed(&[job.tokens.as_slice()]);
                    self.stepped();
                    let result = result.map(|mut outputs| outputs.pop().unwrap_or_default());
                    self.answer(job, result);
                }
            }
            Err(error) => self.answer(&wave[0], Err(error)),
        }
        self.report(0);
    }

    fn answer(&mut self, job: &EmbedJob, result: Result<Embeddings, String>) {
        let reply = match result {
            Ok(mut vectors) => {
                if self.embedder.pooling() != Pooling::None {
                    vectors.iter_mut().for_each(|v| normalize(v, job.normalize));
                }
                ControlReply::Embedded {
                    vectors,
                    n_tokens: u32::try_from(job.tokens.len()).unwrap_or(u32::MAX),
                }
            }
            Err(error) => ControlReply::Refused(RequestError::DecodeFailed(error)),
        };
        (self.sink)(FromWorker::Control {
            call: job.call,
            reply,
        });
    }

    fn stepped(&mut self) {
        self.stats.steps += 1;
        self.stats.decode_calls += 1;
        self.stats.last_step_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }

    /// Pushes the load: `running` inputs in the decode, the rest waiting.
    fn report(&mut self, running: usize) {
        self.stats.running = u32::try_from(running).unwrap_or(u32::MAX);
        self.stats.waiting = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        (self.sink)(FromWorker::Progress(self.stats));
    }
}

/// The jobs of the next decode: from the front of the queue, as many as fit in one batch
/// (at least one: every job fits alone).
fn take_wave(queue: &mut VecDeque<EmbedJob>, limits: EmbedLimits) -> Vec<EmbedJob> {
    let mut wave = Vec::new();
    let mut tokens = 0;
    while let Some(next) = queue.front() {
        let fits = tokens + next.tokens.len() <= limits.n_batch && wave.len() < limits.n_seq_max;
        if !wave.is_empty() && !fits {
            break;
        }
        tokens += next.tokens.len();
        wave.extend(queue.pop_front());
    }
    wave
}

/// llama.cpp's `common_embd_normalize`: -1 leaves the vector as it is, 0 scales its largest
/// magnitude to 32760 (int16 range), 2 to unit Euclidean length, p > 2 (or 1) to unit p-norm.
/// A zero vector stays zero.
pub fn normalize(vector: &mut [f32], mode: i32) {
    let sum: f64 = match mode {
        -1 => 1.0,
        0 => {
            let max = vector
                .iter()
                .map(|x| f64::from(x.abs()))
                .fold(0.0, f64::max);
            max / 32760.0
        }
        2 => vector
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt(),
        p => {
            let p = f64::from(p);
            vector
                .iter()
                .map(|&x| f64::from(x.abs()).powf(p))
                .sum::<f64>()
                .powf(1.0 / p)
        }
    };
    let norm = if sum > 0.0 { (1.0 / sum) as f32 } else { 0.0 };
    vector.iter_mut().for_each(|x| *x *= norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const LIMITS: EmbedLimits = EmbedLimits {
        n_batch: 8,
        n_seq_max: 3,
        n_ctx_per_seq: 6,
        n_embd: 2,
    };

    /// Embeds each input as `[len, first token]`, and records every decode's inputs.
    struct Scripted {
        decodes: Arc<Mutex<Vec<Vec<Vec<Token>>>>>,
        pooling: Pooling,
        /// A decode holding this token fails.
        poison: Option<Token>,
    }

    impl Embedder for Scripted {
        fn limits(&self) -> EmbedLimits {
            LIMITS
        }

        fn pooling(&self) -> Pooling {
            self.pooling
        }

        fn embed(&mut self, inputs: &[&[Token]]) -> Result<Vec<Embeddings>, String> {
            self.decodes
                .lock()
                .unwrap()
                .push(inputs.iter().map(|i| i.to_vec()).collect());
            if inputs
                .iter()
                .any(|i| self.poison.is_some_and(|p| i.contains(&p)))
            {
                return Err("poisoned".into());
            }
            Ok(inputs
                .iter()
                .map(|i| vec![vec![i.len() as f32, i[0] as f32]])
                .collect())
        }
    }

    fn job(call: u64, len: usize) -> EmbedJob {
        EmbedJob {
            call,
            tokens: vec![call as Token; len],
            normalize: -1,
        }
    }

    #[test]
    fn waves_fill_a_batch_by_tokens_and_inputs_in_order() {
        let mut queue: VecDeque<EmbedJob> = [
            job(1, 3),
            job(2, 4),
            job(3, 2),
            job(4, 1),
            job(5, 1),
            job(6, 1),
            job(7, 1),
        ]
        .into_iter()
        .collect();
        let calls = |wave: Vec<EmbedJob>| wave.iter().map(|j| j.call).collect::<Vec<_>>();
        assert_eq!(
            calls(take_wave(&mut queue, LIMITS)),
            [1, 2],
            "3 + 4 + 2 > 8 tokens"
        );
        assert_eq!(
            calls(take_wave(&mut queue, LIMITS)),
            [3, 4, 5],
            "three inputs at most"
        );
        assert_eq!(calls(take_wave(&mut queue, LIMITS)), [6, 7]);
        assert!(take_wave(&mut queue, LIMITS).is_empty());
        let mut alone: VecDeque<EmbedJob> = [job(9, 8), job(10, 1)].into_iter().collect();
        assert_eq!(
            calls(take_wave(&mut alone, LIMITS)),
            [9],
            "a full input goes alone"
        );
    }

    #[test]
    fn inputs_too_long_for_a_decode_or_a_sequence_are_refused_in_llama_servers_words() {
        assert_eq!(LIMITS.check(6), Ok(()));
        let message = |n| match LIMITS.check(n) {
            Err(RequestError::InvalidParam { param, message }) => {
                assert_eq!(param, "input");
                message
            }
            other => panic!("{other:?}"),
        };
        assert!(message(9).starts_with("input (9 tokens) is too large to process"));
        assert!(message(7).contains("a sequence holds at most 6 tokens"));
    }

    #[test]
    fn normalisation_follows_llama_cpp() {
        let norm = |mode, v: &[f32]| {
            let mut v = v.to_vec();
            normalize(&mut v, mode);
            v
        };
        assert_eq!(norm(2, &[3.0, 4.0]), [0.6, 0.8]);
        assert_eq!(norm(-1, &[3.0, 4.0]), [3.0, 4.0]);
        assert_eq!(norm(0, &[1.0, -2.0]), [16380.0, -32760.0]);
        assert_eq!(norm(1, &[1.0, -3.0]), [0.25, -0.75]);
        assert_eq!(norm(2, &[0.0, 0.0]), [0.0, 0.0], "a zero vector stays zero");
    }

    /// Runs the embedder over `jobs` (all queued before it starts) and returns its frames.
    fn run(jobs: Vec<EmbedJob>, pooling: Pooling, poison: Option<Token>) -> Vec<FromWorker> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink_frames = frames.clone();
        let embedder = Scripted {
            decodes: Arc::default(),
            pooling,
            poison,
        };
        let (commands, inbox) = mpsc::channel();
        for job in jobs {
            commands.send(Command::Job(job)).unwrap();
        }
        commands.send(Command::Shutdown { drain: true }).unwrap();
        let sink: FrameSink = Box::new(move |f| sink_frames.lock().unwrap().push(f));
        Thread::new(embedder, sink).run(&inbox);
        let frames = frames.lock().unwrap().clone();
        frames
    }

    fn replies(frames: &[FromWorker]) -> Vec<(u64, ControlReply)> {
        frames
            .iter()
            .filter_map(|f| match f {
                FromWorker::Control { call, reply } => Some((*call, reply.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_job_is_answered_with_its_own_vectors_and_progress_counts_each_decode() {
        let frames = run(vec![job(1, 3), job(2, 2), job(3, 5)], Pooling::Mean, None);
        let replies = replies(&frames);
        assert_eq!(replies.len(), 3);
        for (call, reply) in replies {
            let len = [3, 2, 5][call as usize - 1];
            let norm = ((len * len + call * call) as f32).sqrt();
            assert_eq!(
                reply,
                ControlReply::Embedded {
                    vectors: vec![vec![len as f32, call as f32]],
                    n_tokens: len as u32,
                },
                "normalize -1 leaves it (a 2-norm would be {norm})"
            );
        }
        let last = frames
            .iter()
            .rev()
            .find_map(|f| match f {
                FromWorker::Progress(s) => Some(*s),
                _ => None,
            })
            .unwrap();
        assert_eq!((last.steps, last.running, last.waiting), (2, 0, 0));
    }

    #[test]
    fn a_failed_decode_is_retried_input_by_input_so_only_the_bad_one_fails() {
        let mut bad = job(2, 2);
        bad.tokens[1] = 99;
        let frames = run(vec![job(1, 2), bad, job(3, 2)], Pooling::Last, Some(99));
        let replies = replies(&frames);
        assert_eq!(replies.len(), 3);
        for (call, reply) in replies {
            match (call, reply) {
                (2, ControlReply::Refused(RequestError::DecodeFailed(e))) => {
                    assert_eq!(e, "poisoned")
                }
                (1 | 3, ControlReply::Embedded { n_tokens: 2, .. }) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn pooled_vectors_are_normalised_as_asked_and_token_vectors_never() {
        let mut two_norm = job(3, 4);
        two_norm.normalize = 2;
        let pooled = replies(&run(vec![two_norm.clone()], Pooling::Cls, None));
        assert_eq!(
            pooled[0].1,
            ControlReply::Embedded {
                vectors: vec![vec![0.8, 0.6]],
                n_tokens: 4
            }
        );
        let per_token = replies(&run(vec![two_norm], Pooling::None, None));
        assert_eq!(
            per_token[0].1,
            ControlReply::Embedded {
                vectors: vec![vec![4.0, 3.0]],
                n_tokens: 4
            }
        );
    }
}
