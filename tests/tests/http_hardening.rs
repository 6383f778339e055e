//! Issue 8, "nothing hangs, nothing floods", end to end: the real router and a real SmolLM2
//! worker against clients that trickle headers, sit idle, never read their streams, or ask
//! for more than the server will build. Loopback only; every wait is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

/// One worker on CPU 0 with `server` lines added to the `[server]` table.
fn one_worker(server: &str, slots: u32, context: u32) -> String {
    smol_config(
        &format!("max_body_bytes = 65536\n{server}"),
        (slots, context),
        PINNED_0,
    )
}

fn completion(prompt: Value, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "stream": stream, "ignore_eos": true})
}

/// True once the server has closed `conn` (EOF or reset); false while it is open.
/// `conn` must be non-blocking.
fn closed_by_server(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Reads one whole `Content-Length` response from a keep-alive connection.
fn read_response(conn: &mut TcpStream) -> HttpResponse {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if raw.len() >= split + 4 + length {
                return HttpResponse::parse(&raw).unwrap();
            }
        }
        let n = conn.read(&mut buf).expect("a response");
        assert!(n > 0, "closed mid-response");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// How long until the server closes a quiet connection (bounded by `limit`).
fn time_to_close(conn: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    match conn.read(&mut buf) {
        Ok(0) => start.elapsed(),
        Ok(n) => panic!(
            "unexpected bytes on an idle connection: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
            panic!("still open after {limit:?}")
        }
        Err(_) => start.elapsed(),
    }
}

#[test]
fn slowloris_connections_are_closed_after_the_header_timeout() {
    let server = Server::start(&one_worker("header_read_timeout_secs = 2", 2, 2048));
    let timeout = Duration::from_secs(2);
    let margin = Duration::from_millis(2500);
    // 80 connections trickle a never-ending head, a byte each every 250 ms.
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Padding: ";
    let mut conns: Vec<(TcpStream, Instant, Option<Duration>)> = (0..80)
        .map(|_| {
            let conn = TcpStream::connect(&server.addr).unwrap();
            conn.set_nonblocking(true).unwrap();
            (conn, Instant::now(), None)
        })
        .collect();
    let started = Instant::now();
    let served = std::thread::scope(|scope| {
        // Meanwhile a normal request is served.
        let normal = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            server.post("/v1/completions", &completion(json!("Hello"), 4, false))
        });
        let mut round = 0;
        while conns.iter().any(|c| c.2.is_none()) {
            assert!(
                started.elapsed() < timeout + margin + Duration::from_secs(2),
                "{} trickling connections still open after {:?}",
                conns.iter().filter(|c| c.2.is_none()).count(),
                started.elapsed()
            );
            for (conn, opened, closed) in conns.iter_mut().filter(|c| c.2.is_none()) {
                let byte = head.get(round).copied().unwrap_or(b'a');
                let _ = conn.write(&[byte]);
                if closed_by_server(conn) {
                    *closed = Some(opened.elapsed());
                }
            }
            round += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        normal.join().unwrap()
    });
    assert_eq!(served.status, 200, "{}", served.text());
    let slowest = conns.iter().filter_map(|c| c.2).max().unwrap();
    let fastest = conns.iter().filter_map(|c| c.2).min().unwrap();
    assert!(
        fastest >= timeout - Duration::from_millis(300),
        "closed before the timeout: {fastest:?}"
    );
    assert!(slowest <= timeout + margin, "closed late: {slowest:?}");
    // hyper's header timer also runs while a keep-alive connection waits for its next
    // request: an idle HTTP/1 connection goes after min(header_read, idle) = 2 s here.
    let mut idle = TcpStream::connect(&server.addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    let closed = time_to_close(&mut idle, Duration::from_secs(10));
    assert!(
        closed >= timeout - Duration::from_millis(300) && closed <= timeout + margin,
        "{closed:?}"
    );
    assert!(server.workers().iter().all(|w| w["restarts"] == 0));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = Server::start(&one_worker(
        "header_read_timeout_secs = 30\nidle_timeout_secs = 2",
        2,
        2048,
    ));
    let mut conn = TcpStream::connect(&server.addr).unwrap();
    let body = completion(json!("Hello"), 2, false).to_string();
    for _ in 0..2 {
        write!(
            conn,
            "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let r = read_response(&mut conn);
        assert_eq!(r.status, 200, "{}", r.text());
        // Within the idle timeout, the connection serves the next request.
        std::thread::sleep(Duration::from_millis(1200));
    }
    let closed = time_to_close(&mut conn, Duration::from_secs(10));
    // 1.2 s of the 2 s already passed after the last response.
    assert!(
        closed >= Duration::from_millis(500) && closed <= Duration::from_millis(3300),
        "{closed:?}"
    );
}

/// A streaming request from a client that never reads (a 4 KiB receive buffer, so the
/// server's side fills after a few dozen events).
fn never_reading_stream(addr: &str, body: &Value) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut conn: TcpStream = socket.into();
    let body = body.to_string();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    conn
}

#[test]
fn clients_that_never_read_lose_their_slots_after_the_write_timeout() {
    // Two slots and one queue place: three permits.
    let server = Server::start(&one_worker(
        "max_queued = 1\nwrite_timeout_secs = 3",
        2,
        2048,
    ));
    let write_timeout = Duration::from_secs(3);
    let long = completion(json!("Once upon a time"), 1000, true);
    let stalled: Vec<TcpStream> = (0..3)
        .map(|_| never_reading_stream(&server.addr, &long))
        .collect();
    // Capacity is exhausted: both slots run, the third request waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = &server.workers()[0];
        if w["running"] == 2 && w["in_flight"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "never filled: {w}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let full_at = Instant::now();
    let probe = completion(json!("Hi"), 2, false);
    let r = server.post("/v1/completions", &probe);
    assert_eq!(r.status, 429, "{}", r.text());
    // The permit is taken before the body is parsed: a full server does not parse.
    let r = server.request("POST", "/v1/completions", Some(&b"{not json"[..]));
    assert_eq!(r.status, 429, "{}", r.text());
    // Once the stalled streams have taken nothing for the write timeout, they are aborted
    // and a new request is served, though their clients are still connected.
    let served_after = loop {
        let r = server.post("/v1/completions", &probe);
        if r.status == 200 {
            break full_at.elapsed();
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(
            full_at.elapsed() < write_timeout + Duration::from_secs(15),
            "still full after {:?}",
            full_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Every slot and permit comes back (the queued stream ran, stalled and went too).
    let deadline = Instant::now() + write_timeout + Duration::from_secs(20);
    loop {
        let w = &server.workers()[0];
        if w["running"] == 0 && w["waiting"] == 0 && w["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "slots still held: {w}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The streams were cut, not finished: what the clients can still read ends without
    // `[DONE]`, long before 1000 tokens.
    for mut conn in stalled {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(!text.contains("[DONE]"), "a stalled stream completed");
        assert!(text.matches("data: ").count() < 900, "not cut short");
    }
    let w = &server.workers()[0];
    assert_eq!(w["restarts"], 0, "{w}");
    eprintln!("served again {served_after:?} after the pool filled");
}

#[test]
fn oversized_tokenize_results_and_token_prompts_are_refused_in_the_router() {
    let server = Server::start(&one_worker("max_tokenize_tokens = 1000", 4, 4096));
    let error_of = |r: &HttpResponse| r.json()["error"].clone();
    // /tokenize: within the limit it answers; beyond, a 400 naming `content`.
    let r = server.post("/tokenize", &json!({"content": "hello ".repeat(100)}));
    assert_eq!(r.status, 200, "{}", r.text());
    for with_pieces in [false, true] {
        let r = server.post(
            "/tokenize",
            &json!({"content": "hello ".repeat(3000), "with_pieces": with_pieces}),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        let e = error_of(&r);
        assert_eq!(e["param"], "content", "{e}");
        assert_eq!(e["type"], "invalid_request_error");
        assert!(e["message"].as_str().unwrap().contains("1000"), "{e}");
    }
    let r = server.post("/detokenize", &json!({"tokens": vec![1; 1001]}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r)["param"], "tokens");
    // A token prompt longer than the per-sequence context (1024): refused by the router.
    // Its ids are outside the vocabulary, so a worker would have answered "invalid token".
    let r = server.post(
        "/v1/completions",
        &completion(json!(vec![999_999; 1100]), 4, false),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let e = error_of(&r);
    assert_eq!(e["type"], "exceed_context_size_error", "{e}");
    assert_eq!(e["n_prompt_tokens"], 1100);
    assert_eq!(e["n_ctx"], 1024);
    // Shorter, the same ids reach the worker, which refuses them.
    let r = server.post(
        "/v1/completions",
        &completion(json!(vec![999_999; 10]), 4, false),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r)["type"], "invalid_request_error");
    // Unbounded sampling values are named.
    let mut body = completion(json!("Hi"), 2, false);
    body["logit_bias"] = json!({"12": -1e39});
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r)["param"], "logit_bias");
    // None of it cost the worker anything.
    let w = &server.workers()[0];
    assert_eq!(w["restarts"], 0, "{w}");
    assert_eq!(
        server
            .post("/v1/completions", &completion(json!("Hi"), 2, false))
            .status,
        200
    );
}

/// Opens a connection and sends a request head for a `/v1/completions` body of `length` bytes
/// plus its first `sent` bytes; the rest is the caller's to send (or not).
fn partial_post(addr: &str, length: usize, sent: &[u8]) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    conn.write_all(sent).unwrap();
    conn
}

#[test]
fn trickled_bodies_are_cut_at_the_body_deadline_and_held_bodies_have_a_budget() {
    // A small deadline for the test: 2 s (the default is 30 s). The body budget is two
    // bodies of max_body_bytes (65536).
    let server = Server::start(&one_worker(
        "body_read_timeout_secs = 2\nmax_buffered_body_bytes = 131072",
        2,
        2048,
    ));
    let deadline = Duration::from_secs(2);
    // 40 connections each promise a 1000-byte body and send a byte every 200 ms.
    // Each: the connection, when it opened, and once closed: after how long, with which status.
    type Trickler = (TcpStream, Instant, Option<(Duration, u16)>);
    let mut conns: Vec<Trickler> = (0..40)
        .map(|_| {
            let conn = partial_post(&server.addr, 1000, b"{");
            conn.set_nonblocking(true).unwrap();
            (conn, Instant::now(), None)
        })
        .collect();
    let started = Instant::now();
    let served = std::thread::scope(|scope| {
        let normal = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            let start = Instant::now();
            let r = server.post("/v1/completions", &completion(json!("Hello"), 4, false));
            (r, start.elapsed())
        });
        while conns.iter().any(|c| c.2.is_none()) {
            assert!(
                started.elapsed() < deadline + Duration::from_secs(5),
                "{} trickling bodies still open after {:?}",
                conns.iter().filter(|c| c.2.is_none()).count(),
                started.elapsed()
            );
            for (conn, opened, done) in conns.iter_mut().filter(|c| c.2.is_none()) {
                let _ = conn.write(b" ");
                let mut answer = Vec::new();
                let mut buf = [0u8; 4096];
                let closed = loop {
                    match conn.read(&mut buf) {
                        Ok(0) => break true,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                        Err(_) => break true,
                    }
                };
                if closed {
                    let status = HttpResponse::parse(&answer).map_or(0, |r| {
                        assert_eq!(r.json()["error"]["code"], "body_timeout", "{}", r.text());
                        r.status
                    });
                    *done = Some((opened.elapsed(), status));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        normal.join().unwrap()
    });
    assert_eq!(served.0.status, 200, "{}", served.0.text());
    let times: Vec<Duration> = conns.iter().map(|c| c.2.unwrap().0).collect();
    let (fastest, slowest) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    eprintln!(
        "40 trickled bodies: 408 and closed after {fastest:?} to {slowest:?}; a plain \
         completion meanwhile: 200 in {:?}",
        served.1
    );
    for c in &conns {
        assert_eq!(
            c.2.unwrap().1,
            408,
            "each trickler gets a 408 before the close"
        );
    }
    assert!(
        *fastest >= deadline - Duration::from_millis(300),
        "{fastest:?}"
    );
    assert!(
        *slowest <= deadline + Duration::from_millis(1500),
        "{slowest:?}"
    );

    // Two bodies of 60000 bytes, sent but for their last byte, hold 120000 of the 131072
    // bytes: a third body of 20000 bytes gets 503 at once, with Retry-After.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| partial_post(&server.addr, 60001, &[b' '; 60000]))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let big = completion(json!("Hello ".repeat(3000)), 1, false);
    let r = server.post("/v1/completions", &big);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "unavailable_error");
    // Small bodies still fit; once the held ones time out, the big one is served.
    let r = server.post("/v1/completions", &completion(json!("Hi"), 1, false));
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(deadline);
    drop(held);
    let r = server.post("/v1/completions", &big);
    assert_ne!(r.status, 503, "{}", r.text());
}

#[test]
fn http2_connections_advertise_the_stream_cap() {
    let server = Server::start(&one_worker("max_h2_streams = 7", 2, 2048));
    let mut conn = TcpStream::connect(&server.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The h2c prior-knowledge preface and an empty SETTINGS frame.
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut head = [0u8; 9];
    conn.read_exact(&mut head).unwrap();
    let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    assert_eq!(head[3], 4, "the server's first frame is its SETTINGS");
    let mut payload = vec![0u8; length];
    conn.read_exact(&mut payload).unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
    assert!(settings.contains(&(3, 7)), "{settings:?}");
}
