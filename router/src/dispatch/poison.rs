//! Poison containment: which request a worker's death points to, and the requests refused
//! because they killed workers before.
//!
//! The supervisor classifies each death ([`DeathCause`]) and the pool hands the requests that
//! were in flight on the dead worker to [`PoisonRegistry::judge`], which returns a
//! [`Verdict`] per request. The policy (docs/RELIABILITY.md, "Poison requests"):
//!
//! - **An outside kill** (SIGKILL or SIGTERM the router did not send: the OOM killer, an
//!   operator, a chaos test) points to no request: every request moves on, spending nothing.
//! - **An inside death** (a crash signal such as SIGABRT or SIGSEGV, an exit of its own, a
//!   hang the watchdog killed) points to the requests in flight:
//!   - all of them of one fingerprint (one request, or the `n` choices of one): that
//!     fingerprint is convicted at once, so a lone poison costs one death;
//!   - else, if requests on probation (see below) had not yet produced their first token,
//!     they are convicted: they are the only thing new since the worker was last fine;
//!   - else every fingerprint present gets a strike; one with two strikes within
//!     [`PoisonPolicy::strike_window`] is convicted, and the rest go on probation.
//! - **Probation**: the suspects of a death are sent on one fingerprint at a time, the
//!   freshest (no token yet) first; the next goes when the previous produced a token or
//!   ended. A death while one is on probation convicts that one and clears the others.
//! - **A conviction** ends the request with a 500 naming the cause and the worker's last
//!   words, and refuses its fingerprint for [`PoisonPolicy::ttl`]: a dead-letter queue's
//!   "retry twice, then park the message", with the pool's workers as the consumers.
//!
//! The fingerprint ([`Fingerprint::of`]) is what the worker computes from: the prompt and the
//! sampling and stopping parameters, without the seed or the ids (the `n` choices of one
//! request, and a client's retries of it, share it).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llamapool_common::protocol::GenerateRequest;

/// What identifies a request's content across retries and choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    pub fn of(request: &GenerateRequest) -> Self {
        let mut sampling = request.sampling.clone();
        sampling.seed = None;
        let mut hasher = DefaultHasher::new();
        // serde_json of these plain types cannot fail; an error would hash as empty.
        serde_json::to_vec(&(&request.prompt, &sampling, &request.stopping))
            .unwrap_or_default()
            .hash(&mut hasher);
        Self(hasher.finish())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why a worker died, as far as it says who is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeathCause {
    /// Killed from outside (SIGKILL, SIGTERM, SIGHUP, SIGINT not sent by the router): no
    /// request is to blame.
    Outside(String),
    /// It crashed, exited, broke its connection or hung: the requests it ran are suspects.
    Inside(String),
}

impl DeathCause {
    /// Classifies how a worker ended. `hung`: the router's watchdog killed it (an inside
    /// death: a request can hang a worker); `status`: its exit status, if it was reaped.
    pub fn classify(status: Option<ExitStatus>, hung: bool) -> Self {
        if hung {
            return Self::Inside("it hung (no progress) and was killed".into());
        }
        let Some(status) = status else {
            return Self::Inside("its connection broke".into());
        };
        match status.signal() {
            Some(signal) => {
                let name = nix::sys::signal::Signal::try_from(signal)
                    .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string());
                match signal {
                    libc_signal::SIGKILL
                    | libc_signal::SIGTERM
                    | libc_signal::SIGHUP
                    | libc_signal::SIGINT => Self::Outside(format!("killed by {name}")),
                    _ => Self::Inside(format!("crashed with {name}")),
                }
            }
            None => Self::Inside(format!("exited with {status}")),
        }
    }

    pub fn description(&self) -> &str {
        match self {
            Self::Outside(d) | Self::Inside(d) => d,
        }
    }
}

/// Signal numbers, through `nix` (the router already depends on it).
mod libc_signal {
    use nix::sys::signal::Signal;
    pub const SIGKILL: i32 = Signal::SIGKILL as i32;
    pub const SIGTERM: i32 = Signal::SIGTERM as i32;
    pub const SIGHUP: i32 = Signal::SIGHUP as i32;
    pub const SIGINT: i32 = Signal::SIGINT as i32;
}

/// One request that was in flight on a worker that died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspect {
    pub fingerprint: Fingerprint,
    /// On probation and no token yet: sent on after an earlier death, not yet known fine.
    pub on_probation: bool,
}

/// What happens to one request of a dead worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It moves to another worker without spending anything; `probation`: one fingerprint
    /// at a time (see the module doc).
    Move { probation: bool },
    /// It is ended with this error and its fingerprint refused.
    Convicted(Conviction),
}

/// A fingerprint refused until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conviction {
    pub fingerprint: Fingerprint,
    /// How the worker died, and its last words.
    pub reason: String,
    pub until: Instant,
}

