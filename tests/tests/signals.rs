//! Signals to the router's whole process group, as Ctrl-C in a terminal sends them (and as
//! systemd's `KillMode=control-group` does to a whole cgroup): the router drains, its
//! workers are not killed by the same signal, an in-flight stream finishes at full length, and
//! nothing is left running afterwards. And the drain a gateway sees: SIGTERM or
//! `POST /admin/drain` turns `/health` and `/ready` to 503 at once, while the server goes on
//! serving for `server.drain_notice_secs` before it closes.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use llamapool_testkit::binary;
use llamapool_tests::*;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Processes (not zombies) whose process group is `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After "(comm)": state, ppid, pgrp, ...
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.get(2) == Some(&pgid.to_string().as_str()) && fields.first() != Some(&"Z") {
            members.push(pid);
        }
    }
    members
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "{what} {pid} is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigint_to_the_routers_process_group_finishes_the_stream_and_leaves_nothing_behind() {
    let mut command = Command::new(binary("llamapool-router").unwrap_or_else(|e| panic!("{e}")));
    // Its own process group, like a job started from an interactive shell.
    command.process_group(0);
    let mut router = Router::launch_with(command, &TWO_WORKERS).unwrap_or_else(|e| panic!("{e}"));
    router
        .wait_ready(Duration::from_secs(120), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let pgid = router.pid();
    let workers: Vec<u32> = router
        .workers()
        .iter()
        .map(|w| u32::try_from(w["pid"].as_u64().expect("pid")).unwrap())
        .collect();
    assert_eq!(workers.len(), 2);

    let max_tokens = 200;
    let body = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut reader = router.stream("/v1/chat/completions", &body);
    let first = reader.next_data().expect("a first chunk");
    killpg(Pid::from_raw(i32::try_from(pgid).unwrap()), Signal::SIGINT).expect("killpg");
    let mut payloads = vec![first];
    payloads.extend(reader.collect());

    assert_eq!(
        payloads.last().map(String::as_str),
        Some("[DONE]"),
        "the stream was cut: {:?}",
        payloads.iter().rev().take(3).collect::<Vec<_>>()
    );
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("not JSON ({e}): {p}")))
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "an error event: {chunks:?}"
    );
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish, vec!["length"]);
    let usage = &chunks.last().expect("a usage chunk")["usage"];
    assert_eq!(
        usage["completion_tokens"], max_tokens,
        "the stream ran to full length: {usage}"
    );

    wait_gone(pgid, "the router");
    for pid in workers {
        wait_gone(pid, "worker");
    }
    assert_eq!(
        group_members(pgid),
        Vec::<u32>::new(),
        "processes left in the router's group"
    );
}

/// Polls `path` until it answers `status`; panics after `within`.
fn wait_status(server: &Server, path: &str, status: u16, within: Duration) -> HttpResponse {
    let deadline = Instant::now() + within;
    loop {
        let r = server.get(path);
        if r.status == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The 503 a draining node answers its probes with: OpenAI's error shape, a `Retry-After`.
fn check_draining(server: &Server) {
    let r = wait_status(server, "/health", 503, Duration::from_secs(2));
    let body = r.json();
    assert_eq!(body["error"]["type"], "unavailable_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("draining"),
        "{body}"
    );
    assert!(r.header("retry-after").is_some());
    for path in ["/ready", "/v1/health"] {
        assert_eq!(server.get(path).status, 503, "{path}");
    }
}

#[test]
fn sigterm_turns_health_503_at_once_and_serves_new_requests_through_the_notice() {
    let mut server = Server::start(&smol_config("drain_notice_secs = 3", (4, 4096), PINNED_0));
    assert_eq!(server.get("/ready").status, 200);
    let mut body = chat("Count to fifty.", 150, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream("/v1/chat/completions", &body);
    let first = reader.next_data().expect("a first chunk");
    kill(
        Pid::from_raw(i32::try_from(server.pid()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    check_draining(&server);
    // Still listening and serving: a gateway that has not yet seen the 503 loses nothing.
    let r = server.post("/v1/chat/completions", &chat("Say hi.", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let mut payloads = vec![first];
    payloads.extend(reader.collect());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    let chunks = payloads
        .iter()
        .filter(|p| p.contains("\"content\""))
        .count();
    assert!(
        chunks >= 100,
        "the stream finished: {chunks} content chunks"
    );
    assert!(
        server.terminate(Duration::from_secs(60)),
        "the router exits after its drain"
    );
}

#[test]
fn post_admin_drain_drains_the_node_as_sigterm_does() {
    let server = Server::start(&smol_config("", (2, 2048), PINNED_0));
    let pid = server.pid();
    // A stream in flight keeps the notice going while the probes are checked.
    let mut body = chat("Count to fifty.", 300, true);
    body["ignore_eos"] = json!(true);
    let mut reader = server.stream("/v1/chat/completions", &body);
    let first = reader.next_data().expect("a first chunk");
    let r = server.post("/admin/drain", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"draining": true, "started_now": true}));
    check_draining(&server);
    let again = server.post("/admin/drain", &json!({}));
    assert_eq!(
        again.json(),
        json!({"draining": true, "started_now": false})
    );
    let mut payloads = vec![first];
    payloads.extend(reader.collect());
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    // Then nothing in flight and a probe told: the notice ends after a quiet second, and
    // the router exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the router did not exit after its drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
