//! The connection bounds against a small in-process route table over real loopback sockets;
//! no workers, no model. Timeouts are seconds, so each test takes a few.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant as StdInstant;

use axum::body::{Body, Bytes};
use axum::routing::get;
use futures_util::StreamExt;

use super::*;

#[test]
fn accept_errors_back_off_from_10ms_to_1s_and_log_once_per_burst() {
    let mut backoff = AcceptBackoff::default();
    assert_eq!(backoff.succeeded(), None);
    let delays: Vec<(u64, bool)> = (0..10)
        .map(|_| {
            let (delay, first) = backoff.failed();
            (delay.as_millis() as u64, first)
        })
        .collect();
    assert_eq!(
        delays,
        [
            (10, true),
            (20, false),
            (40, false),
            (80, false),
            (160, false),
            (320, false),
            (640, false),
            (1000, false),
            (1000, false),
            (1000, false)
        ]
    );
    for _ in 0..100 {
        assert_eq!(backoff.failed().0, Duration::from_secs(1));
    }
    assert_eq!(backoff.succeeded(), Some(110));
    assert_eq!(backoff.succeeded(), None);
    assert_eq!(backoff.failed(), (Duration::from_millis(10), true));
}

#[test]
fn idle_deadlines() {
    let since = Instant::now();
    let (first, idle) = (Duration::from_secs(2), Duration::from_secs(7));
    let fresh = Idle {
        in_flight: 0,
        started: false,
        since,
    };
    assert_eq!(fresh.deadline(first, idle), Some(since + first));
    let busy = Idle {
        in_flight: 1,
        started: true,
        since,
    };
    assert_eq!(busy.deadline(first, idle), None);
    let between = Idle {
        in_flight: 0,
        ..busy
    };
    assert_eq!(between.deadline(first, idle), Some(since + idle));
}

#[test]
fn limits_come_from_the_settings_and_are_at_least_one() {
    let defaults = ConnLimits::from_settings(&ServerSettings::default());
    assert_eq!(
        defaults,
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            max_h2_streams: 32,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    );
    let zeros = ConnLimits::from_settings(&ServerSettings {
        header_read_timeout_secs: 0,
        idle_timeout_secs: 0,
        write_timeout_secs: 0,
        max_connections: 0,
        ..ServerSettings::default()
    });
    assert_eq!(zeros.header_read_timeout, Duration::from_secs(1));
    assert_eq!(zeros.max_connections, 1);
}

/// Set when the value is dropped: tells a test that a response body went away.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A server on a runtime of its own with three routes: `/` answers `ok`; `/endless` streams
/// 1 KiB chunks forever and sets `dropped` when its body goes away; `/slow` streams five
/// chunks 400 ms apart.
struct TestServer {
    addr: SocketAddr,
    dropped: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl TestServer {
    fn start(limits: ConnLimits) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/endless",
                get(move || {
                    let guard = DropFlag(flag.clone());
                    let chunks = futures_util::stream::repeat(Bytes::from(vec![b'x'; 1024])).map(
                        move |chunk| {
                            let _ = &guard;
                            Ok::<_, Infallible>(chunk)
                        },
                    );
                    async move { Body::from_stream(chunks) }
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    let chunks = futures_util::stream::iter(0..5).then(|i| async move {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        Ok::<_, Infallible>(Bytes::from(format!("chunk{i};")))
                    });
                    Body::from_stream(chunks)
                }),
            );
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let graceful = GracefulShutdown::new();
            accept_loop(std::slice::from_ref(&listener), app, limits, &graceful).await;
        });
        Self {
            addr,
            dropped,
            _runtime: runtime,
        }
    }

    fn connect(&self) -> std::net::TcpStream {
        let stream = std::net::TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }
}

fn limits(header: u64, idle: u64, write: u64, max_connections: usize) -> ConnLimits {
    ConnLimits {
        header_read_timeout: Duration::from_secs(header),
        max_h2_streams: 32,
        idle_timeout: Duration::from_secs(idle),
        write_timeout: Duration::from_secs(write),
        max_connections,
    }
}

/// Sends a keep-alive GET and reads its response up to `until` in the body.
fn get_on(stream: &mut std::net::TcpStream, path: &str, until: &str) -> String {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(until) {
        let n = stream.read(&mut buf).expect("a response");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// How long until the server closes `stream` (EOF or reset), reading and dropping anything.
fn time_to_close(stream: &mut std::net::TcpStream) -> Duration {
    let start = StdInstant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
    }
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let server = TestServer::start(limits(30, 1, 30, 16));
    let mut conn = server.connect();
    get_on(&mut conn, "/", "ok");
    // A second request on the same connection resets the clock.
    std::thread::sleep(Duration::from_millis(600));
    get_on(&mut conn, "/", "ok");
    let closed_after = time_to_close(&mut conn);
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );
}

#[test]
fn a_response_in_flight_is_not_idle() {
    // The stream lasts 2 s, twice the idle timeout; it is not cut.
    let server = TestServer::start(limits(30, 1, 30, 16));
    let mut conn = server.connect();
    let response = get_on(&mut conn, "/slow", "chunk4;");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

#[test]
fn silent_and_trickling_connections_are_closed_after_header_read_timeout() {
    let server = TestServer::start(limits(1, 30, 30, 16));
    // Nothing sent: hyper-util is still sniffing the protocol, hyper's timer is not running.
    let mut silent = server.connect();
    let closed_after = time_to_close(&mut silent);
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "silent: {closed_after:?}"
    );
    // A head trickled a byte every 100 ms never completes in time.
    let mut trickle = server.connect();
    let start = StdInstant::now();
    for byte in b"GET / HTTP/1.1\r\nX-Slow: ".iter().cycle() {
        if trickle.write_all(&[*byte]).is_err() || start.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = start.elapsed() + time_to_close(&mut trickle);
    assert!(
        closed_after < Duration::from_secs(4),
        "trickle: {closed_after:?}"
    );
    // Meanwhile and afterwards the server answers.
    assert!(get_on(&mut server.connect(), "/", "ok").starts_with("HTTP/1.1 200"));
}

#[test]
fn a_client_that_does_not_read_is_cut_off_after_write_timeout() {
    let server = TestServer::start(limits(30, 30, 1, 16));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut client: std::net::TcpStream = socket.into();
    write!(client, "GET /endless HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    // The client reads nothing: the buffers fill within milliseconds, then the write stalls.
    let start = StdInstant::now();
    while !server.dropped.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the endless response is still being served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    // And the connection is gone: reading drains what was buffered, then ends.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = 0usize;
    let mut buf = [0u8; 65536];
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    assert!(
        received < 1024 * 1024,
        "{received} bytes: the server kept writing"
    );
}

#[test]
fn at_max_connections_the_server_stops_accepting_until_one_closes() {
    let server = TestServer::start(limits(30, 30, 30, 2));
    let mut first = server.connect();
    get_on(&mut first, "/", "ok");
    let mut second = server.connect();
    get_on(&mut second, "/", "ok");
    // The third is queued by the kernel: it connects, but nothing serves it.
    let mut third = server.connect();
    write!(third, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 1024];
    let err = third.read(&mut buf).expect_err("no answer at the cap");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = third.read(&mut buf).expect("served once a slot is free");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
