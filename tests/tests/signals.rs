//! Signals to the router's whole process group, as Ctrl-C in a terminal sends them (and as
//! systemd's `KillMode=control-group` does to a whole cgroup): the router drains, its
//! workers are not killed by the same signal, an in-flight stream finishes at full length, and
//! nothing is left running afterwards.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use llamapool_testkit::binary;
use llamapool_tests::*;
use nix::sys::signal::{killpg, Signal};
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
