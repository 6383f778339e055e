//! llama-server's command line for `llamapool-router`: an existing llama-server start script
//! works with the binary name changed.
//!
//! [`extract`] takes llama-server's flags (table [`FLAGS`]) out of the command line before
//! clap sees it and leaves the router's own flags (`--config`, `--set`, ...) in place; any
//! other flag is refused there, naming it and listing what is supported. [`overrides`] then
//! turns what was taken into configuration overrides (`key=value`, the layer of `--set`),
//! given the settings loaded without them: most flags are one key, while `--host`/`--port`
//! complete the configured `server.listen`, and `-c`, `-np`, `-t` shape the pool, which needs
//! its number of workers. Plain data and pure functions, except that `--chat-template-file`
//! is read by [`overrides`].

use std::ffi::OsString;
use std::path::PathBuf;

use llamapool_common::cpus::CpuList;
use llamapool_common::settings::Settings;

/// A command line that cannot be taken: exit status 2, like clap's usage errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("unsupported flag {flag}; llamapool-router takes these llama-server flags: {}; and its own: --config, --listen, --set, --check (see --help)", supported_names())]
    Unsupported { flag: String },
    #[error("flag {flag} needs a value")]
    MissingValue { flag: String },
    #[error("flag {flag}: {value:?} is not {expected}")]
    BadValue {
        flag: String,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Conflict(String),
}

/// What one llama-server flag does here.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Host,
    Port,
    CtxSize,
    Parallel,
    Threads,
    FlashAttn,
    ChatTemplateFile,
    /// The checked value becomes this key.
    Key(&'static str, Check),
    /// Repeatable, each value comma-separated: all of them, joined with commas, become this key.
    List(&'static str),
    /// A switch that sets this key to this value.
    Set(&'static str, &'static str),
    /// `--reranking`: embedding workers with pooling `rank`.
    Reranking,
    /// Accepted and ignored; `true` when the flag takes a value (read and dropped).
    Ignored(bool),
}

/// How a value is checked before it becomes a key.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    Count,
    Int,
    Float,
    Text,
    GpuLayers,
    /// A count; 0 or negative leaves the key unset (llama-server's "default").
    PositiveOrDefault,
}

/// One llama-server flag: its spellings, its value's name (none for a switch), what it does,
/// and what `--help` and the README say about it.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    pub names: &'static [&'static str],
    pub value: Option<&'static str>,
    action: Action,
    pub meaning: &'static str,
}

const fn flag(
    names: &'static [&'static str],
    value: Option<&'static str>,
    action: Action,
    meaning: &'static str,
) -> Flag {
    Flag {
        names,
        value,
        action,
        meaning,
    }
}

