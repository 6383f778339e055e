//! Adaptive workers (the default layout): the real router and workers, SmolLM2. `/workers`
//! shows each worker's wide shape, and a process that keeps a CPU busy makes every worker
//! unpackable within a few measurement windows, so that requests spread over the pool.
//! One test function, so that no other router of this binary runs meanwhile (each would be a
//! foreign process to the other). That the first worker is packable on a quiet machine is
//! waited for but not required (the machine may be busy); that a busy neighbour makes every
//! worker unpackable is.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::Value;

/// A config without `[[workers]]`: one adaptive worker per allowed CPU.
fn default_layout(extra: &str) -> String {
    smol_config("", (2, 2048), &[]) + extra
}

/// Keeps one CPU busy until dropped.
struct BusyLoop(Child);

impl BusyLoop {
    fn start() -> Self {
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("sh"),
        )
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn allowed_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[test]
fn the_default_layout_is_adaptive_and_a_busy_neighbour_makes_it_unpackable() {
    fixed_workers_when_adaptive_is_false();
    if allowed_cpus() < 2 {
        eprintln!("one CPU: the default layout has a single fixed worker; nothing to test");
        return;
    }
    let server = Server::start(&default_layout(""));
    let workers = server.workers();
    assert_eq!(workers.len(), allowed_cpus());
    for w in &workers {
        assert_eq!(w["threads"], 1, "{w}");
        assert!(w["wide_cpus"].is_string(), "{w}");
        assert_eq!(w["wide_threads"], allowed_cpus(), "{w}");
    }
    // A request works whatever the shape.
    let r = server.post("/v1/chat/completions", &chat("Say hi.", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    let packable = |w: &Value| w["packable"].as_bool();
    let quiet_seen = wait_for(Duration::from_secs(15), || {
        packable(&server.workers()[0]) == Some(true)
    });
    if !quiet_seen {
        eprintln!(
            "the machine is busy: worker 0 never reported packable; checking only the busy side"
        );
    }
    // One busy loop per CPU leaves no doubt: every worker reports it is crowded.
    let loops: Vec<BusyLoop> = (0..allowed_cpus()).map(|_| BusyLoop::start()).collect();
    let crowded = wait_for(Duration::from_secs(20), || {
        server.workers().iter().all(|w| packable(w) == Some(false))
    });
    assert!(
        crowded,
        "still packable under busy loops: {:?}",
        server.workers()
    );
    // Crowded, the pool still serves.
    let r = server.post("/v1/chat/completions", &chat("Say hi.", 4, false));
    assert_eq!(r.status, 200, "{}", r.text());
    drop(loops);
}

/// Polls `done` every 200 ms until it holds or `timeout` passes.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// `worker_defaults.adaptive = false`: fixed one-thread workers, no wide shape reported.
fn fixed_workers_when_adaptive_is_false() {
    let server = Server::start(&default_layout("adaptive = false\n"));
    for w in server.workers() {
        assert!(w["wide_cpus"].is_null(), "{w}");
        assert!(w["packable"].is_null(), "{w}");
    }
}
