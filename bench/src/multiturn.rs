//! `--multi-turn`: a multi-turn chat workload that measures the workers' prompt cache and the
//! router's prefix-affinity routing (`[server] prefix_affinity`).
//!
//! `--conversations` conversations, each with its own system prompt of about
//! `--system-tokens` tokens (distinct from its first words, so no two conversations share a
//! long prefix), run `--turns` turns each: a short user message, a streamed
//! `/v1/chat/completions` reply of at most `--reply-tokens` tokens (greedy), and the reply as
//! returned appended as the assistant message of the next turn. `--concurrency` client threads
//! each run one conversation at a time, its turns in order, then take the next conversation.
//! A conversation's later turns repeat its whole earlier prompt, so they should find it in the
//! prompt cache of the worker that served the turn before: that is what affinity is for.
//!
//! Rows, each against a fresh server, one after another (`--repeat` alternates rounds and
//! reports each value's median over the rounds):
//!
//! 1. llamapool, 2 pinned one-thread workers (8 slots, 8192 cells each), affinity on;
//! 2. the same with affinity off;
//! 3. with `--llama-server PATH` (or `--vs-llama-server PATH`): that binary with
//!    `-np 8 -c 16384 -kvu -t 2`.
//!
//! Per row: TTFT p50 over all turns, over turn 1 and over turns ≥ 2; prompt tokens and those
//! evaluated (prompt − cached); the cache hit share of turns ≥ 2; wall time; failed requests.
//! Cached tokens come from the final chunk: `timings.cache_n` when present (llama-server and
//! llamapool both send it), else `usage.prompt_tokens_details.cached_tokens`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_bench::metrics::percentile;
use llamapool_common::cpus::CpuList;
use llamapool_testkit::Router;
use serde::Serialize;
use serde_json::{json, Value};

use crate::llama_server::{LlamaServer, Shape};
use crate::stages::open_stream;
use crate::{procs, Args};

/// The model name sent in requests (the router's alias; llama-server ignores it).
pub(crate) const ALIAS: &str = "bench";

/// Workers of the llamapool rows: affinity needs more than one to choose from.
const WORKERS: usize = 2;

/// llama-server's row: 8 slots of 2048 cells in one unified KV buffer, 2 threads.
const LLAMA_SERVER_SHAPE: Shape = Shape {
    threads: 2,
    passive: false,
    slots: 8,
    cells_per_slot: 2048,
};

/// The workload's shape, from the command line.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub model: PathBuf,
    pub conversations: usize,
    pub turns: usize,
    pub system_tokens: usize,
    pub reply_tokens: u32,
    pub concurrency: usize,
    pub repeat: usize,
}

/// One of the rows: what serves the conversations.
#[derive(Debug, Clone)]
enum Row {
    Llamapool { affinity: bool },
    LlamaServer(PathBuf),
}

impl Row {
    fn label(&self) -> String {
        match self {
            Row::Llamapool { affinity } => format!(
                "llamapool, affinity {}",
                if *affinity { "on" } else { "off" }
            ),
            Row::LlamaServer(_) => "llama-server".to_string(),
        }
    }
}

/// What one chat request saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnRecord {
    pub conversation: usize,
    /// 1-based.
    pub turn: usize,
    pub ok: bool,
    pub ttft_ms: f64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// What the client saw, on the turn that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One row's result: of one round, or the medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct RowReport {
    pub row: String,
    pub requests: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p50_turn1_ms: f64,
    /// The turns that should hit the prompt cache.
    pub ttft_p50_later_turns_ms: f64,
    pub prompt_tokens: u64,
    /// Prompt tokens not found in the cache: prompt − cached.
    pub evaluated_tokens: u64,
    /// Cached / prompt tokens over turns ≥ 2.
    pub cache_hit_share_later_turns: f64,
    pub wall_s: f64,
    /// Failed requests; a failure ends its conversation, so its later turns count too.
    pub failed: usize,
    /// Every request of a round, by conversation and turn (empty in the medians).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<TurnRecord>,
}

