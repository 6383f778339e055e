//! The web page (`/`, `/ui`, `/ui/{file}`): its files over plain HTTP, then the page itself in
//! a real browser. The router runs with two SmolLM2 workers and an API key;
//! `tests/ui/web_ui_check.py` drives Debian's headless Chromium through Selenium (both
//! installed by `scripts/test`): the page asks for the key, lists both workers once it has
//! it, streams a chat answer token by token, stops a long one (and the server frees the
//! slot), drains and restarts a worker, and takes a screenshot of the whole page into
//! `target/web_ui/ui.png` (and `docs/ui.png` too when `LLAMAPOOL_UPDATE_SCREENSHOT=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llamapool_tests::*;

const KEY: &str = "ui-test-key";

fn config() -> String {
    TWO_WORKERS.replacen("[server]\n", &format!("[server]\napi_key = \"{KEY}\"\n"), 1)
}

/// The page and its files are served without the key, with their types and cache headers;
/// an unknown file is a 404 and the API still needs the key.
fn check_files(server: &Server) {
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
    ] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some(content_type), "GET {path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "GET {path}");
        let etag = r.header("etag").expect("an ETag").to_string();
        let again =
            http::request(&server.addr, "GET", path, &[("If-None-Match", &etag)], b"").unwrap();
        assert_eq!(again.status, 304, "GET {path} with its ETag");
    }
    let index = server.get("/").text();
    assert!(
        index.contains("ui/app.js") && index.contains("ui/style.css"),
        "{index}"
    );
    assert!(
        !index.contains("http://") && !index.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    assert_eq!(server.get("/ui/missing.js").status, 404);
    assert_eq!(server.get("/ui/").status, 308);
    assert_eq!(
        server.get("/workers").status,
        401,
        "the API still needs the key"
    );
}

/// Runs the browser script with a deadline; returns its output, or panics with it.
fn run_browser_check(server: &Server, shots: &[PathBuf]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/web_ui_check.py");
    assert!(
        Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists(),
        "Chromium is missing: scripts/test installs it (apt-get install chromium chromium-driver)"
    );
    let scratch = scratch_dir("web-ui").unwrap();
    let log_path = scratch.path().join("browser.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", server.addr))
        .arg(KEY)
        .args(shots)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("python3 runs");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !output.contains("No module named 'selenium'"),
        "the selenium package is missing: scripts/test installs it (python3 -m pip install selenium)"
    );
    match status {
        Some(s) if s.success() => output,
        Some(s) => panic!("the browser check failed ({s}):\n{output}"),
        None => panic!("the browser check ran over 300 s:\n{output}"),
    }
}

#[test]
fn the_web_page_lists_workers_streams_chat_stops_and_administers() {
    let server = Server::start(&config());
    check_files(&server);

    let out_dir = bin_dir().parent().expect("target/").join("web_ui");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut shots = vec![out_dir.join("ui.png")];
    if std::env::var_os("LLAMAPOOL_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        shots.push(workspace.join("docs/ui.png"));
    }
    let _ = std::fs::remove_file(&shots[0]);
    let output = run_browser_check(&server, &shots);
    println!("{output}");
    assert_eq!(output.lines().last(), Some("ok"), "{output}");
    let png = std::fs::read(&shots[0]).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot"
    );
}
