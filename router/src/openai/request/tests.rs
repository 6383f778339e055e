use llamapool_common::protocol::Prompt;

use super::*;

fn chat(body: &str) -> Result<ValidRequest, InvalidRequest> {
    parse_generation(body.as_bytes(), Endpoint::Chat, "m", RequestId(1))
}

fn completion(body: &str) -> Result<ValidRequest, InvalidRequest> {
    parse_generation(body.as_bytes(), Endpoint::Completions, "m", RequestId(1))
}

fn param_of(e: &InvalidRequest) -> Option<&str> {
    match e {
        InvalidRequest::Field { param, .. } => Some(param),
        InvalidRequest::Unsupported { param, .. } => Some(param),
        InvalidRequest::UnknownModel { .. } => Some("model"),
        InvalidRequest::Body(_) => None,
    }
}

#[test]
fn parses_a_full_chat_request() {
    let r = chat(r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
        "max_completion_tokens":5,"temperature":0,"top_p":0.5,"top_k":3,"min_p":0.1,"presence_penalty":0.5,"frequency_penalty":0.1,
        "repeat_penalty":1.1,"seed":7,"stop":"x","logit_bias":{"12":-100,"13":false},"n":1,"stream":true,"stream_options":{"include_usage":true},"ignore_eos":true,
        "user":"someone","logprobs":false,"response_format":{"type":"text"},"tools":[],"tool_choice":"none"}"#)
    .unwrap();
    assert!(r.stream && r.include_usage);
    let g = r.generate;
    assert_eq!(g.stopping.max_tokens, Some(5));
    assert_eq!(g.stopping.stop, vec!["x".to_string()]);
    assert!(g.stopping.ignore_eos);
    assert_eq!(g.sampling.top_k, 3);
    assert_eq!(g.sampling.seed, Some(7));
    assert_eq!(
        g.sampling.logit_bias,
        vec![(12, -100.0), (13, f32::NEG_INFINITY)]
    );
    let Prompt::Chat(m) = g.prompt else { panic!() };
    assert_eq!(m[1].content, "hi");
}

