//! The external client of `--vs-llama-server --client python|both`: `bench/clients/stream_client.py`,
//! a Python 3 script using only the standard library (threads and `http.client`), run with
//! `python3` as a separate process, the way users drive servers. This module owns running it
//! and reading what it measured back into [`RequestRecord`]s and a wall time, so that
//! [`metrics::summarize`](llamapool_bench::metrics::summarize) reports it like the built-in
//! client's [`http_load`](crate::stages::http_load).
//!
//! The script is compiled into the binary (`include_str!`) and written to a private temporary
//! directory, so a moved binary still finds it. Each call of [`PythonClient::load`] starts a
//! fresh interpreter: its start-up is a short CPU spike just before the load, as with a real
//! client next to a server, and is deliberately kept; the wall time the script reports starts
//! at its first request, not at the process start. It sends the same request bodies as the
//! Rust client and counts tokens, TTFT and ITLs the same way (see the script's docstring).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use llamapool_bench::metrics::RequestRecord;
use llamapool_common::Token;
use llamapool_testkit::{scratch_dir, TempDir};
use serde::Deserialize;

/// The script itself.
const SCRIPT: &str = include_str!("../clients/stream_client.py");

/// The interpreter it runs with.
const PYTHON: &str = "python3";

/// The script written out once; removed with its directory when dropped.
pub struct PythonClient {
    script: PathBuf,
    _dir: TempDir,
}

impl PythonClient {
    /// Writes the script into a fresh private directory and checks that `python3` runs.
    pub fn new() -> Result<Self> {
        let dir = scratch_dir("python-client")?;
        let script = dir.path().join("stream_client.py");
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        let version = Command::new(PYTHON)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {PYTHON} (the python client needs Python 3)"))?;
        if !version.status.success() {
            bail!("{PYTHON} --version failed: {}", version.status);
        }
        Ok(Self { script, _dir: dir })
    }

    /// One load, as [`http_load`](crate::stages::http_load) runs it: a fresh `python3`
    /// process sends `prompts` (on its stdin) to `addr` from `concurrency` threads; the
    /// records in prompt order and the wall time from its first request to its last answer.
    pub fn load(
        &self,
        addr: &str,
        model: &str,
        prompts: &[Vec<Token>],
        concurrency: usize,
        max_tokens: u32,
    ) -> Result<(Vec<RequestRecord>, Duration)> {
        let input = serde_json::to_vec(prompts)?;
        let mut child = Command::new(PYTHON)
            .arg(&self.script)
            .arg(addr)
            .arg(model)
            .arg(concurrency.to_string())
            .arg(max_tokens.to_string())
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {PYTHON} {}", self.script.display()))?;
        // The script reads all of stdin before it writes anything, so this cannot deadlock.
        let mut stdin = child.stdin.take().context("the python client's stdin")?;
        stdin
            .write_all(&input)
            .context("sending the prompts to the python client")?;
        drop(stdin);
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("the python client failed: {}", output.status);
        }
        parse_output(&String::from_utf8_lossy(&output.stdout), prompts.len())
    }
}

/// What the script prints (times in seconds).
#[derive(Debug, Deserialize)]
struct Output {
    unit: String,
    wall_s: f64,
    /// `null` where a request never finished (a client thread died).
    records: Vec<Option<Record>>,
}

#[derive(Debug, Deserialize)]
struct Record {
    ok: bool,
    tokens: u32,
    ttft_s: f64,
    e2e_s: f64,
    itls_s: Vec<f64>,
}

fn seconds(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{what} of {s} s"))
}

/// The script's stdout as records (in prompt order) and the wall time; an error unless it
/// is one JSON object in seconds with `requests` records.
pub fn parse_output(stdout: &str, requests: usize) -> Result<(Vec<RequestRecord>, Duration)> {
    let output: Output = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "the python client's output is not its JSON report: {:?}",
            stdout.chars().take(300).collect::<String>()
        )
    })?;
    if output.unit != "s" {
        bail!(
            "the python client reported times in {:?}, not s",
            output.unit
        );
    }
    if output.records.len() != requests {
        bail!(
            "the python client reported {} requests, not {requests}",
            output.records.len()
        );
    }
    let records = output
        .records
        .into_iter()
        .map(|r| {
            let Some(r) = r else {
                return Ok(RequestRecord::default());
            };
            Ok(RequestRecord {
                ok: r.ok,
                tokens: r.tokens,
                ttft: seconds(r.ttft_s, "a TTFT")?,
                e2e: seconds(r.e2e_s, "an end-to-end time")?,
                itls: r
                    .itls_s
                    .iter()
                    .map(|&s| seconds(s, "an ITL"))
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((records, seconds(output.wall_s, "a wall time")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_scripts_report_in_seconds() {
        let stdout = r#"{"unit": "s", "wall_s": 2.5, "records": [
            {"ok": true, "tokens": 3, "ttft_s": 0.01, "e2e_s": 0.03, "itls_s": [0.008, 0.012]},
            {"ok": false, "tokens": 0, "ttft_s": 0.0, "e2e_s": 0.0, "itls_s": [], "error": "HTTP 503"},
            null
        ]}
"#;
        let (records, wall) = parse_output(stdout, 3).unwrap();
        assert_eq!(wall, Duration::from_millis(2500));
        assert_eq!(records.len(), 3);
        assert!(records[0].ok);
        assert_eq!(records[0].tokens, 3);
        assert_eq!(records[0].ttft, Duration::from_millis(10));
        assert_eq!(records[0].e2e, Duration::from_millis(30));
        assert_eq!(
            records[0].itls,
            [Duration::from_millis(8), Duration::from_millis(12)]
        );
        assert!(!records[1].ok);
        assert!(!records[2].ok);
        let report = llamapool_bench::metrics::summarize("x", "x", &records, wall);
        assert_eq!(report.failed, 2);
        assert_eq!(report.generated_tokens, 3);
        assert!((report.tpot_p50_ms - 10.0).abs() < 1e-9);
        assert!((report.itl_p99_ms - 12.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_a_report_that_does_not_fit() {
        let one = r#"{"unit": "s", "wall_s": 1.0, "records": [
            {"ok": true, "tokens": 1, "ttft_s": 0.1, "e2e_s": 0.1, "itls_s": []}]}"#;
        assert!(parse_output(one, 1).is_ok());
        assert!(parse_output(one, 2).is_err(), "a missing record");
        assert!(parse_output(&one.replace("\"s\"", "\"ms\""), 1).is_err());
        assert!(parse_output(&one.replace("0.1,", "-0.1,"), 1).is_err());
        assert!(parse_output("Traceback (most recent call last):", 1).is_err());
        assert!(parse_output("", 1).is_err());
    }

    /// The script's request body is the Rust client's, byte for byte (skipped without python3).
    #[test]
    fn the_script_sends_the_rust_clients_body() {
        let Ok(client) = PythonClient::new() else {
            eprintln!("no {PYTHON}: skipped");
            return;
        };
        let dir = client
            .script
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let code = format!(
            "import sys; sys.path.insert(0, {dir:?}); import stream_client; \
             sys.stdout.buffer.write(stream_client.completion_body('gemma', [2, 105, 7], 50))"
        );
        let out = Command::new(PYTHON).args(["-c", &code]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rust = crate::completion_body("gemma", [2, 105, 7], 50, true).to_string();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), rust);
    }

    #[test]
    fn the_script_is_embedded() {
        assert!(SCRIPT.starts_with("#!/usr/bin/env python3"));
        assert!(SCRIPT.contains("\"ignore_eos\": True"));
    }
}
