//! The connection task against a scripted worker over an in-memory duplex pipe: the worker's
//! side speaks the real codec, so these tests see exactly the frames a real worker would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamapool_common::protocol::Prompt;
use llamapool_common::{
    Finish, FinishReason, RequestError, SamplingParams, StoppingParams, Timings, Usage,
};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

use super::*;
use crate::dispatch::Load;
use llamapool_common::protocol::WorkerStats;

type WorkerSide = Framed<DuplexStream, FrameCodec<ToWorker, FromWorker>>;

struct Harness {
    worker: WorkerSide,
    commands: mpsc::UnboundedSender<ConnCommand>,
    connection: JoinHandle<Vec<InFlight>>,
    load: Load,
    vitals: Arc<Vitals>,
}

/// A connection that pings every `ping_interval`.
fn harness_pinging(ping_interval: Duration) -> Harness {
    let (router_end, worker_end) = tokio::io::duplex(1 << 16);
    let (commands, rx) = mpsc::unbounded_channel();
    let vitals = Arc::new(Vitals::default());
    let shared = vitals.clone();
    let connection = tokio::spawn(async move {
        let metrics = Metrics::default();
        let watch = Watch {
            metrics: &metrics,
            vitals: &shared,
            ping_interval,
        };
        run(router_end, rx, watch).await
    });
    Harness {
        worker: Framed::new(worker_end, FrameCodec::new()),
        commands,
        connection,
        load: Arc::new(AtomicUsize::new(0)),
        vitals,
    }
}

/// A connection that does not ping during a test.
fn harness() -> Harness {
    harness_pinging(Duration::from_secs(3600))
}

fn flight(
    id: u64,
    generated: Vec<Token>,
    load: &Load,
) -> (InFlight, mpsc::UnboundedReceiver<StreamEvent>) {
    let (events, rx) = mpsc::unbounded_channel();
    let flight = InFlight {
        request: GenerateRequest {
            id: RequestId(id),
            request_id: String::new(),
            prompt: Prompt::Tokens(vec![1, 2, 3]),
            sampling: SamplingParams::greedy(),
            stopping: StoppingParams::default(),
            resumed: Vec::new(),
            report_progress: false,
        },
        events,
        generated,
        current: Arc::new(AtomicUsize::new(0)),
        moves: 0,
        ticket: Some(LoadTicket::take(load)),
        min_ctx: 0,
        prefix: Default::default(),
        probation: None,
        rebalanced: 0,
    };
    (flight, rx)
}

fn output(id: u64, tokens: Vec<Token>, finish: Option<Finish>) -> GenerationEvent {
    GenerationEvent::Output(SeqOutput {
        id: RequestId(id),
        text: format!("{tokens:?}"),
        tokens,
        finish,
        logprobs: Vec::new(),
        progress: None,
        parsed: false,
        chat: Vec::new(),
    })
}

fn finish(prompt_tokens: u32, completion_tokens: u32) -> Finish {
    Finish {
        reason: FinishReason::Length,
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        },
        timings: Timings::default(),
        stop_word: None,
    }
}

impl Harness {
    async fn received(&mut self) -> ToWorker {
        self.worker
            .next()
            .await
            .expect("the router side is open")
            .expect("a well-formed frame")
    }

    async fn emit(&mut self, events: Vec<GenerationEvent>) {
        self.worker.send(FromWorker::Events(events)).await.unwrap();
    }

    async fn submit(
        &mut self,
        id: u64,
        generated: Vec<Token>,
    ) -> mpsc::UnboundedReceiver<StreamEvent> {
        let (flight, rx) = flight(id, generated, &self.load);
        self.commands
            .send(ConnCommand::Generate(Box::new(flight)))
            .unwrap();
        rx
    }

    /// The worker hangs up; the connection hands back what it still owns.
    async fn worker_dies(self) -> (Vec<InFlight>, Load) {
        drop(self.worker);
        (self.connection.await.unwrap(), self.load)
    }
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<StreamEvent>) -> StreamEvent {
    rx.recv().await.expect("an event")
}