/// Runs the rows `--repeat` times, prints the report and writes `multi-turn.json`.
pub fn run(args: &Args) -> Result<()> {
    let workload = workload(args)?;
    let mut rows = vec![
        Row::Llamapool { affinity: true },
        Row::Llamapool { affinity: false },
    ];
    if let Some(path) = llama_server_path(args) {
        rows.push(Row::LlamaServer(path));
    }
    std::fs::create_dir_all(&args.out_dir)?;
    let mut rounds: Vec<RowReport> = Vec::new();
    for round in 1..=workload.repeat {
        for row in &rows {
            eprintln!(
                "{}: {} conversations × {} turns at concurrency {}, round {round}",
                row.label(),
                workload.conversations,
                workload.turns,
                workload.concurrency
            );
            let report =
                measure_row(row, &workload).with_context(|| format!("{} failed", row.label()))?;
            rounds.push(report);
        }
    }
    let medians: Vec<RowReport> = rows
        .iter()
        .map(|row| median_report(&row.label(), &rounds))
        .collect();
    let report = json!({"workload": workload, "rows": medians, "rounds": rounds});
    write_report(args, "multi-turn.json", &report, || table(&medians))
}

/// Writes `report` to `--out-dir`/`file`, then prints it (`--json`) or the `summary`.
pub(crate) fn write_report(
    args: &Args,
    file: &str,
    report: &Value,
    summary: impl FnOnce() -> String,
) -> Result<()> {
    let path = args.out_dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    eprintln!("wrote {}", path.display());
    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", summary());
    }
    Ok(())
}

pub(crate) fn workload(args: &Args) -> Result<Workload> {
    let model = args.chat_model_path()?;
    if args.conversations == 0
        || args.turns == 0
        || args.reply_tokens == 0
        || args.concurrency == 0
        || args.repeat == 0
    {
        bail!("--conversations, --turns, --reply-tokens, --concurrency and --repeat must be at least 1");
    }
    Ok(Workload {
        model,
        conversations: args.conversations,
        turns: args.turns,
        system_tokens: args.system_tokens,
        reply_tokens: args.reply_tokens,
        concurrency: args.concurrency,
        repeat: args.repeat,
    })
}

/// `--llama-server`, or the versus mode's `--vs-llama-server` when that one is given.
fn llama_server_path(args: &Args) -> Option<PathBuf> {
    args.llama_server
        .clone()
        .or_else(|| args.vs_llama_server.clone())
}

/// Starts the row's server, runs every conversation against it, and summarizes.
fn measure_row(row: &Row, workload: &Workload) -> Result<RowReport> {
    let (addr, _server) = start_server(row, workload)?;
    let (records, wall) = run_conversations(&addr, workload, 0);
    Ok(summarize(&row.label(), &records, wall))
}

/// Keeps a row's server alive until dropped.
enum Server {
    #[allow(dead_code)]
    Router(Router),
    #[allow(dead_code)]
    LlamaServer(LlamaServer),
}

fn start_server(row: &Row, workload: &Workload) -> Result<(String, Server)> {
    match row {
        Row::Llamapool { affinity } => {
            let router = procs::start_router(&router_config(&workload.model, *affinity)?)?;
            Ok((router.addr.clone(), Server::Router(router)))
        }
        Row::LlamaServer(bin) => {
            let server = LlamaServer::start(bin, &workload.model, LLAMA_SERVER_SHAPE)?;
            Ok((server.addr.clone(), Server::LlamaServer(server)))
        }
    }
}

/// Two explicit pinned one-thread workers on the first allowed CPUs, 8 slots and 8192 cells
/// each (`configs/default.toml`'s shape), with `prefix_affinity` as given.
fn router_config(model: &Path, affinity: bool) -> Result<String> {
    let allowed = CpuList::allowed();
    if allowed.len() < WORKERS {
        bail!(
            "--multi-turn needs {WORKERS} CPUs for its {WORKERS} pinned workers; {} allowed",
            allowed.len()
        );
    }
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_queued = 4096\nprefix_affinity = {affinity}\n\
         [model]\npath = {path}\nalias = \"{ALIAS}\"\n\
         [worker_defaults]\nslots = 8\ncontext = 8192\n",
        path = json!(model),
    );
    for cpu in &allowed.cpus()[..WORKERS] {
        config.push_str(&format!("[[workers]]\ncpus = \"{cpu}\"\nthreads = 1\n"));
    }
    Ok(config)
}