/// Every llama-server flag `llamapool-router` takes, mapped or ignored.
pub const FLAGS: &[Flag] = &[
    flag(&["-m", "--model"], Some("FNAME"), Action::Key("model.path", Check::Text), "model.path (the router's own --model)"),
    flag(&["-a", "--alias"], Some("NAME"), Action::Key("model.alias", Check::Text), "model.alias (the router's own --alias; names separated by commas)"),
    flag(&["--tags"], Some("TAGS"), Action::List("model.tags"), "model.tags (comma-separated; listed by /v1/models)"),
    flag(&["--host"], Some("HOST[,HOST]"), Action::Host, "the host of server.listen (TCP; several separated by commas: one address each, same port)"),
    flag(&["--port"], Some("PORT"), Action::Port, "the port of server.listen"),
    flag(&["-c", "--ctx-size"], Some("N"), Action::CtxSize, "the pool's context: worker_defaults.context = N / workers (0: as configured)"),
    flag(&["-np", "--parallel"], Some("N"), Action::Parallel, "at least N slots: worker_defaults.slots = ceil(N / workers), each slot N / -c cells (-1: as configured)"),
    flag(&["-t", "--threads"], Some("N"), Action::Threads, "1 or less: one pinned 1-thread worker per CPU; more: one worker of N threads pinned to N CPUs"),
    flag(&["-b", "--batch-size"], Some("N"), Action::Key("worker_defaults.n_batch", Check::Count), "worker_defaults.n_batch"),
    flag(&["-ub", "--ubatch-size"], Some("N"), Action::Key("worker_defaults.n_ubatch", Check::Count), "worker_defaults.n_ubatch"),
    flag(&["-fa", "--flash-attn"], Some("[on|off|auto]"), Action::FlashAttn, "worker_defaults.flash_attention (alone: on)"),
    flag(&["-kvu", "--kv-unified"], None, Action::Set("worker_defaults.kv_unified", "true"), "worker_defaults.kv_unified = true"),
    flag(&["-no-kvu", "--no-kv-unified"], None, Action::Set("worker_defaults.kv_unified", "false"), "worker_defaults.kv_unified = false"),
    flag(&["-ngl", "--gpu-layers", "--n-gpu-layers"], Some("N|all|auto"), Action::Key("worker_defaults.gpu_layers", Check::GpuLayers), "worker_defaults.gpu_layers (all: 999; auto: as configured; no effect on a CPU build)"),
    flag(&["-n", "--predict", "--n-predict"], Some("N"), Action::Key("generation.n_predict", Check::Int), "generation.n_predict"),
    flag(&["--temp", "--temperature"], Some("N"), Action::Key("generation.temperature", Check::Float), "generation.temperature"),
    flag(&["-s", "--seed"], Some("SEED"), Action::Key("generation.seed", Check::Int), "generation.seed"),
    flag(&["--top-k"], Some("N"), Action::Key("generation.top_k", Check::Int), "generation.top_k"),
    flag(&["--top-p"], Some("N"), Action::Key("generation.top_p", Check::Float), "generation.top_p"),
    flag(&["--min-p"], Some("N"), Action::Key("generation.min_p", Check::Float), "generation.min_p"),
    flag(&["--repeat-penalty"], Some("N"), Action::Key("generation.repeat_penalty", Check::Float), "generation.repeat_penalty"),
    flag(&["--api-key"], Some("KEY[,KEY]"), Action::List("server.api_keys"), "server.api_keys (repeatable, comma-separated)"),
    flag(&["--api-key-file"], Some("FNAME"), Action::Key("server.api_key_file", Check::Text), "server.api_key_file"),
    flag(&["--cors-origins"], Some("ORIGINS"), Action::List("server.cors_origins"), "server.cors_origins (comma-separated)"),
    flag(&["--chat-template"], Some("TEMPLATE"), Action::Key("model.chat_template", Check::Text), "model.chat_template (a built-in name or template text)"),
    flag(&["--chat-template-file"], Some("FNAME"), Action::ChatTemplateFile, "model.chat_template = the file's text"),
    flag(&["--threads-http"], Some("N"), Action::Key("server.runtime_threads", Check::PositiveOrDefault), "server.runtime_threads (-1: as configured)"),
    flag(&["--metrics"], None, Action::Ignored(false), "ignored: /metrics is always served"),
    flag(&["--ui", "--webui", "--no-ui", "--no-webui"], None, Action::Ignored(false), "ignored: the web page is always served"),
    flag(&["-cb", "--cont-batching"], None, Action::Ignored(false), "ignored: batching is always continuous"),
    flag(&["--jinja"], None, Action::Ignored(false), "ignored: chat templates are always rendered as Jinja (llama-server's default)"),
    flag(&["--reasoning-format"], Some("FORMAT"), Action::Key("generation.reasoning_format", Check::Text), "generation.reasoning_format (none, auto, deepseek, deepseek-legacy)"),
    flag(&["-rea", "--reasoning"], Some("on|off|auto"), Action::Key("generation.reasoning", Check::Text), "generation.reasoning"),
    flag(&["--reasoning-preserve"], None, Action::Set("generation.reasoning_preserve", "true"), "generation.reasoning_preserve = true (the default)"),
    flag(&["--no-reasoning-preserve"], None, Action::Set("generation.reasoning_preserve", "false"), "generation.reasoning_preserve = false"),
    flag(&["--embedding", "--embeddings"], None, Action::Set("worker_defaults.embedding", "true"), "worker_defaults.embedding = true: every worker serves embeddings (/v1/embeddings), none generates"),
    flag(&["--pooling"], Some("{none,mean,cls,last,rank}"), Action::Key("model.pooling", Check::Text), "model.pooling: how embedding workers pool (default: the model's)"),
    flag(&["--rerank", "--reranking"], None, Action::Reranking, "worker_defaults.embedding = true and model.pooling = rank: /v1/rerank"),
    flag(&["--warmup", "--no-warmup"], None, Action::Ignored(false), "ignored"),
    flag(&["--models-dir"], Some("PATH"), Action::Key("server.models_dir", Check::Text), "server.models_dir: every .gguf file in it is a model, loaded on demand"),
    flag(&["--models-preset"], Some("PATH"), Action::Key("server.models_preset", Check::Text), "server.models_preset: an INI file of models (one [section] each)"),
    flag(&["--models-max"], Some("N"), Action::Key("server.models_max", Check::Int), "server.models_max: most models loaded at once (0: no limit)"),
    flag(&["--models-autoload"], None, Action::Set("server.models_autoload", "true"), "server.models_autoload = true (the default)"),
    flag(&["--no-models-autoload"], None, Action::Set("server.models_autoload", "false"), "server.models_autoload = false: models load only by POST /models/load"),
    flag(&["-tb", "--threads-batch"], Some("N"), Action::Ignored(true), "ignored: prompts use the worker's threads"),
    flag(&["--slots"], None, Action::Set("server.slots_endpoint", "true"), "server.slots_endpoint = true (the default)"),
    flag(&["--no-slots"], None, Action::Set("server.slots_endpoint", "false"), "server.slots_endpoint = false: GET /slots answers 501"),
    flag(&["-v", "--verbose"], None, Action::Set("generation.verbose", "true"), "generation.verbose = true: non-streamed results carry __verbose, as llama-server's"),
    flag(&["--offline", "--no-jinja"], None, Action::Ignored(false), "ignored"),
    flag(&["-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"], Some("REPO"), Action::Ignored(true), "ignored: models are not downloaded; give the file with -m"),
    flag(&["-bs", "--backend-sampling"], None, Action::Ignored(false), "ignored: sampling runs in the worker, on the CPU, with the same results"),
];