/// The poison policy's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoisonPolicy {
    /// How long a convicted fingerprint is refused (`server.poison_ttl_secs`).
    pub ttl: Duration,
    /// Two strikes within this window convict.
    pub strike_window: Duration,
}

impl Default for PoisonPolicy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            strike_window: Duration::from_secs(600),
        }
    }
}

/// Most fingerprints remembered (strikes or convictions); the oldest go first.
const MAX_REMEMBERED: usize = 4096;

#[derive(Debug, Default)]
struct Memory {
    /// Inside deaths each fingerprint was present at, and when the last was.
    strikes: HashMap<Fingerprint, (u32, Instant)>,
    convicted: HashMap<Fingerprint, Conviction>,
}

/// The strikes and convictions of one pool.
#[derive(Debug)]
pub struct PoisonRegistry {
    policy: PoisonPolicy,
    memory: Mutex<Memory>,
}

impl PoisonRegistry {
    pub fn new(policy: PoisonPolicy) -> Self {
        Self {
            policy,
            memory: Mutex::new(Memory::default()),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether any fingerprint is refused now (a cheap test before fingerprinting).
    pub fn has_convictions(&self) -> bool {
        !self.memory().convicted.is_empty()
    }

    /// The conviction refusing `fingerprint` now, if any.
    pub fn refusal(&self, fingerprint: Fingerprint, now: Instant) -> Option<Conviction> {
        let mut memory = self.memory();
        memory.convicted.retain(|_, c| c.until > now);
        memory.convicted.get(&fingerprint).cloned()
    }

    /// The verdicts for the requests in flight at one death, in their order.
    pub fn judge(
        &self,
        cause: &DeathCause,
        suspects: &[Suspect],
        last_words: &str,
        now: Instant,
    ) -> Vec<Verdict> {
        let DeathCause::Inside(how) = cause else {
            return vec![Verdict::Move { probation: false }; suspects.len()];
        };
        let reason = if last_words.is_empty() {
            format!("the worker running it {how}")
        } else {
            format!("the worker running it {how}; its last words: {last_words}")
        };
        let mut distinct: Vec<Fingerprint> = suspects.iter().map(|s| s.fingerprint).collect();
        distinct.sort_by_key(|f| f.0);
        distinct.dedup();
        let guilty: Vec<Fingerprint> = if distinct.len() == 1 {
            distinct.clone()
        } else if suspects.iter().any(|s| s.on_probation) {
            suspects
                .iter()
                .filter(|s| s.on_probation)
                .map(|s| s.fingerprint)
                .collect()
        } else {
            self.strike(&distinct, now)
        };
        // A death explained by a lone fingerprint or a probationer clears the others; one
        // that is not sends them on probation.
        let explained = !guilty.is_empty();
        let mut memory = self.memory();
        let verdicts = suspects
            .iter()
            .map(|s| {
                if guilty.contains(&s.fingerprint) {
                    let conviction = Conviction {
                        fingerprint: s.fingerprint,
                        reason: reason.clone(),
                        until: now + self.policy.ttl,
                    };
                    memory.strikes.remove(&s.fingerprint);
                    memory.convicted.insert(s.fingerprint, conviction.clone());
                    Verdict::Convicted(conviction)
                } else {
                    Verdict::Move {
                        probation: !explained,
                    }
                }
            })
            .collect();
        forget_oldest(&mut memory.convicted, |c| c.until);
        verdicts
    }

    /// Gives each fingerprint a strike; returns those that now have two.
    fn strike(&self, fingerprints: &[Fingerprint], now: Instant) -> Vec<Fingerprint> {
        let window = self.policy.strike_window;
        let mut memory = self.memory();
        memory
            .strikes
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= window);
        let guilty = fingerprints
            .iter()
            .filter(|f| {
                let entry = memory.strikes.entry(**f).or_insert((0, now));
                entry.0 += 1;
                entry.1 = now;
                entry.0 >= 2
            })
            .copied()
            .collect();
        forget_oldest(&mut memory.strikes, |(_, at)| *at);
        guilty
    }
}

/// Keeps a map within [`MAX_REMEMBERED`] entries by dropping the oldest by `age`.
fn forget_oldest<V>(map: &mut HashMap<Fingerprint, V>, age: impl Fn(&V) -> Instant) {
    while map.len() > MAX_REMEMBERED {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| *k) else {
            return;
        };
        map.remove(&oldest);
    }
}

