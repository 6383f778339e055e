//! Several models in one router, end to end: the real router with SmolLM2 and Gemma 3 270M
//! (both fetched by `scripts/setup`) as `[[models]]` or llama-server's `--models-dir`, each
//! loaded on demand by the first request that names it, unloaded to make room under
//! `models_max`, never while it has requests in flight, and a broken model failing alone.

use std::time::{Duration, Instant};

use llamapool_tests::*;
use serde_json::{json, Value};

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

/// A config of several models: `server` holds more `[server]` lines, `models` the `[[models]]`
/// tables' lines.
fn config(server: &str, models: &[&str]) -> String {
    let mut config = format!("[server]\nlisten = \"127.0.0.1:0\"\n{server}\n");
    for model in models {
        config.push_str(&format!("[[models]]\n{model}\n"));
    }
    config
}

/// SmolLM2 as `smol` and Gemma as `gemma`, each on one worker with `slots` slots.
fn smol_and_gemma(server: &str, smol_extra: &str, slots: u32) -> String {
    config(
        server,
        &[
            &format!(
                "alias = \"smol\"\npath = \"{SMOL}\"\n{smol_extra}\nworker_defaults = {{ slots = {slots}, context = 2048 }}"
            ),
            &format!(
                "alias = \"gemma\"\npath = \"{GEMMA}\"\nworker_defaults = {{ slots = {slots}, context = 2048 }}"
            ),
        ],
    )
}

