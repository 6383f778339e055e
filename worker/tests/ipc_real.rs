//! The worker's connection code (`ipc::serve`) with the real SmolLM2 model and engine, over a
//! Unix socket pair, the test playing the router: progress pushed with every step, `Ping`
//! answered while a slow tokenization runs, and an `Abort` that overtakes its request.

#[allow(dead_code)]
mod support;

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::time::{SystemTime, UNIX_EPOCH};

use llamapool_common::codec;
use llamapool_common::protocol::{
    ControlCall, ControlReply, FromWorker, GenerateRequest, Prompt, ToWorker, WorkerInfo,
    WorkerStats, PROTOCOL_VERSION,
};
use llamapool_common::{FinishReason, GenerationEvent, RequestId, SamplingParams, StoppingParams};
use llamapool_worker::{ipc, ContextConfig};
use support::smollm2;

/// The router's end of a connection to a worker served by `ipc::serve` on a thread.
struct Peer {
    send: UnixStream,
    recv: BufReader<UnixStream>,
    buf: Vec<u8>,
    serving: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn start() -> Self {
        let model = smollm2();
        let backend = model
            .new_backend(&ContextConfig {
                slots: 2,
                context: 2048,
                n_batch: 256,
                n_ubatch: 256,
                threads: 1,
                ..ContextConfig::default()
            })
            .expect("context");
        let (engine, outbox) = ipc::spawn_engine(backend, None).expect("engine thread");
        let (router, worker) = UnixStream::pair().expect("socket pair");
        let info = WorkerInfo {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            cpus: Vec::new(),
            threads: 1,
            slots: 2,
            n_ctx_per_seq: 1024,
            model: model.info().clone(),
            embedding: None,
        };
        let serving = std::thread::spawn(move || {
            let send = worker.try_clone().expect("clone");
            let result = ipc::serve(
                worker,
                send,
                outbox,
                model,
                &ipc::Service::Generation(engine.handle.clone()),
                &info,
            );
            engine.stop(false);
            result.expect("the connection ends cleanly");
        });
        let mut peer = Self {
            recv: BufReader::new(router.try_clone().expect("clone")),
            send: router,
            buf: Vec::new(),
            serving: Some(serving),
        };
        peer.send(&ToWorker::Hello {
            version: PROTOCOL_VERSION,
        });
        assert!(matches!(peer.next(), FromWorker::Ready(_)));
        peer
    }

    fn send(&mut self, message: &ToWorker) {
        codec::write_frame(&mut self.send, message).expect("write");
    }

    fn next(&mut self) -> FromWorker {
        codec::read_frame(&mut self.recv, &mut self.buf)
            .expect("a frame")
            .expect("the worker is connected")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.send.shutdown(std::net::Shutdown::Both);
        if let Some(serving) = self.serving.take() {
            if serving.join().is_err() && !std::thread::panicking() {
                panic!("serving the connection failed");
            }
        }
    }
}