#[tokio::test]
async fn events_reach_their_request_in_order_and_a_finish_frees_the_load() {
    let mut h = harness();
    let mut rx = h.submit(1, Vec::new()).await;
    let ToWorker::Generate(request) = h.received().await else {
        panic!("expected Generate")
    };
    assert_eq!(request.id, RequestId(1));
    assert!(request.resumed.is_empty());
    assert_eq!(h.load.load(Ordering::Acquire), 1);
    h.emit(vec![
        GenerationEvent::Accepted { id: RequestId(1) },
        output(1, vec![7], None),
        output(1, vec![8], Some(finish(3, 2))),
    ])
    .await;
    assert_eq!(next_event(&mut rx).await, StreamEvent::Accepted);
    let StreamEvent::Output(first) = next_event(&mut rx).await else {
        panic!()
    };
    assert_eq!(first.tokens, vec![7]);
    let StreamEvent::Output(last) = next_event(&mut rx).await else {
        panic!()
    };
    assert_eq!(last.finish.unwrap().usage.completion_tokens, 2);
    assert_eq!(
        h.load.load(Ordering::Acquire),
        0,
        "the finish gave the load back"
    );
    let (orphans, _) = h.worker_dies().await;
    assert!(orphans.is_empty());
}

#[tokio::test]
async fn a_dead_worker_hands_back_its_requests_with_their_tokens() {
    let mut h = harness();
    let _rx1 = h.submit(1, Vec::new()).await;
    let _rx2 = h.submit(2, Vec::new()).await;
    h.received().await;
    h.received().await;
    h.emit(vec![output(1, vec![5, 6], None), output(2, vec![9], None)])
        .await;
    // Let the connection route the frame before the worker goes away.
    tokio::task::yield_now().await;
    let (mut orphans, load) = h.worker_dies().await;
    orphans.sort_by_key(|f| f.request.id);
    assert_eq!(orphans.len(), 2);
    assert_eq!(orphans[0].generated, vec![5, 6]);
    assert_eq!(orphans[1].generated, vec![9]);
    assert_eq!(
        load.load(Ordering::Acquire),
        2,
        "tickets move with the requests"
    );
    drop(orphans);
    assert_eq!(load.load(Ordering::Acquire), 0);
}

#[tokio::test]
async fn a_resumed_request_sends_its_tokens_and_usage_counts_them_as_generated() {
    let mut h = harness();
    let mut rx = h.submit(4, vec![10, 11]).await;
    let ToWorker::Generate(request) = h.received().await else {
        panic!("expected Generate")
    };
    assert_eq!(request.resumed, vec![10, 11]);
    // The new worker saw 3 prompt + 2 resumed tokens as its prompt, and generated 1.
    h.emit(vec![
        GenerationEvent::Accepted { id: RequestId(4) },
        output(4, vec![12], Some(finish(5, 1))),
    ])
    .await;
    assert_eq!(next_event(&mut rx).await, StreamEvent::Accepted);
    let StreamEvent::Output(last) = next_event(&mut rx).await else {
        panic!()
    };
    let usage = last.finish.unwrap().usage;
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 3));
}

#[tokio::test]
async fn aborts_reach_the_worker_and_free_the_load() {
    let mut h = harness();
    let _rx = h.submit(1, Vec::new()).await;
    h.received().await;
    h.commands.send(ConnCommand::Abort(RequestId(1))).unwrap();
    assert_eq!(
        h.received().await,
        ToWorker::Abort {
            ids: vec![RequestId(1)]
        }
    );
    assert_eq!(h.load.load(Ordering::Acquire), 0);
    // A second abort of the same id sends nothing more.
    h.commands.send(ConnCommand::Abort(RequestId(1))).unwrap();
    let mut rx = h.submit(2, Vec::new()).await;
    let ToWorker::Generate(request) = h.received().await else {
        panic!("the repeated abort must not reach the worker")
    };
    assert_eq!(request.id, RequestId(2));
    // A client that went away is noticed at its next output and aborted.
    rx.close();
    h.emit(vec![output(2, vec![1], None)]).await;
    assert_eq!(
        h.received().await,
        ToWorker::Abort {
            ids: vec![RequestId(2)]
        }
    );
}