/// The last lines a worker wrote to stderr, joined for an error message (at most 1 KiB).
pub fn last_words(lines: &[String]) -> String {
    let mut text = lines.join(" | ");
    if text.len() > 1024 {
        let mut cut = text.len() - 1024;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("…{}", &text[cut..]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suspect(f: u64) -> Suspect {
        Suspect {
            fingerprint: Fingerprint(f),
            on_probation: false,
        }
    }

    fn inside() -> DeathCause {
        DeathCause::Inside("crashed with SIGABRT".into())
    }

    fn registry() -> PoisonRegistry {
        PoisonRegistry::new(PoisonPolicy::default())
    }

    fn convicted(v: &[Verdict]) -> Vec<bool> {
        v.iter()
            .map(|v| matches!(v, Verdict::Convicted(_)))
            .collect()
    }

    #[test]
    fn exit_statuses_are_classified() {
        let killed = ExitStatus::from_raw(9);
        assert!(matches!(
            DeathCause::classify(Some(killed), false),
            DeathCause::Outside(d) if d.contains("SIGKILL")
        ));
        let aborted = ExitStatus::from_raw(6);
        assert!(matches!(
            DeathCause::classify(Some(aborted), false),
            DeathCause::Inside(d) if d.contains("SIGABRT")
        ));
        let exited = ExitStatus::from_raw(1 << 8);
        assert!(matches!(
            DeathCause::classify(Some(exited), false),
            DeathCause::Inside(_)
        ));
        // The watchdog's own SIGKILL is an inside death.
        assert!(matches!(
            DeathCause::classify(Some(killed), true),
            DeathCause::Inside(_)
        ));
    }

    #[test]
    fn an_outside_kill_blames_nobody() {
        let r = registry();
        let v = r.judge(
            &DeathCause::Outside("killed by SIGKILL".into()),
            &[suspect(1)],
            "",
            Instant::now(),
        );
        assert_eq!(v, vec![Verdict::Move { probation: false }]);
        assert!(!r.has_convictions());
    }

    #[test]
    fn a_lone_fingerprint_is_convicted_at_the_first_death() {
        let r = registry();
        let now = Instant::now();
        let v = r.judge(&inside(), &[suspect(7), suspect(7)], "GGML_ASSERT", now);
        assert_eq!(convicted(&v), [true, true]);
        let c = r.refusal(Fingerprint(7), now).expect("refused");
        assert!(c.reason.contains("SIGABRT") && c.reason.contains("GGML_ASSERT"));
        assert!(r.refusal(Fingerprint(8), now).is_none());
        // Refused for the ttl only.
        assert!(r
            .refusal(Fingerprint(7), now + Duration::from_secs(601))
            .is_none());
    }

    #[test]
    fn a_shared_batch_goes_on_probation_and_two_strikes_convict() {
        let r = registry();
        let now = Instant::now();
        let v = r.judge(&inside(), &[suspect(1), suspect(2)], "", now);
        assert_eq!(v, vec![Verdict::Move { probation: true }; 2]);
        // Both present again, none on probation any more: both have two strikes.
        let v = r.judge(&inside(), &[suspect(1), suspect(3)], "", now);
        assert_eq!(convicted(&v), [true, false]);
    }

    #[test]
    fn a_death_during_probation_convicts_the_probationer_only() {
        let r = registry();
        let now = Instant::now();
        r.judge(&inside(), &[suspect(1), suspect(2)], "", now);
        let mut probationer = suspect(2);
        probationer.on_probation = true;
        let v = r.judge(&inside(), &[suspect(1), probationer], "", now);
        assert_eq!(convicted(&v), [false, true]);
        assert_eq!(v[0], Verdict::Move { probation: false });
    }

    #[test]
    fn strikes_age_out() {
        let r = registry();
        let now = Instant::now();
        r.judge(&inside(), &[suspect(1), suspect(2)], "", now);
        let later = now + Duration::from_secs(700);
        let v = r.judge(&inside(), &[suspect(1), suspect(3)], "", later);
        assert_eq!(convicted(&v), [false, false]);
    }

    #[test]
    fn the_same_request_hashes_alike_whatever_its_seed_and_ids() {
        use llamapool_common::protocol::Prompt;
        use llamapool_common::{RequestId, SamplingParams, StoppingParams};
        let a = GenerateRequest {
            id: RequestId(1),
            request_id: "a".into(),
            prompt: Prompt::Text("hello".into()),
            sampling: SamplingParams::default(),
            stopping: StoppingParams::default(),
            resumed: Vec::new(),
            report_progress: false,
        };
        let mut b = a.clone();
        b.id = RequestId(2);
        b.request_id = "b".into();
        b.sampling.seed = Some(4);
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&b));
        b.prompt = Prompt::Text("hello!".into());
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&b));
    }

    #[test]
    fn last_words_are_capped() {
        let lines = vec!["x".repeat(2000), "the end".into()];
        let words = last_words(&lines);
        assert!(words.len() <= 1024 + 4 && words.ends_with("the end"));
    }
}