fn generate(id: u64, text: &str, max_tokens: u32) -> ToWorker {
    ToWorker::Generate(GenerateRequest {
        id: RequestId(id),
        request_id: format!("test-{id}"),
        prompt: Prompt::Text(text.into()),
        sampling: SamplingParams::greedy(),
        stopping: StoppingParams {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..StoppingParams::default()
        },
        resumed: Vec::new(),
        report_progress: false,
    })
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn every_step_pushes_progress_right_after_its_events() {
    let mut peer = Peer::start();
    let start = now_ms();
    peer.send(&generate(1, "Count: one, two,", 12));
    let mut tokens = 0;
    let mut progress: Vec<WorkerStats> = Vec::new();
    let mut finished = false;
    while !finished {
        let FromWorker::Events(events) = peer.next() else {
            panic!("only events and their progress were expected");
        };
        for event in events {
            match event {
                GenerationEvent::Output(o) => {
                    tokens += o.tokens.len();
                    finished |= o.finish.is_some();
                }
                GenerationEvent::Accepted { .. } => {}
                GenerationEvent::Rejected { error, .. } => panic!("rejected: {error}"),
            }
        }
        // Every one of these iterations stepped: its progress is the next frame.
        match peer.next() {
            FromWorker::Progress(stats) => progress.push(stats),
            other => panic!("expected Progress after the events, got {other:?}"),
        }
    }
    assert_eq!(tokens, 12);
    assert_eq!(progress.len(), 12, "one step per token: {progress:?}");
    for pair in progress.windows(2) {
        assert_eq!(pair[1].steps, pair[0].steps + 1);
        assert!(pair[1].last_step_unix_ms >= pair[0].last_step_unix_ms);
    }
    assert!(progress[0].last_step_unix_ms >= start);
    assert!(progress[..11]
        .iter()
        .all(|s| (s.running, s.waiting) == (1, 0)));
    let last = progress.last().unwrap();
    assert_eq!(
        (last.running, last.waiting),
        (0, 0),
        "the step that finished the last request reports an empty worker"
    );
    assert_eq!(last.decode_calls, last.steps);
}

#[test]
fn ping_and_abort_do_not_wait_behind_a_slow_tokenization() {
    let mut peer = Peer::start();
    // Megabytes to tokenize keep the prepare thread busy; the Generate queues behind them.
    let content = "word ".repeat(800_000);
    peer.send(&ToWorker::Control {
        call: 1,
        body: ControlCall::Tokenize {
            content,
            add_special: false,
            with_pieces: false,
        },
    });
    peer.send(&generate(2, "Tell me a long story.", 200));
    peer.send(&ToWorker::Abort {
        ids: vec![RequestId(2)],
    });
    peer.send(&ToWorker::Ping { nonce: 7 });
    let mut frames = Vec::new();
    let mut got_reply = false;
    let mut cancelled = false;
    while !(got_reply && cancelled) {
        let frame = peer.next();
        match &frame {
            FromWorker::Control { call: 1, reply } => {
                assert!(
                    matches!(reply, ControlReply::Tokenized { tokens, .. } if tokens.len() >= 800_000)
                );
                got_reply = true;
            }
            FromWorker::Events(events) => {
                cancelled |= events.iter().any(GenerationEvent::is_final);
            }
            _ => {}
        }
        frames.push(frame);
    }
    // Answered by the reader while the prepare thread tokenized.
    assert_eq!(
        frames.first(),
        Some(&FromWorker::Pong { nonce: 7 }),
        "the Pong came first: {:?}",
        frames
            .iter()
            .map(std::mem::discriminant)
            .collect::<Vec<_>>()
    );
    // The aborted request never reached the engine: no step, no load, no token.
    let events: Vec<GenerationEvent> = frames
        .iter()
        .filter_map(|f| match f {
            FromWorker::Events(events) => Some(events.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], GenerationEvent::Accepted { id: RequestId(2) });
    match &events[1] {
        GenerationEvent::Output(o) => {
            assert!(o.tokens.is_empty());
            let finish = o.finish.as_ref().expect("final");
            assert_eq!(finish.reason, FinishReason::Cancelled);
            assert_eq!(finish.usage.completion_tokens, 0);
        }
        other => panic!("expected the cancelled finish, got {other:?}"),
    }
    assert!(!frames.iter().any(|f| matches!(f, FromWorker::Progress(_))));
    // Nothing else is on its way: the next frame is the answer to the next ping.
    peer.send(&ToWorker::Ping { nonce: 8 });
    assert_eq!(peer.next(), FromWorker::Pong { nonce: 8 });
}

#[test]
fn grammars_a_router_did_not_check_are_refused_and_the_worker_serves_on() {
    let mut peer = Peer::start();
    let with_grammar = |id: u64, grammar: String| {
        let mut request = generate(id, "Is the sky blue?", 4);
        if let ToWorker::Generate(r) = &mut request {
            r.sampling.grammar = Some(grammar);
            r.stopping.ignore_eos = false;
        }
        request
    };
    let rejection = |peer: &mut Peer| match peer.next() {
        FromWorker::Events(events) => match events.as_slice() {
            [GenerationEvent::Rejected { error, .. }] => error.clone(),
            other => panic!("expected one rejection, got {other:?}"),
        },
        other => panic!("expected events, got {other:?}"),
    };
    // What aborted every worker: 100 000 nested groups (llama.cpp's parser's recursion
    // overflowed the engine thread's stack). The pre-check refuses it unparsed.
    let depth = 100_000;
    let bomb = format!("root ::= {}\"a\"{}", "(".repeat(depth), ")".repeat(depth));
    let error = rejection_of(&mut peer, with_grammar(1, bomb), rejection);
    assert!(error.contains("128 deep"), "{error}");
    // A grammar only llama.cpp can refuse (left recursion), refused on the prepare thread.
    let error = rejection_of(
        &mut peer,
        with_grammar(2, "root ::= root \"a\"".into()),
        rejection,
    );
    assert!(error.contains("not valid GBNF"), "{error}");
    assert!(!error.contains('\n'), "{error}");
    // The worker goes on: a grammar it can use constrains the next request.
    peer.send(&with_grammar(3, "root ::= \"yes\" | \"no\"".into()));
    let mut text = String::new();
    loop {
        match peer.next() {
            FromWorker::Events(events) => {
                for event in events {
                    match event {
                        GenerationEvent::Output(o) => {
                            text.push_str(&o.text);
                            if o.finish.is_some() {
                                assert!(text == "yes" || text == "no", "{text:?}");
                                return;
                            }
                        }
                        GenerationEvent::Accepted { .. } => {}
                        GenerationEvent::Rejected { error, .. } => panic!("rejected: {error}"),
                    }
                }
            }
            FromWorker::Progress(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn rejection_of(
    peer: &mut Peer,
    request: ToWorker,
    rejection: impl Fn(&mut Peer) -> llamapool_common::RequestError,
) -> String {
    peer.send(&request);
    match rejection(peer) {
        llamapool_common::RequestError::InvalidParam { param, message } => {
            assert_eq!(param, "grammar");
            message
        }
        other => panic!("expected an invalid grammar, got {other:?}"),
    }
}
