//! `/metrics`: the router's Prometheus metrics, kept and encoded by the `prometheus-client`
//! crate (the Prometheus project's Rust client) in the Prometheus text format 0.0.4.
//!
//! Two kinds of values:
//!
//! - **Live** ones, in [`Metrics`]: counters and histograms written as things happen, by the
//!   HTTP layer (every response, through `http::info::record_response`), by each generation's
//!   [`RequestTimer`] (`http::choices`), by connection tasks when a request finishes, by the
//!   pool when it moves a request, by the supervisors when they kill a hung worker, and by an
//!   abort guard when a client goes away.
//! - **Scrape-time** ones, in [`Gauges`]: a snapshot of the pool taken when `/metrics` is read
//!   (load, per-worker state and the load each worker last pushed), encoded from a registry
//!   built for that one scrape.
//!
//! llama-server's `llamacpp:*` names are kept for existing dashboards (pool totals), and
//! vLLM's `vllm:*` load gauges are written for gateways ([`model_server`]); everything else is
//! named `llamapool_*`, with the unit in the name. docs/API.md lists them all.

pub mod model_server;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llamapool_common::{Finish, SeqOutput};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds, in seconds, of every latency histogram: roughly ×2.5 steps from 1 ms (a GPU's
/// time per token) to 60 s (a long CPU generation).
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
];

/// The `endpoint` label for a request that matched no route (the raw path is never a label).
pub const UNMATCHED: &str = "unmatched";

type SecondsCounter = Counter<f64, AtomicU64>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    endpoint: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: usize,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabels {
    worker: usize,
    state: &'static str,
}

/// The live metrics, shared by everything that records (cheap handles around atomics).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    prompt_tokens: Counter,
    /// llama-server's split: prompt tokens decoded, and those reused from a prompt cache.
    prompt_tokens_processed: Counter,
    prompt_tokens_cached: Counter,
    prompt_seconds: SecondsCounter,
    generated_tokens: Counter,
    generated_seconds: SecondsCounter,
    finished: Counter,
    http_responses: Family<HttpLabels, Counter>,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    inter_token_latency: Histogram,
    queue_time: Histogram,
    request_duration: Histogram,
    moved: Counter,
    resumed: Counter,
    cancelled: Counter,
    hung_kills: Family<WorkerLabel, Counter>,
    poison_convictions: Counter,
    poison_refusals: Counter,
    routed: Family<OutcomeLabel, Counter>,
    rebalanced: Family<ReasonLabel, Counter>,
    /// llama-server's `n_tokens_max`: the longest prompt + generation finished so far.
    longest_sequence: AtomicU64,
    /// With several models: the model these metrics are about, a `model` label on every series.
    model: Option<String>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::labelled(None)
    }
}

impl Metrics {
    /// One model's metrics in a router that serves several: every series carries
    /// `model="ALIAS"`.
    pub fn for_model(alias: &str) -> Self {
        Self::labelled(Some(alias))
    }

    fn labelled(model: Option<&str>) -> Self {
        let registry = match model {
            Some(alias) => Registry::with_labels(
                [(Cow::Borrowed("model"), Cow::Owned(alias.to_string()))].into_iter(),
            ),
            None => Registry::default(),
        };
        let m = Self {
            registry,
            prompt_tokens: Counter::default(),
            prompt_tokens_processed: Counter::default(),
            prompt_tokens_cached: Counter::default(),
            prompt_seconds: SecondsCounter::default(),
            generated_tokens: Counter::default(),
            generated_seconds: SecondsCounter::default(),
            finished: Counter::default(),
            http_responses: Family::default(),
            time_to_first_token: latency_histogram(),
            time_per_output_token: latency_histogram(),
            inter_token_latency: latency_histogram(),
            queue_time: latency_histogram(),
            request_duration: latency_histogram(),
            moved: Counter::default(),
            resumed: Counter::default(),
            cancelled: Counter::default(),
            hung_kills: Family::default(),
            poison_convictions: Counter::default(),
            poison_refusals: Counter::default(),
            routed: Family::default(),
            rebalanced: Family::default(),
            longest_sequence: AtomicU64::new(0),
            model: model.map(str::to_string),
        };
        m.registered()
    }