fn chat_to(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// Each model's status, by id.
fn statuses(server: &Router) -> Vec<(String, String)> {
    let models = server.get("/v1/models");
    assert_eq!(models.status, 200, "{}", models.text());
    models.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["status"]["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn status_of(server: &Router, id: &str) -> String {
    statuses(server)
        .into_iter()
        .find(|(m, _)| m == id)
        .unwrap_or_else(|| panic!("{id} is not listed"))
        .1
}

/// Waits until `id`'s status is `status` (panics after `within`).
fn wait_status(server: &Router, id: &str, status: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while status_of(server, id) != status {
        assert!(
            Instant::now() < deadline,
            "{id} never became {status}: {:?}",
            statuses(server)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn answer_of(response: &HttpResponse) -> String {
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn both_models_are_served_by_name_and_load_on_demand() {
    let server = Server::launch(&smol_and_gemma("models_max = 2", "", 2));
    assert_eq!(
        statuses(&server),
        [
            ("smol".to_string(), "unloaded".to_string()),
            ("gemma".to_string(), "unloaded".to_string())
        ],
        "nothing loads before it is asked for"
    );
    let smol = server.post("/v1/chat/completions", &chat_to("smol", 8, false));
    assert_eq!(smol.json()["model"], "smol");
    assert!(!answer_of(&smol).is_empty());
    assert_eq!(status_of(&server, "smol"), "loaded");
    assert_eq!(status_of(&server, "gemma"), "unloaded");
    let gemma = server.post("/v1/chat/completions", &chat_to("gemma", 8, false));
    assert_eq!(gemma.json()["model"], "gemma");
    answer_of(&gemma);
    // Both stay loaded (models_max = 2), and each answers as itself, the same text again.
    assert_eq!(status_of(&server, "smol"), "loaded");
    let again = server.post("/v1/chat/completions", &chat_to("smol", 8, false));
    assert_eq!(
        answer_of(&again),
        answer_of(&smol),
        "greedy: the same model"
    );
    // The native route and a streamed request name their model too.
    let native = server.post(
        "/completion",
        &json!({"model": "gemma", "prompt": "Hello", "n_predict": 4}),
    );
    assert_eq!(native.status, 200, "{}", native.text());
    let events = server
        .stream("/v1/chat/completions", &chat_to("gemma", 4, true))
        .collect();
    assert!(events.last().is_some_and(|e| e == "[DONE]"), "{events:?}");
    // An unknown name is a 404 in the OpenAI shape, listing what exists.
    let unknown = server.post("/v1/chat/completions", &chat_to("gpt-4o", 4, false));
    assert_eq!(unknown.status, 404);
    let error = &unknown.json()["error"];
    assert_eq!(error["code"], "model_not_found");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("smol") && message.contains("gemma"),
        "{message}"
    );
    // `?model=` on GET routes.
    let props = server.get("/props?model=gemma");
    assert_eq!(props.status, 200);
    assert!(
        props.json()["model_path"]
            .as_str()
            .unwrap()
            .ends_with(GEMMA),
        "{}",
        props.text()
    );
    // Every request metric carries its model.
    let metrics = server.get("/metrics").text();
    for line in [
        "llamacpp:requests_total{model=\"smol\"} 2",
        "llamacpp:requests_total{model=\"gemma\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let helps = metrics
        .lines()
        .filter(|l| {
            l.starts_with("# HELP llamacpp:requests_total")
                || l.starts_with("# HELP llamacpp:requests ")
        })
        .count();
    assert_eq!(helps, 1, "one family, once:\n{metrics}");
}

#[test]
fn a_busy_model_is_not_evicted_and_the_other_request_waits() {
    let server = Server::launch(&smol_and_gemma("models_max = 1", "", 2));
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    // A long smol stream holds smol; gemma's request must wait for it, not end it.
    let mut stream = server.stream("/v1/chat/completions", &chat_to("smol", 120, true));
    let first = stream.next_data().expect("the stream started");
    assert!(first.contains("chat.completion.chunk"), "{first}");
    let addr = server.addr.clone();
    let waiting = std::thread::spawn(move || {
        let started = Instant::now();
        let body = serde_json::to_vec(&chat_to("gemma", 4, false)).unwrap();
        let response = http::request(&addr, "POST", "/v1/chat/completions", &[], &body).unwrap();
        (response, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_of(&server, "smol"), "loaded", "busy: not evicted");
    assert_eq!(status_of(&server, "gemma"), "unloaded", "waiting for room");
    let mut events = vec![first];
    events.extend(stream.collect());
    let finish: Vec<&String> = events
        .iter()
        .filter(|e| e.contains("\"finish_reason\":\"length\""))
        .collect();
    assert_eq!(finish.len(), 1, "smol's stream ran to its end: {events:?}");
    let (gemma, waited) = waiting.join().unwrap();
    assert_eq!(gemma.status, 200, "{}", gemma.text());
    assert_eq!(gemma.json()["model"], "gemma");
    assert!(
        waited > Duration::from_millis(300),
        "it waited for smol: {waited:?}"
    );
    assert_eq!(
        status_of(&server, "smol"),
        "unloaded",
        "then smol made room"
    );
    assert_eq!(status_of(&server, "gemma"), "loaded");
    // And back: alternating traffic swaps each time, nothing fails.
    for model in ["smol", "gemma", "smol"] {
        let response = server.post("/v1/chat/completions", &chat_to(model, 4, false));
        assert_eq!(response.status, 200, "{model}: {}", response.text());
        assert_eq!(response.json()["model"], model);
    }
    let loaded: Vec<String> = statuses(&server)
        .into_iter()
        .filter(|(_, s)| s == "loaded")
        .map(|(m, _)| m)
        .collect();
    assert_eq!(loaded, ["smol"], "at most models_max loaded");
}

#[test]
fn a_broken_model_fails_alone() {
    let dir = scratch_dir("models").unwrap();
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF\x03\0\0\0 this is not a model").unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let smol_bytes = std::fs::read(models_dir().join(SMOL)).unwrap();
    std::fs::write(&truncated, &smol_bytes[..smol_bytes.len() / 3]).unwrap();
    let server = Server::launch(&config(
        "models_max = 3",
        &[
            &format!("alias = \"smol\"\npath = \"{SMOL}\"\nworkers = [{{ cpus = \"0\" }}]"),
            &format!("alias = \"broken\"\npath = \"{}\"", broken.display()),
            "alias = \"missing\"\npath = \"/nonexistent/model.gguf\"",
            &format!(
                "alias = \"truncated\"\npath = \"{}\"\nworkers = [{{ cpus = \"1\" }}]",
                truncated.display()
            ),
        ],
    ));
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    for name in ["broken", "missing", "truncated"] {
        let response = server.post("/v1/chat/completions", &chat_to(name, 4, false));
        assert_eq!(response.status, 500, "{name}: {}", response.text());
        let error = &response.json()["error"];
        assert_eq!(error["code"], "model_load_failed", "{name}");
        assert!(
            error["message"].as_str().unwrap().contains(name),
            "{name}: {error}"
        );
        // The others serve on.
        answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    }
    let models = server.get("/v1/models").json();
    for model in models["data"].as_array().unwrap() {
        let id = model["id"].as_str().unwrap();
        let status = &model["status"];
        if id == "smol" {
            assert_eq!(status["value"], "loaded");
        } else {
            assert_eq!(status["value"], "failed", "{id}: {status}");
            assert!(
                status["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{id}: {status}"
            );
        }
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn load_unload_and_ttl_without_autoload() {
    let server = Server::launch(&smol_and_gemma(
        "models_max = 2\nmodels_autoload = false",
        "ttl_secs = 2",
        2,
    ));
    let refused = server.post("/v1/chat/completions", &chat_to("smol", 4, false));
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "model_not_loaded");
    // llama-server's router props, and its per-request `?autoload=`.
    let props = server.get("/props").json();
    assert_eq!(props["role"], "router");
    assert_eq!(props["max_instances"], 2);
    assert_eq!(props["models_autoload"], false);
    let autoloaded = server.post(
        "/v1/chat/completions?autoload=true",
        &chat_to("gemma", 4, false),
    );
    answer_of(&autoloaded);
    assert_eq!(status_of(&server, "gemma"), "loaded");
    let load = server.post("/models/load", &json!({"model": "smol"}));
    assert_eq!(load.status, 200, "{}", load.text());
    assert_eq!(load.json()["success"], true);
    assert_eq!(status_of(&server, "smol"), "loaded");
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    let unknown = server.post("/models/load", &json!({"model": "nope"}));
    assert_eq!(unknown.status, 404);
    // Unload: only a loaded model.
    let unload = server.post("/models/unload", &json!({"model": "gemma"}));
    assert_eq!(unload.status, 200, "{}", unload.text());
    wait_status(&server, "gemma", "unloaded", Duration::from_secs(15));
    let again = server.post("/models/unload", &json!({"model": "gemma"}));
    assert_eq!(again.status, 400, "{}", again.text());
    // smol's ttl_secs = 2: idle, it unloads by itself.
    wait_status(&server, "smol", "unloaded", Duration::from_secs(10));
}

#[test]
fn one_models_full_queue_does_not_refuse_another() {
    let server = Server::launch(&smol_and_gemma(
        "models_max = 2\nmax_queued = 0",
        "workers = [{ cpus = \"0\" }]",
        1,
    ));
    answer_of(&server.post("/v1/chat/completions", &chat_to("gemma", 2, false)));
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 2, false)));
    // smol's one worker's one slot is busy and it may queue nothing: another smol request is
    // a 429 ...
    let mut busy = server.stream("/v1/chat/completions", &chat_to("smol", 150, true));
    busy.next_data().expect("started");
    let refused = server.post("/v1/chat/completions", &chat_to("smol", 2, false));
    assert_eq!(refused.status, 429, "{}", refused.text());
    // ... and gemma still serves.
    answer_of(&server.post("/v1/chat/completions", &chat_to("gemma", 2, false)));
    drop(busy);
}

#[test]
fn llama_server_router_flags_serve_a_models_dir() {
    let dir = scratch_dir("models-dir").unwrap();
    for file in [SMOL, GEMMA] {
        std::os::unix::fs::symlink(models_dir().join(file), dir.path().join(file)).unwrap();
    }
    let mut command = std::process::Command::new(bin_dir().join("llamapool-router"));
    command.args([
        "--models-dir",
        dir.path().to_str().unwrap(),
        "--models-max",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]);
    let server = Router::launch_with(command, "").unwrap();
    let ids: Vec<String> = statuses(&server).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"]);
    for model in [
        "gemma-3-270m-q4_k_m",
        "SmolLM2-135M-Instruct.Q4_1",
        "gemma-3-270m-q4_k_m",
    ] {
        let response = server.post("/v1/chat/completions", &chat_to(model, 4, false));
        assert_eq!(response.status, 200, "{model}: {}", response.text());
        assert_eq!(response.json()["model"], model);
        assert_eq!(status_of(&server, model), "loaded");
    }
}

#[test]
fn the_memory_budget_unloads_what_does_not_fit() {
    // One worker each: SmolLM2 is estimated at about 150 MB (weights and KV), Gemma at about
    // 290 MB; 350 MiB holds either, not both. No count limit.
    let one_worker = "workers = [{ cpus = \"0\" }]\nworker_defaults = { context = 2048 }";
    let server = Server::launch(&config(
        "models_max = 0\nmodels_memory_mib = 350",
        &[
            &format!("alias = \"smol\"\npath = \"{SMOL}\"\n{one_worker}"),
            &format!("alias = \"gemma\"\npath = \"{GEMMA}\"\n{one_worker}"),
        ],
    ));
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    answer_of(&server.post("/v1/chat/completions", &chat_to("gemma", 4, false)));
    assert_eq!(
        status_of(&server, "smol"),
        "unloaded",
        "{:?}",
        statuses(&server)
    );
    assert_eq!(status_of(&server, "gemma"), "loaded");
}

#[test]
fn hostile_bodies_and_names_load_nothing_and_harm_nothing() {
    let server = Server::launch(&smol_and_gemma(
        "models_max = 1\nbody_read_timeout_secs = 2",
        "",
        2,
    ));
    let post_raw =
        |path: &str, body: &[u8]| http::request(&server.addr, "POST", path, &[], body).unwrap();
    let garbage: Vec<u8> = (0..1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert_eq!(post_raw("/v1/chat/completions", &garbage).status, 400);
    // The router reads every body itself to find its model: 1 KiB of `{`, JSON nested past
    // serde's limit, a body announced over the limit and one trickled past the body timeout
    // get their clear errors there, on a generating route and on the admin one.
    let deep = format!(r#"{{"model": "smol", "x": {}}}"#, "[".repeat(100_000));
    for path in ["/v1/chat/completions", "/models/load"] {
        refuses_hostile_bodies(&server.addr, path, &deep, Some(Duration::from_secs(2)));
    }
    // A megabyte of name: a 404 that does not echo it all.
    let long = "m".repeat(1 << 20);
    let response = server.post("/v1/chat/completions", &chat_to(&long, 4, false));
    assert_eq!(response.status, 404);
    assert!(response.body.len() < 2000, "{} bytes", response.body.len());
    for query in [
        "?model=%00%ff%fe",
        "?model=",
        "?model=smol&model=gemma&autoload=maybe",
    ] {
        let response = server.get(&format!("/props{query}"));
        assert!(
            matches!(response.status, 200 | 400 | 404),
            "{query}: {} {}",
            response.status,
            response.text()
        );
    }
    let models = statuses(&server);
    assert!(
        models.iter().all(|(_, s)| s == "unloaded"),
        "nothing loaded by bad requests: {models:?}"
    );
    // 3.5 MB of prompt for a named model: read, the model loaded, the prompt refused as too
    // long for its context.
    let huge = json!({"model": "smol", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello ".repeat(600_000)}]});
    let too_long = server.post("/v1/chat/completions", &huge);
    assert_eq!(too_long.status, 400, "{}", too_long.text());
    assert_eq!(
        too_long.json()["error"]["type"],
        "exceed_context_size_error"
    );
    // Then twelve clients at once, half for each model, with room for one model: every
    // request is answered, each model swapped in while the other waits.
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let addr = server.addr.clone();
            let model = if i % 2 == 0 { "smol" } else { "gemma" };
            std::thread::spawn(move || {
                let body = serde_json::to_vec(&chat_to(model, 8, false)).unwrap();
                let response =
                    http::request(&addr, "POST", "/v1/chat/completions", &[], &body).unwrap();
                (model, response)
            })
        })
        .collect();
    for client in clients {
        let (model, response) = client.join().unwrap();
        assert_eq!(response.status, 200, "{model}: {}", response.text());
        assert_eq!(response.json()["model"], model);
    }
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn a_model_that_can_never_fit_beside_a_pinned_one_fails_at_once() {
    let server = Server::launch(&config(
        "models_max = 1",
        &[
            &format!(
                "alias = \"smol\"\npath = \"{SMOL}\"\npin = true\nload_on_startup = true\nworkers = [{{ cpus = \"0\" }}]"
            ),
            &format!("alias = \"gemma\"\npath = \"{GEMMA}\"\nworkers = [{{ cpus = \"1\" }}]"),
        ],
    ));
    wait_status(&server, "smol", "loaded", Duration::from_secs(60));
    let started = Instant::now();
    let refused = server.post("/v1/chat/completions", &chat_to("gemma", 4, false));
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "model_load_failed");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pinned"),
        "{}",
        refused.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not after the load timeout"
    );
    // The pinned model serves on, and a worker admin route needs no body to name it.
    answer_of(&server.post("/v1/chat/completions", &chat_to("smol", 4, false)));
    let workers = server.get("/workers");
    assert_eq!(workers.status, 200, "{}", workers.text());
    assert_eq!(workers.json()["workers"].as_array().unwrap().len(), 1);
}

#[test]
fn a_reload_reads_the_models_dir_again_and_keeps_loaded_models() {
    let dir = scratch_dir("models-reload").unwrap();
    std::os::unix::fs::symlink(models_dir().join(SMOL), dir.path().join("smol.gguf")).unwrap();
    let mut command = std::process::Command::new(bin_dir().join("llamapool-router"));
    command.args(["--models-dir", dir.path().to_str().unwrap(), "--port", "0"]);
    let server = Router::launch_with(command, "").unwrap();
    let smol = server.post("/v1/chat/completions", &chat_to("smol", 4, false));
    answer_of(&smol);
    std::os::unix::fs::symlink(models_dir().join(GEMMA), dir.path().join("gemma.gguf")).unwrap();
    assert_eq!(statuses(&server).len(), 1, "not before a reload");
    let reloaded = server.get("/v1/models?reload=1");
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert_eq!(
        statuses(&server),
        [
            ("gemma".to_string(), "unloaded".to_string()),
            ("smol".to_string(), "loaded".to_string())
        ],
        "the new file is listed; smol kept its state"
    );
    answer_of(&server.post("/v1/chat/completions", &chat_to("gemma", 4, false)));
    std::fs::remove_file(dir.path().join("smol.gguf")).unwrap();
    assert_eq!(server.get("/models?reload=1").status, 200);
    let ids: Vec<String> = statuses(&server).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["gemma"]);
    let gone = server.post("/v1/chat/completions", &chat_to("smol", 4, false));
    assert_eq!(gone.status, 404, "{}", gone.text());
    answer_of(&server.post("/v1/chat/completions", &chat_to("gemma", 4, false)));
}