#[tokio::test]
async fn a_rejection_ends_only_its_request() {
    let mut h = harness();
    let mut rx1 = h.submit(1, Vec::new()).await;
    let mut rx2 = h.submit(2, Vec::new()).await;
    h.received().await;
    h.received().await;
    h.emit(vec![
        GenerationEvent::Rejected {
            id: RequestId(1),
            error: RequestError::EmptyPrompt,
        },
        GenerationEvent::Accepted { id: RequestId(2) },
    ])
    .await;
    assert_eq!(
        next_event(&mut rx1).await,
        StreamEvent::Failed(RequestError::EmptyPrompt)
    );
    assert_eq!(next_event(&mut rx2).await, StreamEvent::Accepted);
    assert_eq!(h.load.load(Ordering::Acquire), 1);
}

#[tokio::test]
async fn a_malformed_frame_closes_the_connection_and_hands_back_its_requests() {
    let mut h = harness();
    let _rx = h.submit(1, Vec::new()).await;
    h.received().await;
    // A length prefix of 2, then bytes that are no message.
    h.worker
        .get_mut()
        .write_all(&[0, 0, 0, 2, 0xff, 0xff])
        .await
        .unwrap();
    let orphans = h.connection.await.unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].request.id, RequestId(1));
}

#[tokio::test]
async fn requests_queued_but_never_sent_are_handed_back_too() {
    let mut h = harness();
    let _rx = h.submit(1, Vec::new()).await;
    h.received().await;
    // The worker is gone before the next command is read (tests run on one thread, so the
    // connection task sees both only after this test's next await).
    drop(h.worker);
    let (flight2, _rx2) = flight(2, Vec::new(), &h.load);
    let _ = h.commands.send(ConnCommand::Generate(Box::new(flight2)));
    let orphans = h.connection.await.unwrap();
    let mut ids: Vec<u64> = orphans.iter().map(|f| f.request.id.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
}

#[tokio::test]
async fn control_calls_get_their_own_reply() {
    let mut h = harness();
    let (reply_tx, reply_rx) = oneshot::channel();
    h.commands
        .send(ConnCommand::Control {
            body: ControlCall::Detokenize { tokens: vec![1] },
            reply: reply_tx,
        })
        .unwrap();
    let ToWorker::Control { call, .. } = h.received().await else {
        panic!("expected a control call")
    };
    h.worker
        .send(FromWorker::Control {
            call,
            reply: ControlReply::Detokenized {
                content: "x".into(),
            },
        })
        .await
        .unwrap();
    assert_eq!(
        reply_rx.await.unwrap(),
        ControlReply::Detokenized {
            content: "x".into()
        }
    );
}

#[tokio::test]
async fn pings_go_out_and_progress_and_pongs_are_signs_of_life() {
    let mut h = harness_pinging(Duration::from_millis(20));
    let ToWorker::Ping { nonce } = h.received().await else {
        panic!("expected a ping")
    };
    let before = h.vitals.snapshot().alive_at;
    h.worker.send(FromWorker::Pong { nonce }).await.unwrap();
    let stats = WorkerStats {
        steps: 3,
        running: 1,
        ..WorkerStats::default()
    };
    h.worker.send(FromWorker::Progress(stats)).await.unwrap();
    // The next ping proves both frames were read before it.
    let ToWorker::Ping { nonce: next } = h.received().await else {
        panic!("expected a ping")
    };
    assert!(next > nonce);
    assert_eq!(h.vitals.stats(), Some(stats));
    assert!(h.vitals.snapshot().alive_at > before);
}