    /// Registers every live metric (the registry holds clones of the same handles).
    /// Help texts get their final full stop from the crate.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        // llama-server's names (counters get `_total` from the crate).
        r.register(
            "llamacpp:prompt_tokens",
            "Number of prompt tokens processed",
            self.prompt_tokens_processed.clone(),
        );
        r.register(
            "llamacpp:prompt_tokens_cached",
            "Number of prompt tokens reused from the prompt cache",
            self.prompt_tokens_cached.clone(),
        );
        r.register(
            "llamacpp:prompt_seconds",
            "Prompt process time",
            self.prompt_seconds.clone(),
        );
        r.register(
            "llamacpp:tokens_predicted",
            "Number of generation tokens processed",
            self.generated_tokens.clone(),
        );
        r.register(
            "llamacpp:tokens_predicted_seconds",
            "Predict process time",
            self.generated_seconds.clone(),
        );
        r.register(
            "llamacpp:requests",
            "Number of finished requests",
            self.finished.clone(),
        );
        // llamapool's own.
        r.register(
            "llamapool_http_requests",
            "HTTP responses by matched route and status",
            self.http_responses.clone(),
        );
        r.register(
            "llamapool_prompt_tokens",
            "Prompt tokens of finished generations",
            self.prompt_tokens.clone(),
        );
        r.register(
            "llamapool_generation_tokens",
            "Generated tokens of finished generations",
            self.generated_tokens.clone(),
        );
        r.register_with_unit(
            "llamapool_time_to_first_token",
            "Time from the router taking a generation request to its first token",
            Unit::Seconds,
            self.time_to_first_token.clone(),
        );
        r.register_with_unit(
            "llamapool_time_per_output_token",
            "Per finished generation: time from its first to its last token over the tokens after the first",
            Unit::Seconds,
            self.time_per_output_token.clone(),
        );
        r.register_with_unit(
            "llamapool_inter_token_latency",
            "Time between two consecutive outputs of a generation, per token",
            Unit::Seconds,
            self.inter_token_latency.clone(),
        );
        r.register_with_unit(
            "llamapool_queue_time",
            "Time a finished generation waited in its worker's queue for a sequence (timings.queue_ms)",
            Unit::Seconds,
            self.queue_time.clone(),
        );
        r.register_with_unit(
            "llamapool_request_duration",
            "Time from the router taking a generation request to its last token, for finished generations",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register(
            "llamapool_requests_moved",
            "Requests moved off a worker that died or hung to another worker",
            self.moved.clone(),
        );
        r.register(
            "llamapool_requests_resumed",
            "Moved requests that had generated tokens already and continued mid-generation",
            self.resumed.clone(),
        );
        r.register(
            "llamapool_client_cancellations",
            "Generations aborted because their client went away or stopped reading",
            self.cancelled.clone(),
        );
        r.register(
            "llamapool_worker_hung_kills",
            "Times the hang watchdog killed the worker",
            self.hung_kills.clone(),
        );
        r.register(
            "llamapool_poison_requests",
            "Requests ended because the poison policy blamed them for workers' deaths",
            self.poison_convictions.clone(),
        );
        r.register(
            "llamapool_poison_refusals",
            "Requests refused because an identical request killed workers recently",
            self.poison_refusals.clone(),
        );
        r.register(
            "llamapool_routed",
            "Requests dispatched (moved ones again), by how their worker was chosen: packed (the \
             first adaptive worker no foreign work crowds, with a free slot), affinity (the worker most \
             likely caching the prompt's prefix), no_prefix (no worker held one: least loaded), \
             overloaded (the holders were too busy: least loaded), least_loaded (affinity off, \
             or a prompt shorter than one block)",
            self.routed.clone(),
        );
        for reason in ["pack", "split"] {
            drop(self.rebalanced.get_or_create(&ReasonLabel { reason }));
        }
        r.register(
            "llamapool_requests_rebalanced",
            "Running requests moved between live adaptive workers: pack (the machine is quiet \
             again, onto the first worker so it can run wide), split (a neighbour crowds the \
             CPUs, shared over the narrow workers)",
            self.rebalanced.clone(),
        );
        self
    }

