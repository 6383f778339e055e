//! The fuzz targets' runner, shared by `tests/fuzz_*.rs` and the router's
//! `src/openai/fuzz_tests.rs` (which includes this file by path): proptest's runner, run for a
//! case count or a time budget.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};

/// Runs `test` on values of `strategy`. With `LLAMAPOOL_FUZZ_SECONDS` set (scripts/fuzz), runs
/// batches of cases with fresh seeds until that many seconds have passed; otherwise
/// `LLAMAPOOL_FUZZ_CASES` cases, or `ci_cases`. Prints how many cases ran; a failure panics
/// with the minimal failing input proptest shrank it to.
pub fn fuzz<S>(name: &str, ci_cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let env = |key: &str| std::env::var(key).ok().and_then(|v| v.parse::<u64>().ok());
    let budget = env("LLAMAPOOL_FUZZ_SECONDS").map(Duration::from_secs);
    let batch = match (budget, env("LLAMAPOOL_FUZZ_CASES")) {
        (None, Some(cases)) => u32::try_from(cases).unwrap_or(u32::MAX),
        _ => ci_cases,
    };
    let start = Instant::now();
    let mut cases = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases: batch,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz: {name}: failed after {cases} cases: {e}");
        }
        cases += u64::from(batch);
        if budget.is_none_or(|b| start.elapsed() >= b) {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("fuzz: {name}: {cases} cases in {secs:.1} s");
}