fn supported_names() -> String {
    FLAGS
        .iter()
        .flat_map(|f| f.names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The llama-server part of `--help`: every flag of [`FLAGS`] and what it becomes.
pub fn help() -> String {
    let mut text = String::from(
        "llama-server's flags (a start script works with the binary name changed; they apply \
         after --set; -c with a number is --ctx-size, else --config):\n",
    );
    for f in FLAGS {
        let mut left = f.names.join(", ");
        if let Some(v) = f.value {
            left.push(' ');
            left.push_str(v);
        }
        text.push_str(&format!("  {left:<44} {}\n", f.meaning));
    }
    text.push_str("Any other flag is refused (exit status 2).");
    text
}

/// The flag named `name`; a long name may spell its dashes as underscores
/// (`--backend_sampling`), as llama.cpp's parser accepts.
fn find(name: &str) -> Option<&'static Flag> {
    let dashed = match name.strip_prefix("--") {
        Some(rest) => format!("--{}", rest.replace('_', "-")),
        None => name.to_string(),
    };
    FLAGS
        .iter()
        .find(|f| f.names.contains(&name) || f.names.contains(&dashed.as_str()))
}

/// What [`extract`] took from the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlamaFlags {
    pub host: Option<String>,
    pub port: Option<u16>,
    /// `-c`; 0 (llama-server: the model's own) is `None`.
    pub ctx_size: Option<u32>,
    /// `-np`; -1 (llama-server: auto) is `None`.
    pub parallel: Option<u32>,
    /// `-t`; 0 and negative (llama-server: as many as cores) are `None`.
    pub threads: Option<u32>,
    pub chat_template_file: Option<PathBuf>,
    /// Keys set by one flag each, in command-line order.
    pub keys: Vec<(String, String)>,
    /// Flags accepted and ignored, as given.
    pub ignored: Vec<String>,
}

impl LlamaFlags {
    /// Whether any flag was taken (an ignored one counts).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn set(&mut self, key: &str, value: String) {
        self.keys.retain(|(k, _)| k != key);
        self.keys.push((key.to_string(), value));
    }

    fn append(&mut self, key: &str, value: &str) {
        match self.keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, list)) => {
                list.push(',');
                list.push_str(value);
            }
            None => self.keys.push((key.to_string(), value.to_string())),
        }
    }
}

/// A flag of the router's own (clap's): its spelling (`--config`, `-c`) and whether it takes
/// a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnFlag {
    pub name: String,
    pub takes_value: bool,
}

/// Splits `args` (the program name first) into the router's own arguments, for clap, and
/// llama-server's flags. `-c` with an integer value is llama-server's `--ctx-size`, with any
/// other value the router's own flag of that name (`--config`). A flag that is neither
/// own nor in [`FLAGS`] is [`FlagError::Unsupported`]. After `--` nothing is taken.
pub fn extract(
    args: impl IntoIterator<Item = OsString>,
    own: &[OwnFlag],
) -> Result<(Vec<OsString>, LlamaFlags), FlagError> {
    let mut args = args.into_iter().peekable();
    let mut rest: Vec<OsString> = args.next().into_iter().collect();
    let mut flags = LlamaFlags::default();
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            rest.push(arg);
            continue;
        };
        if text == "--" {
            rest.push(arg);
            rest.extend(args.by_ref());
            break;
        }
        if !text.starts_with('-') || text == "-" {
            rest.push(arg);
            continue;
        }
        let (name, inline) = match text.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (text.clone(), None),
        };
        let own_flag = own.iter().find(|o| o.name == name);
        let llama = find(&name).filter(|_| {
            // `-c FILE` stays the router's own flag; `-c N` is llama-server's.
            name != "-c" || own_flag.is_none() || {
                let value = inline
                    .clone()
                    .or_else(|| args.peek().and_then(|a| a.to_str().map(String::from)));
                value.is_some_and(|v| v.parse::<i64>().is_ok())
            }
        });
        // `--model`/`--alias` are the router's own flags too: clap takes them.
        if let Some(f) = llama.filter(|_| own_flag.is_none() || name == "-c") {
            take(&mut flags, f, &name, inline, &mut args)?;
        } else if let Some(o) = own_flag {
            rest.push(arg);
            if o.takes_value && inline.is_none() {
                rest.extend(args.next());
            }
        } else {
            return Err(FlagError::Unsupported { flag: name });
        }
    }
    check_model_given(&rest, &flags)?;
    Ok((rest, flags))
}

/// `-hf REPO` is taken only beside `-m FILE` (which llama-server loads then too): models are
/// not downloaded.
fn check_model_given(rest: &[OsString], flags: &LlamaFlags) -> Result<(), FlagError> {
    let is_model = |a: &OsString| {
        a.to_str()
            .is_some_and(|a| a == "-m" || a == "--model" || a.starts_with("--model="))
    };
    match flags
        .ignored
        .iter()
        .find(|f| f.starts_with("-hf") || f.starts_with("--hf"))
    {
        Some(hf) if !rest.iter().any(is_model) => Err(FlagError::Conflict(format!(
            "{hf}: models are not downloaded; give the GGUF file with -m"
        ))),
        _ => Ok(()),
    }
}