    /// A generation finished on a worker (usage already adjusted for resumed tokens).
    pub fn record_finish(&self, finish: &Finish) {
        self.finished.inc();
        let usage = &finish.usage;
        self.prompt_tokens.inc_by(u64::from(usage.prompt_tokens));
        self.prompt_tokens_processed.inc_by(u64::from(
            usage.prompt_tokens.saturating_sub(usage.cached_tokens),
        ));
        self.prompt_tokens_cached
            .inc_by(u64::from(usage.cached_tokens));
        self.generated_tokens
            .inc_by(u64::from(finish.usage.completion_tokens));
        self.prompt_seconds.inc_by(finish.timings.prompt_ms / 1e3);
        self.generated_seconds
            .inc_by(finish.timings.predicted_ms / 1e3);
        self.queue_time.observe(finish.timings.queue_ms / 1e3);
        let length = u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens);
        self.longest_sequence.fetch_max(length, Ordering::Relaxed);
    }

    /// An embedding or ranking input was computed: its tokens count as prompt tokens (as in
    /// llama-server), evaluated in full (nothing of it is cached).
    pub fn record_embedded(&self, n_tokens: u32) {
        self.prompt_tokens.inc_by(u64::from(n_tokens));
        self.prompt_tokens_processed.inc_by(u64::from(n_tokens));
    }

    /// One HTTP response: `endpoint` is the matched route ([`UNMATCHED`] for none).
    pub fn record_response(&self, endpoint: &str, status: u16) {
        self.http_responses
            .get_or_create(&HttpLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    /// A request was moved off a failed worker; `resumed` when it had generated tokens.
    pub fn record_move(&self, resumed: bool) {
        self.moved.inc();
        if resumed {
            self.resumed.inc();
        }
    }

    /// A generation was aborted because its client left.
    pub fn record_cancellation(&self) {
        self.cancelled.inc();
    }

    /// The watchdog killed worker `worker` as hung.
    pub fn record_hung_kill(&self, worker: usize) {
        self.hung_kills.get_or_create(&WorkerLabel { worker }).inc();
    }

    /// The poison policy ended a request that was in flight at workers' deaths.
    pub fn record_poison_conviction(&self) {
        self.poison_convictions.inc();
    }

    /// A request identical to a convicted one was refused.
    pub fn record_poison_refusal(&self) {
        self.poison_refusals.inc();
    }

    /// A request (or a moved one) was dispatched; `outcome` says how its worker was chosen.
    pub fn record_routing(&self, outcome: &'static str) {
        self.routed.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A running request moved between live workers, for `reason` (`pack` or `split`).
    pub fn record_rebalance(&self, reason: &'static str) {
        self.rebalanced.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Only the HTTP response counts (`llamapool_http_requests`): the router's own series when
    /// it serves several models, whose other series are each model's.
    pub fn render_http(&self) -> String {
        let mut registry = Registry::default();
        registry.register(
            "llamapool_http_requests",
            "HTTP responses by matched route and status",
            self.http_responses.clone(),
        );
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry).expect("writing to a String does not fail");
        out
    }

    /// The whole exposition: the live metrics, then the snapshot's.
    pub fn render(&self, gauges: &Gauges) -> String {
        // Every worker has a hung-kill series, at 0 until it is killed.
        for worker in 0..gauges.workers.len() {
            drop(self.hung_kills.get_or_create(&WorkerLabel { worker }));
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)
            .and_then(|()| {
                prometheus_text::encode(&mut out, &gauges.registry(self.model.as_deref()))
            })
            .expect("writing to a String does not fail");
        self.write_llama_server_extras(&mut out, gauges);
        out
    }

    /// The rest of llama-server's `llamacpp:` names, written as llama-server writes them: a
    /// counter without the `_total` suffix the crate would add (`n_tokens_max`), the
    /// speculative-decoding counters (always 0: this server does not draft), and averages
    /// since start-up. `n_busy_slots_per_decode` is estimated from the pool's totals: tokens
    /// generated per `llama_decode()` call.
    fn write_llama_server_extras(&self, out: &mut String, gauges: &Gauges) {
        let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
        let generated = self.generated_tokens.get() as f64;
        let items: [(&str, &str, &str, f64); 7] = [
            (
                "n_tokens_max",
                "counter",
                "Largest observed sequence length (prompt + generation)",
                self.longest_sequence.load(Ordering::Relaxed) as f64,
            ),
            (
                "spec_decode_num_draft_tokens_total",
                "counter",
                "Speculative: Total draft tokens generated (no speculative decoding here: 0)",
                0.0,
            ),
            (
                "spec_decode_num_accepted_tokens_total",
                "counter",
                "Speculative: Total draft tokens accepted by the target model (no speculative decoding here: 0)",
                0.0,
            ),
            (
                "spec_decode_num_drafts_total",
                "counter",
                "Speculative: Total speculative decoding verification steps (no speculative decoding here: 0)",
                0.0,
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s",
                ratio(
                    self.prompt_tokens_processed.get() as f64,
                    self.prompt_seconds.get(),
                ),
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s",
                ratio(generated, self.generated_seconds.get()),
            ),
            (
                "n_busy_slots_per_decode",
                "gauge",
                "Average number of busy slots per llama_decode() call (tokens generated per call)",
                ratio(generated, gauges.decode_calls as f64),
            ),
        ];
        let labels = self
            .model
            .as_ref()
            .map(|m| format!("{{model=\"{}\"}}", escape_label(m)))
            .unwrap_or_default();
        for (name, kind, help, value) in items {
            let _ = write!(
                out,
                "# HELP llamacpp:{name} {help}.\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name}{labels} {value}\n"
            );
        }
    }
}

/// A label value as the text format writes it: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Several expositions as one: each metric family once, with its `# HELP` and `# TYPE` lines
/// from its first appearance and the series of every text under them (a family's series must
/// be together, and its help written once). Families keep the order they first appear in.
pub fn merge_expositions(texts: &[String]) -> String {
    let mut families: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut current: Option<usize> = None;
    for text in texts {
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = name_of(rest).to_string();
                let at = match families.iter().position(|(n, _, _)| *n == name) {
                    Some(at) => at,
                    None => {
                        families.push((name, String::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                // `# HELP name` or `# TYPE name`: written once per family.
                let kind = &line[..7];
                let seen = families[at].1.lines().any(|l| {
                    l.starts_with(kind) && l[7..].split(' ').next() == Some(name_of(rest))
                });
                if !seen {
                    families[at].1.push_str(line);
                    families[at].1.push('\n');
                }
                current = Some(at);
                continue;
            }
            match current {
                Some(at) => families[at].2.push(line.to_string()),
                None => families.push((String::new(), String::new(), vec![line.to_string()])),
            }
        }
    }
    let mut out = String::new();
    for (_, head, series) in families {
        out.push_str(&head);
        for line in series {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn name_of(help_or_type: &str) -> &str {
    help_or_type.split(' ').next().unwrap_or("")
}

/// The pool at the moment of a scrape.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests dispatched and not finished, all workers.
    pub processing: usize,
    /// Of those, how many exceed the pool's total slots.
    pub deferred: usize,
    /// `decode` calls, summed over the workers' last pushed stats.
    pub decode_calls: u64,
    pub ready_workers: usize,
    /// Every state a worker can be in: `llamapool_worker_state` has a series for each.
    pub states: Vec<&'static str>,
    /// By worker index.
    pub workers: Vec<WorkerGauges>,
}

/// One worker at the moment of a scrape. Load fields are 0 unless the worker is ready.
#[derive(Debug, Clone, Default)]
pub struct WorkerGauges {
    /// One of [`Gauges::states`].
    pub state: &'static str,
    /// Configured sequence slots.
    pub slots: u32,
    /// Requests holding a sequence (slots in use), as last pushed.
    pub running: u32,
    /// Requests queued in the worker for a sequence, as last pushed.
    pub waiting: u32,
    /// KV cells held by its running sequences, as last pushed.
    pub kv_cells_used: u32,
    /// KV cells of its context (slots × per-sequence context).
    pub kv_cells: u64,
    /// Requests the router dispatched to it and that have not finished.
    pub in_flight: usize,
    /// Times it was started again after its first start.
    pub restarts: u32,
    /// An adaptive worker running wide now.
    pub wide: bool,
    /// Threads its decode runs with now.
    pub threads_in_use: u32,
    /// Switches between wide and narrow since the router started.
    pub shape_changes: u64,
}

fn counter_at(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

fn gauge_at(value: impl TryInto<i64>) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value.try_into().unwrap_or(i64::MAX));
    gauge
}

/// How one per-worker gauge reads its value.
type PerWorker = fn(&WorkerGauges) -> i64;

impl Gauges {
    /// A registry for this one scrape (its series labelled with `model` when given).
    fn registry(&self, model: Option<&str>) -> Registry {
        let mut r = match model {
            Some(alias) => Registry::with_labels(
                [(Cow::Borrowed("model"), Cow::Owned(alias.to_string()))].into_iter(),
            ),
            None => Registry::default(),
        };
        r.register(
            "llamacpp:n_decode",
            "Total number of llama_decode() calls",
            counter_at(self.decode_calls),
        );
        r.register(
            "llamacpp:requests_processing",
            "Number of requests processing",
            gauge_at(self.processing),
        );
        r.register(
            "llamacpp:requests_deferred",
            "Number of requests deferred",
            gauge_at(self.deferred),
        );
        r.register(
            "llamacpp:workers_ready",
            "Number of ready workers",
            gauge_at(self.ready_workers),
        );
        let state = Family::<WorkerStateLabels, Gauge>::default();
        let restarts = Family::<WorkerLabel, Counter>::default();
        let shape_changes = Family::<WorkerLabel, Counter>::default();
        let per_worker: [(&str, &str, PerWorker); 8] = [
            (
                "llamapool_worker_slots",
                "Sequence slots of the worker",
                |w| w.slots.into(),
            ),
            (
                "llamapool_worker_running_requests",
                "Requests holding a sequence on the worker (slots in use)",
                |w| w.running.into(),
            ),
            (
                "llamapool_worker_waiting_requests",
                "Requests queued on the worker for a free sequence",
                |w| w.waiting.into(),
            ),
            (
                "llamapool_worker_in_flight_requests",
                "Requests the router dispatched to the worker and that have not finished",
                |w| i64::try_from(w.in_flight).unwrap_or(i64::MAX),
            ),
            (
                "llamapool_worker_kv_cells_used",
                "KV cache cells held by the worker's running sequences",
                |w| w.kv_cells_used.into(),
            ),
            (
                "llamapool_worker_kv_cells",
                "KV cache cells of the worker's context (slots times per-sequence context)",
                |w| i64::try_from(w.kv_cells).unwrap_or(i64::MAX),
            ),
            (
                "llamapool_worker_wide",
                "1 while an adaptive worker runs wide (its threads over all its wide CPUs), else 0",
                |w| w.wide.into(),
            ),
            (
                "llamapool_worker_threads",
                "Threads the worker's decode runs with now (0 while it is not ready)",
                |w| w.threads_in_use.into(),
            ),
        ];
        for (id, w) in self.workers.iter().enumerate() {
            for &name in &self.states {
                let value = i64::from(name == w.state);
                state
                    .get_or_create(&WorkerStateLabels {
                        worker: id,
                        state: name,
                    })
                    .set(value);
            }
            restarts
                .get_or_create(&WorkerLabel { worker: id })
                .inc_by(u64::from(w.restarts));
            shape_changes
                .get_or_create(&WorkerLabel { worker: id })
                .inc_by(w.shape_changes);
        }
        r.register(
            "llamapool_worker_state",
            "1 for the worker's current state, 0 for the others",
            state,
        );
        r.register(
            "llamapool_worker_restarts",
            "Times the worker was started again (after a death, a hang, a failed start or an operator's restart)",
            restarts,
        );
        r.register(
            "llamapool_worker_shape_changes",
            "Times an adaptive worker switched between wide and narrow",
            shape_changes,
        );
        for (name, help, value) in per_worker {
            let family = Family::<WorkerLabel, Gauge>::default();
            for (id, w) in self.workers.iter().enumerate() {
                family
                    .get_or_create(&WorkerLabel { worker: id })
                    .set(value(w));
            }
            r.register(name, help, family);
        }
        r
    }
}

/// One generation's clock, started when its handler takes it: feeds the time-to-first-token,
/// inter-token, per-output-token and duration histograms. A moved request keeps its clock,
/// so the pause of a move shows as one long inter-token gap.
#[derive(Debug)]
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl RequestTimer {
    pub fn start(metrics: Arc<Metrics>) -> Self {
        Self::start_at(metrics, Instant::now())
    }

    fn start_at(metrics: Arc<Metrics>, start: Instant) -> Self {
        Self {
            metrics,
            start,
            first: None,
            last: None,
            tokens: 0,
        }
    }

    /// An output arrived (each engine step sends one per sequence). A prompt progress report
    /// is none: the first token is yet to come.
    pub fn on_output(&mut self, output: &SeqOutput) {
        if !output.is_progress() {
            self.on_output_at(output.tokens.len(), Instant::now());
        }
    }

    fn on_output_at(&mut self, tokens: usize, now: Instant) {
        match self.last {
            None => self
                .metrics
                .time_to_first_token
                .observe(secs(now - self.start)),
            Some(last) if tokens > 0 => self
                .metrics
                .inter_token_latency
                .observe(secs(now - last) / tokens as f64),
            Some(_) => {}
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.tokens += tokens;
    }

    /// The generation finished (its last output was given to `on_output`).
    pub fn finish(self) {
        let Some((first, last)) = self.first.zip(self.last) else {
            return;
        };
        self.metrics
            .request_duration
            .observe(secs(last - self.start));
        if self.tokens > 1 {
            self.metrics
                .time_per_output_token
                .observe(secs(last - first) / (self.tokens - 1) as f64);
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use llamapool_common::{FinishReason, Timings, Usage};

    use super::*;

    fn finish(prompt: u32, completion: u32) -> Finish {
        Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_tokens: 0,
            },
            timings: Timings {
                queue_ms: 30.0,
                prompt_ms: 250.0,
                predicted_ms: 1500.0,
            },
            stop_word: None,
        }
    }

    /// The value of the sample line that starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn finishes_feed_the_llama_server_totals_and_the_queue_histogram() {
        let m = Metrics::default();
        m.record_finish(&finish(10, 5));
        m.record_finish(&finish(3, 2));
        let text = m.render(&Gauges::default());
        assert_eq!(sample(&text, "llamacpp:prompt_tokens_total"), 13.0);
        assert_eq!(sample(&text, "llamacpp:tokens_predicted_total"), 7.0);
        assert_eq!(sample(&text, "llamacpp:prompt_seconds_total"), 0.5);
        assert_eq!(
            sample(&text, "llamacpp:tokens_predicted_seconds_total"),
            3.0
        );
        assert_eq!(sample(&text, "llamacpp:requests_total"), 2.0);
        assert_eq!(sample(&text, "llamapool_prompt_tokens_total"), 13.0);
        assert_eq!(sample(&text, "llamapool_generation_tokens_total"), 7.0);
        assert_eq!(sample(&text, "llamapool_queue_time_seconds_count"), 2.0);
        assert_eq!(
            sample(&text, "llamapool_queue_time_seconds_bucket{le=\"0.025\"}"),
            0.0
        );
        assert_eq!(
            sample(&text, "llamapool_queue_time_seconds_bucket{le=\"0.05\"}"),
            2.0
        );
        assert!(text.contains("# TYPE llamacpp:prompt_tokens_total counter\n"));
        assert!(text.contains("# TYPE llamapool_queue_time_seconds histogram\n"));
    }

    #[test]
    fn responses_count_by_endpoint_and_status() {
        let m = Metrics::default();
        m.record_response("/v1/chat/completions", 200);
        m.record_response("/v1/chat/completions", 200);
        m.record_response("/v1/chat/completions", 429);
        m.record_response(UNMATCHED, 404);
        let text = m.render(&Gauges::default());
        let series = |endpoint: &str, status: u16| {
            sample(
                &text,
                &format!(
                    "llamapool_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"
                ),
            )
        };
        assert_eq!(series("/v1/chat/completions", 200), 2.0);
        assert_eq!(series("/v1/chat/completions", 429), 1.0);
        assert_eq!(series("unmatched", 404), 1.0);
    }

    #[test]
    fn a_timer_observes_first_token_gaps_per_token_time_and_duration() {
        let m = Arc::new(Metrics::default());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut timer = RequestTimer::start_at(m.clone(), t0);
        timer.on_output_at(1, ms(200)); // first token after 200 ms
        timer.on_output_at(1, ms(220));
        timer.on_output_at(2, ms(260)); // two tokens in 40 ms: 20 ms each
        timer.finish();
        let text = m.render(&Gauges::default());
        let count = |name: &str| sample(&text, &format!("llamapool_{name}_seconds_count"));
        let sum = |name: &str| sample(&text, &format!("llamapool_{name}_seconds_sum"));
        assert_eq!(count("time_to_first_token"), 1.0);
        assert!((sum("time_to_first_token") - 0.2).abs() < 1e-9);
        assert_eq!(count("inter_token_latency"), 2.0);
        assert!((sum("inter_token_latency") - 0.04).abs() < 1e-9);
        assert_eq!(count("time_per_output_token"), 1.0);
        assert!(
            (sum("time_per_output_token") - 0.02).abs() < 1e-9,
            "60 ms over 3 tokens"
        );
        assert_eq!(count("request_duration"), 1.0);
        assert!((sum("request_duration") - 0.26).abs() < 1e-9);

        // A generation that ended before any output observes nothing but nothing breaks.
        RequestTimer::start_at(m.clone(), t0).finish();
        let text = m.render(&Gauges::default());
        assert_eq!(
            sample(&text, "llamapool_request_duration_seconds_count"),
            1.0
        );
    }

    #[test]
    fn scrape_gauges_have_a_series_per_worker_and_one_state_set() {
        let m = Metrics::default();
        m.record_move(true);
        m.record_move(false);
        m.record_cancellation();
        m.record_hung_kill(1);
        let gauges = Gauges {
            processing: 5,
            deferred: 1,
            decode_calls: 42,
            ready_workers: 1,
            states: vec!["starting", "ready", "hung"],
            workers: vec![
                WorkerGauges {
                    state: "ready",
                    slots: 4,
                    running: 3,
                    waiting: 1,
                    kv_cells_used: 120,
                    kv_cells: 4096,
                    in_flight: 4,
                    restarts: 0,
                    wide: true,
                    threads_in_use: 2,
                    shape_changes: 7,
                },
                WorkerGauges {
                    state: "hung",
                    slots: 4,
                    restarts: 2,
                    ..WorkerGauges::default()
                },
            ],
        };
        let text = m.render(&gauges);
        assert_eq!(sample(&text, "llamacpp:n_decode_total"), 42.0);
        assert_eq!(sample(&text, "llamacpp:requests_processing"), 5.0);
        assert_eq!(sample(&text, "llamacpp:requests_deferred"), 1.0);
        assert_eq!(sample(&text, "llamacpp:workers_ready"), 1.0);
        assert_eq!(sample(&text, "llamapool_requests_moved_total"), 2.0);
        assert_eq!(sample(&text, "llamapool_requests_resumed_total"), 1.0);
        assert_eq!(sample(&text, "llamapool_client_cancellations_total"), 1.0);
        let w =
            |name: &str, worker: usize| sample(&text, &format!("{name}{{worker=\"{worker}\"}}"));
        assert_eq!(w("llamapool_worker_hung_kills_total", 0), 0.0);
        assert_eq!(w("llamapool_worker_hung_kills_total", 1), 1.0);
        assert_eq!(w("llamapool_worker_restarts_total", 1), 2.0);
        assert_eq!(w("llamapool_worker_running_requests", 0), 3.0);
        assert_eq!(w("llamapool_worker_waiting_requests", 0), 1.0);
        assert_eq!(w("llamapool_worker_in_flight_requests", 0), 4.0);
        assert_eq!(w("llamapool_worker_kv_cells_used", 0), 120.0);
        assert_eq!(w("llamapool_worker_kv_cells", 0), 4096.0);
        assert_eq!(w("llamapool_worker_slots", 1), 4.0);
        assert_eq!(w("llamapool_worker_running_requests", 1), 0.0);
        assert_eq!(w("llamapool_worker_wide", 0), 1.0);
        assert_eq!(w("llamapool_worker_wide", 1), 0.0);
        assert_eq!(w("llamapool_worker_threads", 0), 2.0);
        assert_eq!(w("llamapool_worker_shape_changes_total", 0), 7.0);
        let state = |worker: usize, state: &str| {
            sample(
                &text,
                &format!("llamapool_worker_state{{worker=\"{worker}\",state=\"{state}\"}}"),
            )
        };
        assert_eq!(state(0, "ready"), 1.0);
        assert_eq!(state(0, "starting"), 0.0);
        assert_eq!(state(0, "hung"), 0.0);
        assert_eq!(state(1, "hung"), 1.0);
        assert_eq!(state(1, "ready"), 0.0);
        // Each family is described once.
        assert_eq!(
            text.matches("# TYPE llamapool_worker_state gauge\n")
                .count(),
            1
        );
    }
}
