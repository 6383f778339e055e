//! llama-server's command line on `llamapool-router`: the plan `--check` prints for a
//! llama-server start line, a router started with llama-server's flags only (model, address,
//! context, slots, alias, API key) serving a chat completion, and an unsupported flag
//! refused with exit status 2.

use std::process::Command;
use std::time::Duration;

use llamapool_common::cpus::CpuList;
use llamapool_tests::*;
use serde_json::{json, Value};

/// The router's status for usage errors (`EXIT_USAGE` in router/src/main.rs).
const EXIT_USAGE: i32 = 2;

fn smol_path() -> String {
    models_dir()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        .display()
        .to_string()
}

/// A TCP port nothing listens on right now (bound and released).
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

fn router() -> Command {
    let mut c = Command::new(bin_dir().join("llamapool-router"));
    c.env("RUST_LOG", "warn");
    c
}

#[test]
fn check_prints_the_plan_of_a_llama_server_command_line() {
    let out = router()
        .args(["--check", "-m", &smol_path()])
        .args([
            "-c", "4096", "-np", "4", "-t", "1", "-b", "256", "-fa", "off",
        ])
        .args(["--port", "18123", "--metrics", "--no-webui"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("listen: 127.0.0.1:18123\n"), "{stdout}");
    assert!(
        stdout.contains("ignored: --metrics --no-webui\n"),
        "{stdout}"
    );
    let workers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("worker "))
        .collect();
    // The default pool: one pinned one-thread worker per allowed CPU, at least 4 slots in
    // all, each slot 4096 / 4 cells.
    assert_eq!(workers.len(), CpuList::allowed().len(), "{stdout}");
    let slots = 4u32.div_ceil(workers.len() as u32);
    for line in workers {
        let expected = format!(
            "threads 1 slots {slots} context {} n_batch 256 n_ubatch 512 flash_attention off",
            slots * 1024
        );
        assert!(line.contains(&expected), "{line}: want {expected}");
    }
}

#[test]
fn one_wide_worker_with_threads() {
    let allowed = CpuList::allowed();
    if allowed.len() < 2 {
        return;
    }
    let out = router()
        .args([
            "--check",
            "-m",
            &smol_path(),
            "-t",
            "2",
            "-c",
            "8192",
            "-np",
            "8",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let workers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("worker "))
        .collect();
    assert_eq!(workers.len(), 1, "{stdout}");
    assert!(
        workers[0].contains("threads 2 slots 8 context 8192"),
        "{stdout}"
    );
}

#[test]
fn serves_with_llama_server_flags_only() {
    let port = free_port();
    // At most two workers, whatever the machine: the router plans one per CPU it may use.
    let cpus: Vec<String> = CpuList::allowed()
        .cpus()
        .iter()
        .take(2)
        .map(ToString::to_string)
        .collect();
    let mut command = if std::path::Path::new("/usr/bin/taskset").exists() {
        let mut c = Command::new("/usr/bin/taskset");
        c.args(["-c", &cpus.join(",")])
            .arg(bin_dir().join("llamapool-router"));
        c
    } else {
        Command::new(bin_dir().join("llamapool-router"))
    };
    command
        .args(["-m", &smol_path(), "--host", "127.0.0.1", "--port", &port])
        .args(["-c", "4096", "-np", "4", "--api-key", "k1"])
        .args(["-a", "zed,smol2", "--tags", "chat,small"]);
    // The kit appends `--config FILE`; the file is empty, the flags do everything.
    let mut server = Router::launch_with(command, "").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.addr, format!("127.0.0.1:{port}"));
    server
        .wait_ready(Duration::from_secs(120), Some("Bearer k1"))
        .unwrap_or_else(|e| panic!("{e}"));
    let auth = [("Authorization", "Bearer k1")];
    let get = |path: &str| http::request(&server.addr, "GET", path, &auth, b"").unwrap();

    let models = get("/v1/models");
    assert_eq!(models.status, 200, "{}", models.text());
    // Several aliases: all listed, the first in alphabetical order is the id (llama-server's).
    let model = &models.json()["data"][0];
    assert_eq!(model["id"], "smol2");
    assert_eq!(model["aliases"], json!(["smol2", "zed"]));
    assert_eq!(model["tags"], json!(["chat", "small"]));
    assert_eq!(server.get("/v1/models").status, 401, "the key is needed");

    let workers = get("/workers").json();
    let workers = workers["workers"].as_array().unwrap().clone();
    let slots = 4u64.div_ceil(workers.len() as u64);
    for w in &workers {
        assert_eq!(w["slots"], slots, "{w}");
        assert_eq!(w["n_ctx_per_seq"], 1024, "{w}: 4096 cells over 4 slots");
    }

    let body = serde_json::to_vec(&json!({
        "model": "smol2",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    }))
    .unwrap();
    let reply = http::request(&server.addr, "POST", "/v1/chat/completions", &auth, &body).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply: Value = reply.json();
    assert_eq!(reply["model"], "smol2");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{reply}");
}

