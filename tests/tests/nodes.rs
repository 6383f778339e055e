//! Several nodes behind a real gateway: `llamapool-bench --nodes 3` starts three real nodes
//! (one pinned worker each, SmolLM2) behind the Shepherd Model Gateway (`smg launch`, from
//! PyPI, installed by scripts/test) with its cache-aware policy and file-based discovery, and
//! runs the multi-turn chat workload through it: directly and through the gateway, then a
//! SIGTERM drain, a fourth node added to the discovery file, and a `kill -9`, each under
//! looping clients. This test checks the figures the run reports (docs/DEPLOYMENT.md).

use std::process::Command;

use llamapool_tests::*;
use serde_json::Value;

fn run_nodes_bench() -> Value {
    let model = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out_dir = scratch_dir("nodes-bench").expect("a scratch directory");
    let out = Command::new(bin_dir().join("llamapool-bench"))
        .arg("--model")
        .arg(&model)
        .args(["--nodes", "3", "--policies", "cache_aware"])
        .args([
            "--conversations",
            "6",
            "--turns",
            "3",
            "--system-tokens",
            "400",
        ])
        .args(["--reply-tokens", "16", "--concurrency", "3", "--json"])
        .arg("--out-dir")
        .arg(out_dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("llamapool-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "llamapool-bench --nodes failed:\n{stderr}"
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn three_nodes_behind_smg_keep_their_caches_and_lose_nothing_to_a_drain() {
    let report = run_nodes_bench();
    let rows = report["rows"].as_array().expect("rows");
    let (direct, gateway) = (&rows[0], &rows[1]);
    for row in [direct, gateway] {
        assert_eq!(row["failed"], 0, "{row}");
        assert_eq!(row["requests"], 18, "{row}");
    }
    // The gateway keeps each conversation on the node that holds its prefix.
    let single = f64_of(direct, "cache_hit_share_later_turns");
    let through = f64_of(gateway, "cache_hit_share_later_turns");
    assert!(single > 0.8, "one node caches later turns: {direct}");
    assert!(
        through >= single - 0.05,
        "cached share through the gateway {through:.3} vs one node {single:.3}"
    );

    // The gateway's cost in TTFT is measured (not asserted: machines here are noisy).
    let overhead = &report["gateway_overhead"];
    assert_eq!(overhead["samples"], 20, "{overhead}");
    assert!(f64_of(overhead, "ttft_p50_gateway_ms") > 0.0, "{overhead}");

    // SIGTERM: the node drains and exits, the gateway stops sending, no request fails.
    let drain = &report["drain"];
    assert!(
        drain["in_flight_at_sigterm"].as_u64().unwrap() > 0,
        "{drain}"
    );
    assert_eq!(drain["outcome"]["failed"], 0, "{drain}");
    assert!(
        drain["outcome"]["requests"].as_u64().unwrap() > 0,
        "{drain}"
    );
    assert!(f64_of(drain, "drain_s") < 60.0, "{drain}");
    assert_ne!(drain["gateway_status_after"], "ready", "{drain}");

    // A node added to the discovery file takes traffic within seconds.
    let added = &report["new_node"];
    assert!(f64_of(added, "ready_in_gateway_s") < 10.0, "{added}");
    assert!(f64_of(added, "first_request_s") < 30.0, "{added}");
    assert_eq!(added["outcome"]["failed"], 0, "{added}");

    // kill -9: at most the requests in flight on it fail, each with an error the client saw.
    let killed = &report["kill"];
    assert!(
        killed["in_flight_at_kill"].as_u64().unwrap() > 0,
        "{killed}"
    );
    let failed = killed["outcome"]["failed"].as_u64().unwrap();
    assert!(
        failed <= killed["in_flight_at_kill"].as_u64().unwrap(),
        "more failed than were in flight on the killed node: {killed}"
    );
    for error in killed["outcome"]["errors"].as_array().unwrap() {
        assert!(!error.as_str().unwrap().is_empty(), "{killed}");
    }
    assert_ne!(killed["gateway_status_after"], "ready", "{killed}");

    // The gateway's view matches the nodes': live ones ready, each sent exactly what it
    // answered, and the same load; dead ones out of its routing.
    for node in report["gateway_view"].as_array().unwrap() {
        if node["alive"] == true {
            assert_eq!(node["gateway_status"], "ready", "{node}");
            assert_eq!(
                node["gateway_sent"].as_f64(),
                node["node_answered"].as_f64(),
                "{node}"
            );
            assert_eq!(node["gateway_running"], node["node_running"], "{node}");
        } else {
            assert_ne!(node["gateway_status"], "ready", "{node}");
        }
    }
}