/// Reads the value of `name`: the inline one (`--port=8080`) or the next argument, whatever
/// it looks like (`-t -1`), as llama-server does.
fn value(
    name: &str,
    inline: Option<String>,
    args: &mut impl Iterator<Item = OsString>,
) -> Result<String, FlagError> {
    let missing = || FlagError::MissingValue {
        flag: name.to_string(),
    };
    match inline {
        Some(v) => Ok(v),
        None => args
            .next()
            .ok_or_else(missing)?
            .into_string()
            .map_err(|v| FlagError::BadValue {
                flag: name.to_string(),
                value: v.to_string_lossy().into_owned(),
                expected: "UTF-8 text",
            }),
    }
}

fn number<T: std::str::FromStr>(
    name: &str,
    value: &str,
    expected: &'static str,
) -> Result<T, FlagError> {
    value.trim().parse().map_err(|_| FlagError::BadValue {
        flag: name.to_string(),
        value: value.to_string(),
        expected,
    })
}

/// The values `-fa` takes, as llama.cpp reads them.
fn flash_attention(value: &str) -> Option<&'static str> {
    match value {
        "on" | "enabled" | "true" | "1" => Some("on"),
        "off" | "disabled" | "false" | "0" => Some("off"),
        "auto" | "-1" => Some("auto"),
        _ => None,
    }
}

fn take(
    flags: &mut LlamaFlags,
    f: &Flag,
    name: &str,
    inline: Option<String>,
    args: &mut std::iter::Peekable<impl Iterator<Item = OsString>>,
) -> Result<(), FlagError> {
    if f.value.is_none() {
        if let Some(v) = inline {
            return Err(FlagError::BadValue {
                flag: name.to_string(),
                value: v,
                expected: "allowed: this flag is a switch",
            });
        }
    }
    let bad = |value: &str, expected| FlagError::BadValue {
        flag: name.to_string(),
        value: value.to_string(),
        expected,
    };
    match f.action {
        Action::Host => {
            let host = value(name, inline, args)?;
            let hosts: Vec<&str> = host.split(',').map(str::trim).collect();
            if hosts.iter().any(|h| h.is_empty() || h.ends_with(".sock")) {
                return Err(bad(
                    &host,
                    "hosts separated by commas, none empty (UNIX sockets are not supported)",
                ));
            }
            flags.host = Some(host);
        }
        Action::Port => {
            let v = value(name, inline, args)?;
            flags.port = Some(number(name, &v, "a port (0 to 65535)")?);
        }
        Action::CtxSize => {
            let v = value(name, inline, args)?;
            let n: u32 = number(name, &v, "a context size (0 or more)")?;
            flags.ctx_size = (n > 0).then_some(n);
        }
        Action::Parallel => {
            let v = value(name, inline, args)?;
            let n: i64 = number(name, &v, "a number of slots (-1 or at least 1)")?;
            flags.parallel = match n {
                -1 => None,
                1.. => Some(u32::try_from(n).map_err(|_| bad(&v, "a number of slots"))?),
                _ => return Err(bad(&v, "a number of slots (-1 or at least 1)")),
            };
        }
        Action::Threads => {
            let v = value(name, inline, args)?;
            let n: i64 = number(name, &v, "a number of threads")?;
            flags.threads = (n > 0)
                .then(|| u32::try_from(n).map_err(|_| bad(&v, "a number of threads")))
                .transpose()?;
        }
        Action::FlashAttn => {
            // The value is optional: older llama-servers had `-fa` as a switch.
            let v = match inline {
                Some(v) => Some(v),
                None => args
                    .next_if(|a| a.to_str().and_then(flash_attention).is_some())
                    .and_then(|a| a.into_string().ok()),
            };
            let mode = match v {
                Some(v) => flash_attention(&v).ok_or_else(|| bad(&v, "on, off or auto"))?,
                None => "on",
            };
            flags.set("worker_defaults.flash_attention", mode.to_string());
        }
        Action::ChatTemplateFile => {
            flags.chat_template_file = Some(PathBuf::from(value(name, inline, args)?));
        }
        Action::Key(key, check) => {
            let v = value(name, inline, args)?;
            let v = match check {
                Check::Text => v,
                Check::Count => number::<u32>(name, &v, "a count (0 or more)")?.to_string(),
                Check::Int => number::<i64>(name, &v, "an integer")?.to_string(),
                Check::Float => {
                    let x: f32 = number(name, &v, "a number")?;
                    if !x.is_finite() {
                        return Err(bad(&v, "a finite number"));
                    }
                    v.trim().to_string()
                }
                Check::GpuLayers => match v.as_str() {
                    "auto" => return Ok(()),
                    "all" => "999".to_string(),
                    _ => number::<u32>(name, &v, "a number of layers, all or auto")?.to_string(),
                },
                Check::PositiveOrDefault => {
                    let n: i64 = number(name, &v, "an integer")?;
                    if n <= 0 {
                        return Ok(());
                    }
                    u32::try_from(n)
                        .map_err(|_| bad(&v, "a count"))?
                        .to_string()
                }
            };
            flags.set(key, v);
        }
        Action::List(key) => {
            let v = value(name, inline, args)?;
            flags.append(key, &v);
        }
        Action::Set(key, v) => flags.set(key, v.to_string()),
        Action::Reranking => {
            flags.set("worker_defaults.embedding", "true".into());
            flags.set("model.pooling", "rank".into());
        }
        Action::Ignored(takes_value) => {
            let mut given = name.to_string();
            if takes_value {
                given.push(' ');
                given.push_str(&value(name, inline, args)?);
            }
            flags.ignored.push(given);
        }
    }
    Ok(())
}