/// `concurrency` client threads, each running whole conversations until none is left:
/// conversations `first..first + conversations` (each number its own system prompt).
pub(crate) fn run_conversations(
    addr: &str,
    workload: &Workload,
    first: usize,
) -> (Vec<TurnRecord>, Duration) {
    let next = AtomicUsize::new(first);
    let end = first + workload.conversations;
    let records = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workload.concurrency {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let done = conversation(addr, workload, i);
                records.lock().expect("no client panicked").extend(done);
            });
        }
    });
    let wall = start.elapsed();
    (records.into_inner().expect("no client panicked"), wall)
}

/// Runs conversation `i` turn by turn. A failed turn ends it: the later turns are recorded
/// as failed too, since without the reply there is no next prompt.
pub(crate) fn conversation(addr: &str, workload: &Workload, i: usize) -> Vec<TurnRecord> {
    let mut messages =
        vec![json!({"role": "system", "content": system_prompt(i, workload.system_tokens)})];
    let mut records = Vec::with_capacity(workload.turns);
    for turn in 1..=workload.turns {
        messages.push(json!({"role": "user", "content": user_message(i, turn)}));
        match chat_turn(addr, &messages, workload.reply_tokens) {
            Ok((mut record, reply)) => {
                record.conversation = i;
                record.turn = turn;
                records.push(record);
                messages.push(json!({"role": "assistant", "content": reply}));
            }
            Err(e) => {
                eprintln!("conversation {i}, turn {turn} failed: {e:#}");
                records.push(TurnRecord {
                    conversation: i,
                    turn,
                    error: Some(format!("{e:#}")),
                    ..TurnRecord::default()
                });
                records.extend((turn + 1..=workload.turns).map(|turn| TurnRecord {
                    conversation: i,
                    turn,
                    ..TurnRecord::default()
                }));
                break;
            }
        }
    }
    records
}

const SUBJECTS: &[&str] = &[
    "The old harbour",
    "A quiet library",
    "The northern railway",
    "Every spring market",
    "The mountain observatory",
    "A small bakery",
    "The river ferry",
    "The city archive",
    "An abandoned mill",
    "The village school",
    "A coastal lighthouse",
    "The night garden",
];
const VERBS: &[&str] = &[
    "keeps",
    "remembers",
    "welcomes",
    "collects",
    "protects",
    "describes",
    "opens onto",
    "depends on",
    "was built beside",
    "still echoes with",
];
const OBJECTS: &[&str] = &[
    "stories of travelling merchants",
    "maps drawn by forgotten sailors",
    "the smell of fresh bread and rain",
    "letters that were never delivered",
    "careful notes about the weather",
    "the laughter of visiting children",
    "copper instruments polished every week",
    "songs from distant provinces",
    "boxes of seeds for the next season",
    "ledgers of every ship that passed",
];
const CODAS: &[&str] = &[
    "long after sunset",
    "in every season",
    "for anyone who asks politely",
    "despite the frequent storms",
    "according to the local records",
    "without exception",
    "since the founding of the town",
    "when the tide is low",
];

/// Conversation `i`'s system prompt: distinct from its first words, then deterministic filler
/// sentences chosen by a generator seeded with `i`, about `tokens` tokens long.
fn system_prompt(i: usize, tokens: usize) -> String {
    let mut text = format!(
        "You are assistant number {i}, a patient guide for conversation {i}. \
         Background you know well:"
    );
    let mut state = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut pick = |n: usize| {
        // xorshift64: deterministic, different for every conversation.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    while estimated_tokens(&text) < tokens {
        let _ = write!(
            text,
            " {} {} {} {}.",
            SUBJECTS[pick(SUBJECTS.len())],
            VERBS[pick(VERBS.len())],
            OBJECTS[pick(OBJECTS.len())],
            CODAS[pick(CODAS.len())]
        );
    }
    text
}