#[test]
fn unsupported_flags_exit_with_usage_status() {
    for flags in [
        &["-m", "m.gguf", "--lora", "a.gguf"][..],
        &["-hf", "org/model"],
        &["-np", "zero"],
        &["--listen", "127.0.0.1:0", "--port", "8080"],
    ] {
        let out = router().arg("--check").args(flags).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(flags[flags.len() - 2]),
            "{flags:?}: {stderr}"
        );
    }
    let out = router().args(["--check", "--lora", "a"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unsupported flag --lora") && stderr.contains("-np, --parallel"),
        "{stderr}"
    );
}

/// `--host` with several hosts (llama-server's `--host 127.0.0.1,::1`): the router serves each
/// address on the same port, with the same key.
#[test]
fn several_hosts_are_all_served() {
    let port = free_port();
    let mut command = router();
    command
        .args(["-m", &smol_path(), "-np", "2", "--api-key", "k2"])
        .args(["--host", "127.0.0.1,127.0.0.2", "--port", &port]);
    let mut server = Router::launch_with(command, "").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.addr, format!("127.0.0.1:{port}"));
    server
        .wait_ready(Duration::from_secs(120), Some("Bearer k2"))
        .unwrap_or_else(|e| panic!("{e}"));
    let auth = [("Authorization", "Bearer k2")];
    let body = serde_json::to_vec(&json!({"prompt": "Once upon a time", "max_tokens": 4})).unwrap();
    for addr in [format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")] {
        let health = http::request(&addr, "GET", "/health", &[], b"").unwrap();
        assert_eq!(health.status, 200, "{addr}: {}", health.text());
        let refused = http::request(&addr, "POST", "/v1/completions", &[], &body).unwrap();
        assert_eq!(refused.status, 401, "{addr}");
        let done = http::request(&addr, "POST", "/v1/completions", &auth, &body).unwrap();
        assert_eq!(done.status, 200, "{addr}: {}", done.text());
        assert_eq!(done.json()["usage"]["completion_tokens"], 4, "{addr}");
    }
}

/// A server whose stdout reader went away before the start-up lines (a script that read
/// nothing, or only the first line) keeps serving: writing them is not allowed to kill it.
#[test]
fn a_closed_stdout_does_not_stop_the_server() {
    let port = free_port();
    let mut child = router()
        .args(["-m", &smol_path(), "-np", "2"])
        .args(["--host", "127.0.0.1,127.0.0.2", "--port", &port])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let addr = format!("127.0.0.2:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let healthy = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the router exited: {status}");
        }
        if http::request(&addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        healthy && still_running,
        "healthy {healthy}, running {still_running}"
    );
}

#[test]
fn a_model_given_by_path_alone_is_named_after_its_file() {
    let dir = scratch_dir("alias").unwrap();
    let other = dir.path().join("my-model.Q4_1.gguf");
    std::os::unix::fs::symlink(smol_path(), &other).unwrap();
    let plan = |args: &[&str]| {
        let out = router().arg("--check").args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let other = other.display().to_string();
    assert!(plan(&["-m", &other]).contains("(alias my-model.Q4_1.gguf)"));
    assert!(plan(&["-m", &other, "--alias", "mine"]).contains("(alias mine)"));
    assert!(
        plan(&["-m", &smol_path()]).contains("(alias smollm2-135m-instruct)"),
        "the default model keeps its name"
    );
}