#[test]
fn developer_is_the_system_role_and_null_content_is_empty() {
    let r =
        chat(r#"{"messages":[{"role":"developer","content":"d"},{"role":"user","content":null}]}"#)
            .unwrap();
    let Prompt::Chat(m) = r.generate.prompt else {
        panic!()
    };
    assert_eq!(m[0].role, "system");
    assert_eq!(m[1].content, "");
}

#[test]
fn completions_take_strings_and_token_arrays() {
    assert_eq!(
        completion(r#"{"prompt":"abc"}"#).unwrap().generate.prompt,
        Prompt::Text("abc".into())
    );
    assert_eq!(
        completion(r#"{"prompt":["abc"]}"#).unwrap().generate.prompt,
        Prompt::Text("abc".into())
    );
    assert_eq!(
        completion(r#"{"prompt":[1,2]}"#).unwrap().generate.prompt,
        Prompt::Tokens(vec![1, 2])
    );
    for bad in [
        r#"{"prompt":["a","b"]}"#,
        r#"{"prompt":[]}"#,
        r#"{"prompt":[1,"a"]}"#,
        r#"{"prompt":[1e12]}"#,
        r#"{"prompt":7}"#,
        r#"{}"#,
    ] {
        let e = completion(bad).unwrap_err();
        assert_eq!(param_of(&e), Some("prompt"), "{bad}: {e:?}");
    }
}

#[test]
fn bad_inputs_name_their_field() {
    let cases = [
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
            "max_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
            "max_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}"#,
            "max_completion_tokens",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":5}"#,
            "temperature",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            "temperature",
        ),
        (r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "n"),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stop":3}"#,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stop":["a",1]}"#,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#,
            "logit_bias",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1":"x"}}"#,
            "logit_bias.1",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            "stream",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":1}}"#,
            "stream_options.include_usage",
        ),
        (
            r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
            "messages[0]",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"},{"content":"x"}]}"#,
            "messages[1]",
        ),
        (
            r#"{"messages":[{"role":"user","content":5}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            "messages[0].content",
        ),
        (r#"{"messages":"hi"}"#, "messages"),
        (r#"{"messages":[]}"#, "messages"),
        (r#"{}"#, "messages"),
    ];
    for (body, param) in cases {
        let e = chat(body).unwrap_err();
        assert_eq!(param_of(&e), Some(param), "{body}: {e:?}");
        assert!(!e.to_string().is_empty());
    }
    for body in ["{not json", "[1]", "", "null"] {
        assert!(
            matches!(chat(body).unwrap_err(), InvalidRequest::Body(_)),
            "{body}"
        );
    }
    assert!(matches!(
        chat(r#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#).unwrap_err(),
        InvalidRequest::UnknownModel { .. }
    ));
}

#[test]
fn fields_this_server_cannot_honour_are_named() {
    let cases = [
        (
            r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
            "tools",
        ),
        (r#""tool_choice":"required""#, "tool_choice"),
        (r#""functions":[{"name":"f"}]"#, "functions"),
        (
            r#""response_format":{"type":"json_object"}"#,
            "response_format",
        ),
        (r#""logprobs":true"#, "logprobs"),
        (r#""top_logprobs":3"#, "top_logprobs"),
        (r#""best_of":2"#, "best_of"),
        (r#""echo":true"#, "echo"),
        (r#""suffix":"end""#, "suffix"),
        (r#""grammar":"root ::= \"a\"""#, "grammar"),
        (r#""json_schema":{"type":"object"}"#, "json_schema"),
        (r#""n_probs":2"#, "n_probs"),
    ];
    for (field, param) in cases {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#);
        let e = chat(&body).unwrap_err();
        assert!(
            matches!(e, InvalidRequest::Unsupported { param: p, .. } if p == param),
            "{body}: {e:?}"
        );
    }
    // Their neutral values are accepted.
    let neutral =
        r#"{"prompt":"x","logprobs":0,"best_of":1,"echo":false,"suffix":null,"tools":null}"#;
    completion(neutral).unwrap();
}

#[test]
fn tokenize_and_detokenize_bodies() {
    let t: TokenizeBody =
        parse_json(br#"{"content":"a b","with_pieces":true,"add_special":null}"#).unwrap();
    assert_eq!(t.content.as_deref(), Some("a b"));
    assert_eq!(t.with_pieces, Some(true));
    let e = parse_json::<TokenizeBody>(br#"{"content":5}"#).unwrap_err();
    assert_eq!(param_of(&e), Some("content"));
    let e = parse_json::<DetokenizeBody>(br#"{"tokens":[1,"x"]}"#).unwrap_err();
    assert_eq!(param_of(&e), Some("tokens[1]"));
}

/// The bounds of `SamplingParams::validate` and `StoppingParams::validate` reach the client as
/// a 400 naming the field; values past f32's range are infinities and refused as such.
#[test]
fn unbounded_values_name_their_field() {
    let long_stop = "s".repeat(StoppingParams::MAX_STOP_BYTES + 1);
    let cases = [
        (r#""logit_bias":{"12":1e39}"#.to_string(), "logit_bias"),
        (r#""logit_bias":{"12":-1e39}"#.to_string(), "logit_bias"),
        (r#""logit_bias":{"12":100.5}"#.to_string(), "logit_bias"),
        (r#""logit_bias":{"-3":1}"#.to_string(), "logit_bias"),
        (r#""temperature":1e39"#.to_string(), "temperature"),
        (r#""temperature":-1e-40"#.to_string(), "temperature"),
        (r#""top_p":1e39"#.to_string(), "top_p"),
        (r#""repeat_penalty":1e39"#.to_string(), "repeat_penalty"),
        (
            r#""presence_penalty":-1e39"#.to_string(),
            "presence_penalty",
        ),
        (r#""top_k":1e39"#.to_string(), "top_k"),
        (r#""top_k":3000000000"#.to_string(), "top_k"),
        (format!(r#""stop":"{long_stop}""#), "stop"),
        (format!(r#""stop":["a","{long_stop}"]"#), "stop"),
        (
            format!(r#""stop":{}"#, serde_json::json!(vec!["x"; 17])),
            "stop",
        ),
        (r#""stop":[""]"#.to_string(), "stop"),
        (r#""max_tokens":1e39"#.to_string(), "max_tokens"),
        (r#""max_tokens":5000000000"#.to_string(), "max_tokens"),
    ];
    for (field, param) in cases {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#);
        let e = chat(&body).unwrap_err();
        assert_eq!(param_of(&e), Some(param), "{field}: {e:?}");
        assert!(e.to_string().contains(param), "{field}: {e}");
    }
}

#[test]
fn bounds_are_inclusive_and_tiny_temperatures_are_greedy() {
    let ok = |field: &str| {
        chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#
        ))
        .unwrap_or_else(|e| panic!("{field}: {e:?}"))
        .generate
    };
    let g = ok(r#""temperature":1e-40"#);
    assert!(g.sampling.temperature >= 0.0);
    assert!(g.sampling.is_greedy(), "{}", g.sampling.temperature);
    assert!(ok(r#""temperature":0"#).sampling.is_greedy());
    assert!(!ok(r#""temperature":0.5"#).sampling.is_greedy());
    assert_eq!(
        ok(r#""logit_bias":{"5":100,"6":-100,"7":false}"#)
            .sampling
            .logit_bias,
        vec![(5, 100.0), (6, -100.0), (7, f32::NEG_INFINITY)]
    );
    let longest = "s".repeat(StoppingParams::MAX_STOP_BYTES);
    assert_eq!(
        ok(&format!(r#""stop":"{longest}""#)).stopping.stop,
        vec![longest]
    );
}
