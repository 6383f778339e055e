//! Processes the bench starts: workers, routers (through `llamapool-testkit`), and the busy
//! loop for `--interference`. Each is stopped when its guard is dropped.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llamapool_common::WorkerArgs;
use llamapool_testkit::{binary, Proc, Router};

/// Starts a worker process with `args` and waits for its socket.
pub fn start_worker(args: &WorkerArgs) -> Result<Proc> {
    let socket = &args.socket;
    let child = Command::new(binary("llamapool-worker")?)
        .args(args.to_args())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting llamapool-worker")?;
    let mut proc = Proc::new(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !socket.exists() {
        if let Some(status) = proc.try_wait()? {
            bail!("the worker exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("the worker did not bind its socket in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// Starts the router with `config` (TOML) and waits until every worker is ready.
pub fn start_router(config: &str) -> Result<Router> {
    let mut router = Router::launch(config)?;
    router.wait_ready(Duration::from_secs(300), None)?;
    Ok(router)
}

/// The competing process of `--interference`: this binary with `--busy-loop`, unpinned.
pub struct BusyLoop(#[allow(dead_code)] Proc);

impl BusyLoop {
    pub fn start() -> Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .arg("--busy-loop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the busy loop")?;
        Ok(Self(Proc::new(child)))
    }
}

pub fn spin_forever() -> ! {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