/// `listen` split into host and port (`[::1]:8080` → `[::1]`, `8080`).
/// The host and port of the first address of a `server.listen` (which may list several).
fn split_listen(listen: &str) -> Option<(&str, &str)> {
    listen.split(',').next()?.trim().rsplit_once(':')
}

/// The overrides for `flags`, given `settings` loaded without them and the CPUs the pool may
/// use: the keys of single flags, then `server.listen` (`--host`/`--port`, each completing the
/// configured address), then the pool's shape:
///
/// - `-t T`, T > 1: one worker of T threads pinned to the first T allowed CPUs (all of them
///   when fewer: `workers[0].cpus`, `workers[0].threads`); refused with `[[workers]]` tables.
///   Otherwise the pool is as configured: W workers (default: one per allowed CPU).
/// - `-np N`: `worker_defaults.slots` = ceil(N / W), so the pool has at least N slots.
/// - `-c C`: with `-np N`, `worker_defaults.context` = slots × (C / N), so each slot holds
///   C / N cells as under llama-server; without, C / W (each worker its share).
pub fn overrides(
    flags: &LlamaFlags,
    settings: &Settings,
    allowed: &CpuList,
) -> Result<Vec<(String, String)>, FlagError> {
    let mut out = flags.keys.clone();
    if let Some(path) = &flags.chat_template_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FlagError::Conflict(format!(
                "--chat-template-file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        out.push(("model.chat_template".into(), text));
    }
    if flags.host.is_some() || flags.port.is_some() {
        let (host, port) = split_listen(&settings.server.listen).unwrap_or(("127.0.0.1", "8080"));
        let hosts: Vec<String> = match &flags.host {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .map(|h| {
                    if h.contains(':') && !h.starts_with('[') {
                        format!("[{h}]")
                    } else {
                        h.to_string()
                    }
                })
                .collect(),
            None => vec![host.to_string()],
        };
        let port = flags
            .port
            .map_or_else(|| port.to_string(), |p| p.to_string());
        let listen: Vec<String> = hosts.iter().map(|h| format!("{h}:{port}")).collect();
        out.push(("server.listen".into(), listen.join(",")));
    }
    let workers = match flags.threads {
        Some(t) if t > 1 => {
            if !settings.workers.is_empty() {
                return Err(FlagError::Conflict(format!(
                    "-t {t} makes the pool one worker of {t} threads, but the configuration has \
                     [[workers]] tables (set threads there, or leave -t out)"
                )));
            }
            let cpus = &allowed.cpus()[..allowed.len().min(t as usize)];
            let list = CpuList::from_cpus(cpus.to_vec()).to_string();
            out.push(("workers[0].cpus".into(), list));
            out.push(("workers[0].threads".into(), cpus.len().to_string()));
            1
        }
        _ if settings.workers.is_empty() => settings.default_worker_count(allowed).max(1),
        _ => settings.workers.len(),
    };
    let workers = u32::try_from(workers).unwrap_or(u32::MAX);
    let slots = flags.parallel.map(|n| n.div_ceil(workers));
    if let Some(s) = slots {
        out.push(("worker_defaults.slots".into(), s.to_string()));
    }
    if let Some(c) = flags.ctx_size {
        let context = match (flags.parallel, slots) {
            (Some(n), Some(s)) => {
                if c < n {
                    return Err(FlagError::Conflict(format!(
                        "-c {c} is less than one cell for each of -np {n} slots"
                    )));
                }
                s * (c / n)
            }
            _ => c / workers,
        };
        if context == 0 {
            return Err(FlagError::Conflict(format!(
                "-c {c} leaves no context for each of {workers} workers"
            )));
        }
        out.push(("worker_defaults.context".into(), context.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router's own flags, as main.rs derives them from clap.
    fn own() -> Vec<OwnFlag> {
        [
            ("--config", true),
            ("-c", true),
            ("--listen", true),
            ("--model", true),
            ("-m", true),
            ("--alias", true),
            ("-a", true),
            ("--set", true),
            ("--check", false),
            ("--help", false),
            ("-h", false),
            ("--version", false),
            ("-V", false),
        ]
        .into_iter()
        .map(|(name, takes_value)| OwnFlag {
            name: name.into(),
            takes_value,
        })
        .collect()
    }

    fn split(line: &str) -> Result<(Vec<String>, LlamaFlags), FlagError> {
        let args = std::iter::once("llamapool-router")
            .chain(line.split_whitespace())
            .map(OsString::from);
        extract(args, &own()).map(|(rest, flags)| {
            let rest = rest[1..]
                .iter()
                .map(|a| a.to_str().unwrap().to_string())
                .collect();
            (rest, flags)
        })
    }

    fn keys(line: &str) -> Vec<(String, String)> {
        let (rest, flags) = split(line).unwrap();
        assert!(rest.is_empty(), "{line}: left {rest:?}");
        flags.keys
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_start_script_is_taken_whole() {
        let (rest, flags) =
            split("-m model.gguf --host 0.0.0.0 --port 8080 -c 8192 -np 8 -t 2 -fa on --api-key K")
                .unwrap();
        assert_eq!(rest, ["-m", "model.gguf"], "-m is the router's own --model");
        assert_eq!(flags.host.as_deref(), Some("0.0.0.0"));
        assert_eq!(flags.port, Some(8080));
        assert_eq!(flags.ctx_size, Some(8192));
        assert_eq!(flags.parallel, Some(8));
        assert_eq!(flags.threads, Some(2));
        assert_eq!(
            flags.keys,
            pairs(&[
                ("worker_defaults.flash_attention", "on"),
                ("server.api_keys", "K")
            ])
        );
    }

    #[test]
    fn every_key_flag_short_and_long() {
        for (line, key, value) in [
            ("-b 256", "worker_defaults.n_batch", "256"),
            ("--batch-size 256", "worker_defaults.n_batch", "256"),
            ("--batch-size=256", "worker_defaults.n_batch", "256"),
            ("-ub 128", "worker_defaults.n_ubatch", "128"),
            ("--ubatch-size 128", "worker_defaults.n_ubatch", "128"),
            ("-kvu", "worker_defaults.kv_unified", "true"),
            ("--kv-unified", "worker_defaults.kv_unified", "true"),
            ("-no-kvu", "worker_defaults.kv_unified", "false"),
            ("--no-kv-unified", "worker_defaults.kv_unified", "false"),
            ("-ngl 99", "worker_defaults.gpu_layers", "99"),
            ("--n-gpu-layers all", "worker_defaults.gpu_layers", "999"),
            ("--gpu-layers 3", "worker_defaults.gpu_layers", "3"),
            ("-n 64", "generation.n_predict", "64"),
            ("--n-predict -1", "generation.n_predict", "-1"),
            ("--predict 5", "generation.n_predict", "5"),
            ("--temp 0.5", "generation.temperature", "0.5"),
            ("--temperature 0", "generation.temperature", "0"),
            ("-s 42", "generation.seed", "42"),
            ("--seed -1", "generation.seed", "-1"),
            ("--top-k 40", "generation.top_k", "40"),
            ("--top-p 0.9", "generation.top_p", "0.9"),
            ("--min-p 0.05", "generation.min_p", "0.05"),
            ("--repeat-penalty 1.1", "generation.repeat_penalty", "1.1"),
            ("--api-key-file keys.txt", "server.api_key_file", "keys.txt"),
            ("--chat-template chatml", "model.chat_template", "chatml"),
            ("--threads-http 2", "server.runtime_threads", "2"),
            (
                "--cors-origins http://a.example",
                "server.cors_origins",
                "http://a.example",
            ),
        ] {
            assert_eq!(keys(line), pairs(&[(key, value)]), "{line}");
        }
        assert!(keys("-ngl auto").is_empty(), "auto keeps the configuration");
        assert!(keys("--threads-http -1").is_empty());
    }

    #[test]
    fn flash_attention_takes_a_value_or_none() {
        let fa = |line: &str| keys(line)[0].1.clone();
        for (line, mode) in [
            ("-fa on", "on"),
            ("-fa off", "off"),
            ("-fa auto", "auto"),
            ("--flash-attn off", "off"),
            ("--flash-attn=auto", "auto"),
            ("-fa enabled", "on"),
            ("-fa 0", "off"),
            ("-fa", "on"),
        ] {
            assert_eq!(fa(line), mode, "{line}");
        }
        // The old switch, followed by another flag.
        let (_, flags) = split("-fa -b 64").unwrap();
        assert_eq!(
            flags.keys,
            pairs(&[
                ("worker_defaults.flash_attention", "on"),
                ("worker_defaults.n_batch", "64")
            ])
        );
        assert!(matches!(
            split("--flash-attn=maybe"),
            Err(FlagError::BadValue { .. })
        ));
    }

    #[test]
    fn lists_repeat_and_join() {
        assert_eq!(
            keys("--api-key k1 --api-key k2,k3 --cors-origins http://a.example,http://b.example"),
            pairs(&[
                ("server.api_keys", "k1,k2,k3"),
                ("server.cors_origins", "http://a.example,http://b.example")
            ])
        );
    }

    #[test]
    fn shape_flags_and_their_defaults() {
        let (_, f) =
            split("--ctx-size 4096 --parallel 4 --threads 1 --host ::1 --port=9000").unwrap();
        assert_eq!(
            (f.ctx_size, f.parallel, f.threads, f.host.as_deref(), f.port),
            (Some(4096), Some(4), Some(1), Some("::1"), Some(9000))
        );
        // llama-server's "default" values leave the configuration as it is.
        let (_, f) = split("-c 0 -np -1 -t -1").unwrap();
        assert_eq!((f.ctx_size, f.parallel, f.threads), (None, None, None));
        for bad in [
            "-np 0",
            "-np x",
            "--port 70000",
            "-t x",
            "--host a.sock",
            "--host a,,b",
            "--ctx-size -5",
        ] {
            assert!(
                matches!(split(bad), Err(FlagError::BadValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            split("-b"),
            Err(FlagError::MissingValue { flag: "-b".into() })
        );
    }

    #[test]
    fn ignored_flags_are_accepted() {
        let (rest, f) = split("--metrics --no-webui -cb --jinja -tb 4 --no-warmup").unwrap();
        let (_, more) = split("-m m.gguf --offline --no-jinja --hf-repo org/model").unwrap();
        assert_eq!(more.ignored.len(), 3);
        assert!(matches!(split("-hf org/model"), Err(FlagError::Conflict(m)) if m.contains("-hf")));
        let (_, verbose) = split("-v").unwrap();
        assert_eq!(
            verbose.keys,
            [("generation.verbose".to_string(), "true".to_string())]
        );
        let (_, slots) = split("--slots --no-slots").unwrap();
        assert_eq!(
            slots.keys,
            [("server.slots_endpoint".to_string(), "false".to_string())]
        );
        // Underscores for dashes, as llama.cpp's parser takes them.
        let (_, spelled) = split("--backend_sampling -bs --ctx_size 512").unwrap();
        assert_eq!(spelled.ignored, ["--backend_sampling", "-bs"]);
        assert_eq!(spelled.ctx_size, Some(512));
        assert!(rest.is_empty());
        assert!(f.keys.is_empty());
        assert_eq!(
            f.ignored,
            [
                "--metrics",
                "--no-webui",
                "-cb",
                "--jinja",
                "-tb 4",
                "--no-warmup"
            ]
        );
        assert!(matches!(
            split("--metrics=1"),
            Err(FlagError::BadValue { .. })
        ));
    }

    #[test]
    fn own_flags_pass_through() {
        let (rest, f) = split(
            "--config c.toml -c other.toml --set server.max_queued=1 --set=a=b --model m --alias x -a y --listen 127.0.0.1:0 --check --alias -np",
        )
        .unwrap();
        assert_eq!(
            rest,
            [
                "--config",
                "c.toml",
                "-c",
                "other.toml",
                "--set",
                "server.max_queued=1",
                "--set=a=b",
                "--model",
                "m",
                "--alias",
                "x",
                "-a",
                "y",
                "--listen",
                "127.0.0.1:0",
                "--check",
                "--alias",
                "-np"
            ]
        );
        assert!(f.is_empty());
        // `-c` with a number is the context size.
        let (rest, f) = split("-c 8192 -c=512").unwrap();
        assert!(rest.is_empty());
        assert_eq!(f.ctx_size, Some(512));
        // After `--`, nothing is taken.
        let (rest, _) = split("-- -np 4").unwrap();
        assert_eq!(rest, ["--", "-np", "4"]);
    }

    #[test]
    fn unsupported_flags_are_named_with_the_supported_ones() {
        for flag in ["--lora", "-ctk", "--no-such-flag", "-x"] {
            let err = split(&format!("-m m.gguf {flag} v")).unwrap_err();
            assert_eq!(err, FlagError::Unsupported { flag: flag.into() });
            let text = err.to_string();
            assert!(text.contains(flag), "{text}");
            assert!(
                text.contains("-np, --parallel") && text.contains("--config"),
                "{text}"
            );
        }
    }

    fn settings(toml_workers: usize, listen: &str) -> Settings {
        let mut s = Settings::default();
        s.server.listen = listen.into();
        s.workers = vec![Default::default(); toml_workers];
        s
    }

    fn shaped(line: &str, s: &Settings, cpus: &str) -> Result<Vec<(String, String)>, FlagError> {
        let (_, flags) = split(line).unwrap();
        overrides(&flags, s, &CpuList::parse(cpus).unwrap())
    }

    #[test]
    fn context_and_slots_over_the_default_pool() {
        let s = settings(0, "127.0.0.1:8080");
        // Two one-thread workers: each has half the context.
        assert_eq!(
            shaped("-c 8192", &s, "0-1").unwrap(),
            pairs(&[("worker_defaults.context", "4096")])
        );
        // -np 4 on two workers: 2 slots each, each slot c / np = 1024 cells.
        assert_eq!(
            shaped("-c 4096 -np 4", &s, "0-1").unwrap(),
            pairs(&[
                ("worker_defaults.slots", "2"),
                ("worker_defaults.context", "2048")
            ])
        );
        // Fewer slots than workers: one each, still c / np cells each.
        assert_eq!(
            shaped("-c 4096 -np 2", &s, "0-3").unwrap(),
            pairs(&[
                ("worker_defaults.slots", "1"),
                ("worker_defaults.context", "2048")
            ])
        );
        // Not a multiple: at least np slots.
        assert_eq!(
            shaped("-c 3000 -np 3", &s, "0-1").unwrap(),
            pairs(&[
                ("worker_defaults.slots", "2"),
                ("worker_defaults.context", "2000")
            ])
        );
        assert_eq!(
            shaped("-np 8", &s, "0-3").unwrap(),
            pairs(&[("worker_defaults.slots", "2")])
        );
        // [[workers]] tables count as they are.
        assert_eq!(
            shaped("-c 9000", &settings(3, "127.0.0.1:8080"), "0-7").unwrap(),
            pairs(&[("worker_defaults.context", "3000")])
        );
        assert!(matches!(
            shaped("-c 2 -np 4", &s, "0-1"),
            Err(FlagError::Conflict(_))
        ));
        assert!(matches!(
            shaped("-c 1", &s, "0-1"),
            Err(FlagError::Conflict(_))
        ));
    }

    #[test]
    fn threads_make_one_wide_worker() {
        let s = settings(0, "127.0.0.1:8080");
        assert_eq!(
            shaped("-t 2 -c 8192 -np 8", &s, "0-3").unwrap(),
            pairs(&[
                ("workers[0].cpus", "0-1"),
                ("workers[0].threads", "2"),
                ("worker_defaults.slots", "8"),
                ("worker_defaults.context", "8192"),
            ])
        );
        // More threads than CPUs: all of them.
        assert_eq!(
            shaped("-t 16", &s, "2-3").unwrap(),
            pairs(&[("workers[0].cpus", "2-3"), ("workers[0].threads", "2")])
        );
        // -t 1 keeps the pool.
        assert_eq!(shaped("-t 1", &s, "0-3").unwrap(), []);
        assert!(matches!(
            shaped("-t 4", &settings(2, "127.0.0.1:8080"), "0-3"),
            Err(FlagError::Conflict(_))
        ));
    }

    #[test]
    fn host_and_port_complete_the_configured_address() {
        let s = settings(0, "0.0.0.0:9000");
        let listen = |line: &str| shaped(line, &s, "0").unwrap();
        assert_eq!(
            listen("--port 8081"),
            pairs(&[("server.listen", "0.0.0.0:8081")])
        );
        assert_eq!(
            listen("--host 127.0.0.1"),
            pairs(&[("server.listen", "127.0.0.1:9000")])
        );
        assert_eq!(
            listen("--host ::1 --port 1"),
            pairs(&[("server.listen", "[::1]:1")])
        );
        assert_eq!(listen("--port 0"), pairs(&[("server.listen", "0.0.0.0:0")]));
        // Several hosts: one address each, on the same port (llama-server's `--host a,b`).
        assert_eq!(
            listen("--host 127.0.0.1,::1 --port 8090"),
            pairs(&[("server.listen", "127.0.0.1:8090,[::1]:8090")])
        );
        let several = settings(0, "127.0.0.1:7000,[::1]:7000");
        assert_eq!(
            shaped("--host 0.0.0.0", &several, "0").unwrap(),
            pairs(&[("server.listen", "0.0.0.0:7000")])
        );
    }

    #[test]
    fn chat_template_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jinja");
        std::fs::write(&path, "{{ messages }}").unwrap();
        let s = settings(0, "127.0.0.1:8080");
        let line = format!("--chat-template-file {}", path.display());
        assert_eq!(
            shaped(&line, &s, "0").unwrap(),
            pairs(&[("model.chat_template", "{{ messages }}")])
        );
        let line = format!("--chat-template-file {}", dir.path().join("none").display());
        assert!(shaped(&line, &s, "0").is_err());
    }

    #[test]
    fn overrides_load_into_settings() {
        let (_, flags) = split(
            "-c 4096 -np 4 -t 1 -b 256 -ub 128 -fa off -kvu -n 32 --temp 0.2 -s 7 --api-key k1,k2 --cors-origins http://a.example --port 18123 -ngl 0",
        )
        .unwrap();
        let base = crate::config::load_with_env(None, [], &[]).unwrap();
        let over = overrides(&flags, &base, &CpuList::parse("0-1").unwrap()).unwrap();
        let s = crate::config::load_with_env(None, [], &over).unwrap();
        let d = &s.worker_defaults;
        assert_eq!(
            (d.slots, d.context, d.n_batch, d.n_ubatch),
            (2, 2048, 256, 128)
        );
        assert_eq!(d.flash_attention.as_str(), "off");
        assert!(d.kv_unified);
        assert_eq!(s.server.listen, "127.0.0.1:18123");
        assert_eq!(s.server.api_keys, ["k1", "k2"]);
        assert_eq!(s.server.cors_origins, ["http://a.example"]);
        assert_eq!(s.generation.n_predict, Some(32));
        assert_eq!(s.generation.temperature, Some(0.2));
        assert_eq!(s.generation.seed, Some(7));
        let (_, flags) = split("-t 2").unwrap();
        let over = overrides(&flags, &base, &CpuList::parse("0-3").unwrap()).unwrap();
        let s = crate::config::load_with_env(None, [], &over).unwrap();
        let plans = s.plan_workers(&CpuList::parse("0-3").unwrap()).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(
            (plans[0].cpus.to_string(), plans[0].context.threads),
            ("0-1".into(), 2)
        );
    }
}
