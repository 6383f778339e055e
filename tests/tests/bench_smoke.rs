//! The benchmark tool end to end on a tiny workload: every stage runs and the report is well
//! formed. No timing is asserted (machines here are noisy); only that the numbers exist.

use std::process::Command;

use llamapool_tests::*;
use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let model = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = Command::new(bin_dir().join("llamapool-bench"))
        .arg("--model")
        .arg(&model)
        .args([
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--prompt-tokens",
            "8",
            "--max-tokens",
            "8",
            "--json",
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("llamapool-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "llamapool-bench failed:\n{stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn check_row(row: &Value, generated: u64) {
    assert_eq!(row["failed"], 0, "{row}");
    assert_eq!(row["generated_tokens"], generated, "{row}");
    for key in [
        "tokens_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "itl_p99_ms",
        "wall_s",
    ] {
        let v = row[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {row}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v} in {row}");
    }
}

#[test]
fn every_stage_runs_and_reports() {
    let report = bench(&[]);
    let stages = report["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["0", "1", "2", "3", "4", "5"]);
    for row in stages {
        check_row(row, 32);
        assert!(row["vs_stage0"].as_f64().is_some());
    }
    assert_eq!(report["workload"]["requests"], 4);
}

#[test]
fn sweep_writes_json_and_svg_and_url_mode_measures_a_server() {
    let dir = scratch_dir("sweep").unwrap();
    let report = bench(&[
        "--sweep",
        "--levels",
        "1,2",
        "--stages",
        "0,2",
        "--out-dir",
        dir.path().to_str().unwrap(),
    ]);
    let rows = report["stages"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        // Per level the run has at least 4 × the level requests of 8 tokens.
        let c = row["concurrency"].as_u64().unwrap();
        check_row(row, 8 * 4.max(4 * c));
    }
    let svg = std::fs::read_to_string(dir.path().join("sweep.svg")).expect("sweep.svg");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("sweep.json")).unwrap())
            .unwrap();
    assert_eq!(json["stages"].as_array().unwrap().len(), 4);
    drop(dir);

    let server = Server::start(&TWO_WORKERS);
    let url = format!("http://{}", server.addr);
    let report = bench(&["--url", &url, "--served-model", "smol"]);
    let rows = report["stages"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["stage"], "url");
    check_row(&rows[0], 32);
}