/// A rough token count of the filler text: SmolLM2's tokenizer makes about 1.17 tokens of
/// a word of it (measured: the reported prompt tokens of turn 1, less the template and the
/// user message).
fn estimated_tokens(text: &str) -> usize {
    text.split_whitespace().count() * 117 / 100
}

const TOPICS: &[&str] = &[
    "the history of lighthouses",
    "how bread rises",
    "why rivers meander",
    "the first railways",
    "how maps are drawn",
    "the life of bees",
    "how tides work",
    "old sailing ships",
];

/// The user message of `turn` in conversation `i` (~15 tokens).
fn user_message(i: usize, turn: usize) -> String {
    let topic = TOPICS[(i * 3 + turn) % TOPICS.len()];
    format!("Turn {turn}: tell me about {topic}, in two short sentences.")
}

/// One streamed chat completion: its record (without the turn) and the reply text.
pub(crate) fn chat_turn(
    addr: &str,
    messages: &[Value],
    max_tokens: u32,
) -> Result<(TurnRecord, String)> {
    let body = json!({
        "model": ALIAS,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut sse = open_stream(addr, "/v1/chat/completions", &body)?;
    let mut stream = StreamState::default();
    while let Some(data) = sse.next_data() {
        if data == "[DONE]" {
            return stream.finish(start.elapsed());
        }
        let chunk: Value = serde_json::from_str(&data)?;
        stream.on_chunk(&chunk, start.elapsed())?;
    }
    bail!("the stream ended without [DONE]")
}

/// What a chat stream has shown so far.
#[derive(Debug, Default)]
struct StreamState {
    ttft: Option<Duration>,
    reply: String,
    /// `usage.prompt_tokens`.
    prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`.
    usage_cached: Option<u64>,
    /// `timings.prompt_n` (evaluated) and `timings.cache_n`.
    timings: Option<(u64, u64)>,
}

impl StreamState {
    fn on_chunk(&mut self, chunk: &Value, elapsed: Duration) -> Result<()> {
        if let Some(error) = chunk.get("error") {
            bail!("error event: {error}");
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            if !text.is_empty() && self.ttft.is_none() {
                self.ttft = Some(elapsed);
            }
            self.reply.push_str(text);
        }
        let usage = &chunk["usage"];
        self.prompt_tokens = usage["prompt_tokens"].as_u64().or(self.prompt_tokens);
        self.usage_cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .or(self.usage_cached);
        let timings = &chunk["timings"];
        if let (Some(n), Some(c)) = (timings["prompt_n"].as_u64(), timings["cache_n"].as_u64()) {
            self.timings = Some((n, c));
        }
        Ok(())
    }

    /// The record at `[DONE]`: cached tokens from `timings.cache_n` when the server sent
    /// timings, else from the usage; without any content chunk, TTFT is the whole request.
    fn finish(self, elapsed: Duration) -> Result<(TurnRecord, String)> {
        let prompt_tokens = self
            .prompt_tokens
            .or(self.timings.map(|(n, c)| n + c))
            .context("no prompt token count in the stream")?;
        let cached_tokens = self
            .timings
            .map(|(_, c)| c)
            .or(self.usage_cached)
            .unwrap_or(0);
        let record = TurnRecord {
            ok: true,
            ttft_ms: ms(self.ttft.unwrap_or(elapsed)),
            prompt_tokens,
            cached_tokens,
            ..TurnRecord::default()
        };
        Ok((record, self.reply))
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// TTFT p50 in ms of the successful records `keep` selects.
pub(crate) fn ttft_p50(records: &[TurnRecord], keep: impl Fn(&TurnRecord) -> bool) -> f64 {
    let mut ttft: Vec<f64> = records
        .iter()
        .filter(|r| r.ok && keep(r))
        .map(|r| r.ttft_ms)
        .collect();
    percentile(&mut ttft, 50.0)
}

pub(crate) fn summarize(row: &str, records: &[TurnRecord], wall: Duration) -> RowReport {
    let ok: Vec<&TurnRecord> = records.iter().filter(|r| r.ok).collect();
    let prompt: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let cached: u64 = ok
        .iter()
        .map(|r| r.cached_tokens.min(r.prompt_tokens))
        .sum();
    let later = ok.iter().filter(|r| r.turn >= 2);
    let (later_prompt, later_cached) = later.fold((0u64, 0u64), |(p, c), r| {
        (
            p + r.prompt_tokens,
            c + r.cached_tokens.min(r.prompt_tokens),
        )
    });
    RowReport {
        row: row.to_string(),
        requests: records.len(),
        ttft_p50_ms: ttft_p50(records, |_| true),
        ttft_p50_turn1_ms: ttft_p50(records, |r| r.turn == 1),
        ttft_p50_later_turns_ms: ttft_p50(records, |r| r.turn >= 2),
        prompt_tokens: prompt,
        evaluated_tokens: prompt - cached,
        cache_hit_share_later_turns: if later_prompt == 0 {
            f64::NAN
        } else {
            later_cached as f64 / later_prompt as f64
        },
        wall_s: wall.as_secs_f64(),
        failed: records.len() - ok.len(),
        records: sorted(records),
    }
}

/// `records` by conversation and turn (they arrive in completion order).
fn sorted(records: &[TurnRecord]) -> Vec<TurnRecord> {
    let mut records = records.to_vec();
    records.sort_by_key(|r| (r.conversation, r.turn));
    records
}

/// The median of each value over `row`'s rounds (failures summed).
fn median_report(row: &str, rounds: &[RowReport]) -> RowReport {
    let runs: Vec<&RowReport> = rounds.iter().filter(|r| r.row == row).collect();
    let median = |f: &dyn Fn(&RowReport) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(|r| f(r)).collect();
        percentile(&mut values, 50.0)
    };
    RowReport {
        row: row.to_string(),
        requests: median(&|r| r.requests as f64) as usize,
        ttft_p50_ms: median(&|r| r.ttft_p50_ms),
        ttft_p50_turn1_ms: median(&|r| r.ttft_p50_turn1_ms),
        ttft_p50_later_turns_ms: median(&|r| r.ttft_p50_later_turns_ms),
        prompt_tokens: median(&|r| r.prompt_tokens as f64) as u64,
        evaluated_tokens: median(&|r| r.evaluated_tokens as f64) as u64,
        cache_hit_share_later_turns: median(&|r| r.cache_hit_share_later_turns),
        wall_s: median(&|r| r.wall_s),
        failed: runs.iter().map(|r| r.failed).sum(),
        records: Vec::new(),
    }
}

pub(crate) fn table(rows: &[RowReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| row | requests | TTFT p50 ms | TTFT p50 turn 1 ms | TTFT p50 turns ≥2 ms | prompt tokens | evaluated tokens | cache hit turns ≥2 | wall s | failed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1}% | {:.1} | {} |",
            r.row,
            r.requests,
            r.ttft_p50_ms,
            r.ttft_p50_turn1_ms,
            r.ttft_p50_later_turns_ms,
            r.prompt_tokens,
            r.evaluated_tokens,
            r.cache_hit_share_later_turns * 100.0,
            r.wall_s,
            r.failed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_prompts_are_distinct_and_long_enough() {
        let a = system_prompt(0, 500);
        let b = system_prompt(1, 500);
        assert!(estimated_tokens(&a) >= 500);
        assert_ne!(a, b);
        assert_eq!(a, system_prompt(0, 500), "deterministic");
        let shared = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        assert!(shared < 40, "no long shared prefix: {shared} chars");
    }

    #[test]
    fn cached_tokens_prefer_timings() {
        let mut s = StreamState::default();
        let chunk = json!({
            "choices": [],
            "usage": {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 10}},
            "timings": {"prompt_n": 40, "cache_n": 60},
        });
        s.on_chunk(&chunk, Duration::from_millis(5)).unwrap();
        let (r, _) = s.finish(Duration::from_millis(9)).unwrap();
        assert_eq!((r.prompt_tokens, r.cached_tokens), (100, 60));
        assert!((r.ttft_ms - 9.0).abs() < 1e-9);
    }
}
