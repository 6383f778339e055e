use llamapool_common::protocol::ToolChoice;
use llamapool_common::protocol::{ChatEnding, Prompt};
use llamapool_common::settings::GenerationDefaults;
use llamapool_common::{RequestId, StoppingParams};

use super::*;

/// Serves "m" with today's strict name rule, so an unknown name is still tested.
fn strict_m() -> ServedModel {
    ServedModel {
        strict_name: true,
        ..ServedModel::new("m")
    }
}

fn chat(body: &str) -> Result<ValidRequest, InvalidRequest> {
    parse_generation(body.as_bytes(), Endpoint::Chat, &strict_m(), RequestId(1))
}

fn completion(body: &str) -> Result<ValidRequest, InvalidRequest> {
    parse_generation(
        body.as_bytes(),
        Endpoint::Completions,
        &strict_m(),
        RequestId(1),
    )
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
    assert!(g.sampling.logit_bias_text.is_empty());
    let Prompt::Chat(c) = g.prompt else { panic!() };
    assert_eq!(c.messages[1].content, "hi");
    assert_eq!(c.ending, ChatEnding::OpenAssistant);
}

#[test]
fn developer_is_the_system_role_and_null_content_is_empty() {
    let r =
        chat(r#"{"messages":[{"role":"developer","content":"d"},{"role":"user","content":null}]}"#)
            .unwrap();
    let Prompt::Chat(c) = r.generate.prompt else {
        panic!()
    };
    assert_eq!(c.messages[0].role, "system");
    assert_eq!(c.messages[1].content, "");
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
    // OpenAI's batches: several strings, or several token-id lists.
    let batch = completion(r#"{"prompt":["a","b","c"],"n":2}"#).unwrap();
    assert_eq!(batch.generate.prompt, Prompt::Text("a".into()));
    assert_eq!(
        batch.more_prompts,
        [Prompt::Text("b".into()), Prompt::Text("c".into())]
    );
    assert_eq!(batch.total_choices(), 6);
    let ids = completion(r#"{"prompt":[[1,2],[3]]}"#).unwrap();
    assert_eq!(ids.generate.prompt, Prompt::Tokens(vec![1, 2]));
    assert_eq!(ids.more_prompts, [Prompt::Tokens(vec![3])]);
    for bad in [
        r#"{"prompt":["a","b"],"n":9}"#,
        r#"{"prompt":[[1],[]]}"#,
        r#"{"prompt":[[1],["a"]]}"#,
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
        (r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#,
            "n",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stop":3}"#,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stop":["a",1]}"#,
            "stop",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":[[1,2,3]]}"#,
            "logit_bias",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1":"x"}}"#,
            "logit_bias",
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
        (r#""functions":[{"name":"f"}]"#, "functions"),
        (r#""best_of":2"#, "best_of"),
        (r#""echo":true"#, "echo"),
        (r#""suffix":"end""#, "suffix"),
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

#[test]
fn any_model_name_unless_strict_and_server_defaults_fill_gaps() {
    let body = br#"{"model":"gpt-3.5-turbo","prompt":"x"}"#;
    let lenient = ServedModel::new("m");
    let r = parse_generation(body, Endpoint::Completions, &lenient, RequestId(1)).unwrap();
    assert_eq!(r.generate.stopping.max_tokens, None);
    let strict = ServedModel {
        strict_name: true,
        ..ServedModel::new("m")
    };
    assert!(matches!(
        parse_generation(body, Endpoint::Completions, &strict, RequestId(1)).unwrap_err(),
        InvalidRequest::UnknownModel { .. }
    ));
    // Every alias is a served name.
    let aliased = ServedModel {
        names: vec!["gpt-3.5-turbo".into(), "m".into()],
        ..strict.clone()
    };
    assert!(parse_generation(body, Endpoint::Completions, &aliased, RequestId(1)).is_ok());
    let served = ServedModel {
        defaults: GenerationDefaults {
            n_predict: Some(5),
            temperature: Some(0.0),
            seed: Some(7),
            top_k: Some(3),
            ..GenerationDefaults::default()
        },
        ..ServedModel::new("m")
    };
    let r = parse_generation(body, Endpoint::Completions, &served, RequestId(1)).unwrap();
    assert_eq!(r.generate.stopping.max_tokens, Some(5));
    assert_eq!(r.generate.sampling.temperature, 0.0);
    assert_eq!(r.generate.sampling.seed, Some(7));
    assert_eq!(r.generate.sampling.top_k, 3);
    // The request's own values win; n_predict -1 is no limit, seed -1 is random.
    let own = br#"{"prompt":"x","n_predict":-1,"seed":-1,"temperature":0.5}"#;
    let r = parse_generation(own, Endpoint::Completions, &served, RequestId(1)).unwrap();
    assert_eq!(r.generate.stopping.max_tokens, None);
    assert_eq!(r.generate.sampling.seed, None);
    assert_eq!(r.generate.sampling.temperature, 0.5);
    let own = br#"{"prompt":"x","n_predict":9,"max_tokens":2}"#;
    let r = parse_generation(own, Endpoint::Completions, &served, RequestId(1)).unwrap();
    assert_eq!(r.generate.stopping.max_tokens, Some(2));
    let zero = br#"{"prompt":"x","n_predict":0}"#;
    assert_eq!(
        param_of(
            &parse_generation(zero, Endpoint::Completions, &served, RequestId(1)).unwrap_err()
        ),
        Some("n_predict")
    );
}

#[test]
fn native_prompts_may_mix_text_and_token_ids() {
    let parse = |v: serde_json::Value| {
        native_prompt(Some(serde_json::from_value::<PromptBody>(v).unwrap()))
    };
    assert_eq!(
        parse(serde_json::json!("hi")).unwrap(),
        NativePrompt::Ready(Prompt::Text("hi".into()))
    );
    assert_eq!(
        parse(serde_json::json!([1, 2])).unwrap(),
        NativePrompt::Ready(Prompt::Tokens(vec![1, 2]))
    );
    assert_eq!(
        parse(serde_json::json!(["a", 5, "b"])).unwrap(),
        NativePrompt::Mixed(vec![
            PromptPart::Text("a".into()),
            PromptPart::Token(5),
            PromptPart::Text("b".into())
        ])
    );
    assert!(parse(serde_json::json!(["a", "b"])).is_err());
    assert!(parse(serde_json::json!(["a", 1.5])).is_err());
}

#[test]
fn native_batches_hold_one_prompt_per_element() {
    let parse = |v: serde_json::Value| {
        native_prompts(Some(serde_json::from_value::<PromptBody>(v).unwrap()))
    };
    // One prompt stays one.
    assert_eq!(parse(serde_json::json!([1, "a", 2])).unwrap().len(), 1);
    assert_eq!(parse(serde_json::json!(["a"])).unwrap().len(), 1);
    // Several strings, token lists, objects and mixed lists are a batch.
    assert_eq!(
        parse(serde_json::json!([[1, 2], "b", {"prompt_string": "c"}, [3, "d"]])).unwrap(),
        [
            NativePrompt::Ready(Prompt::Tokens(vec![1, 2])),
            NativePrompt::Ready(Prompt::Text("b".into())),
            NativePrompt::Ready(Prompt::Text("c".into())),
            NativePrompt::Mixed(vec![PromptPart::Token(3), PromptPart::Text("d".into())]),
        ]
    );
    assert_eq!(parse(serde_json::json!(["a", "b"])).unwrap().len(), 2);
    for bad in [
        serde_json::json!([[1], [[2]]]),
        serde_json::json!([[1], 7.5]),
        serde_json::json!([[1], []]),
        serde_json::json!(vec![serde_json::json!([1]); 17]),
    ] {
        let e = parse(bad.clone()).unwrap_err();
        assert_eq!(param_of(&e), Some("prompt"), "{bad}: {e:?}");
    }
}

#[test]
fn structured_output_fields_become_one_constraint() {
    let constraint_of = |field: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#);
        chat(&body).map(|r| {
            let schema = r.generate.sampling.json_schema.map(|s| s.text);
            (r.generate.sampling.grammar, schema)
        })
    };
    for neutral in [
        r#""response_format":{"type":"text"}"#,
        r#""response_format":null"#,
        r#""grammar":"""#,
        r#""json_schema":null"#,
    ] {
        assert_eq!(constraint_of(neutral).unwrap(), (None, None), "{neutral}");
    }
    let (g, _) = constraint_of(r#""grammar":"root ::= \"yes\" | \"no\"""#).unwrap();
    assert_eq!(g.as_deref(), Some(r#"root ::= "yes" | "no""#));
    // A JSON schema goes to the worker as text (llama.cpp converts it); no schema is any object.
    for any_object in [
        r#""response_format":{"type":"json_object"}"#,
        r#""response_format":{"type":"json_schema","json_schema":{"schema":{}}}"#,
    ] {
        let (_, s) = constraint_of(any_object).unwrap();
        assert_eq!(s.as_deref(), Some(r#"{"type":"object"}"#), "{any_object}");
    }
    let schema =
        r#"{"type":"object","properties":{"n":{"type":"integer","minimum":3}},"required":["n"]}"#;
    for field in [
        format!(
            r#""response_format":{{"type":"json_schema","json_schema":{{"name":"x","schema":{schema}}}}}"#
        ),
        format!(r#""json_schema":{schema}"#),
    ] {
        let (g, s) = constraint_of(&field).unwrap();
        assert_eq!((g, s.as_deref()), (None, Some(schema)), "{field}");
    }
    // Two constraints at once, a bad type, a schema that is not an object: named.
    for (field, param) in [
        (
            r#""grammar":"root ::= \"a\"","json_schema":{"type":"string"}"#,
            "grammar",
        ),
        (r#""grammar":5"#, "grammar"),
        (r#""response_format":{"type":"yaml"}"#, "response_format"),
        (
            r#""response_format":{"type":"json_schema"}"#,
            "response_format",
        ),
        (r#""json_schema":[1]"#, "json_schema"),
    ] {
        let e = constraint_of(field).unwrap_err();
        assert_eq!(param_of(&e), Some(param), "{field}: {e:?}");
    }
}

#[test]
fn tools_and_their_choice_are_checked_and_sent() {
    let tool = r#"{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}"#;
    let other = r#"{"type":"function","function":{"name":"g"}}"#;
    let chat_of = |fields: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{fields}}}"#);
        chat(&body).map(|r| match r.generate.prompt {
            Prompt::Chat(c) => c,
            other => panic!("{other:?}"),
        })
    };
    let c = chat_of(&format!(
        r#""tools":[{tool},{other}],"tool_choice":"required""#
    ))
    .unwrap();
    assert_eq!(c.tools.choice, ToolChoice::Required);
    assert_eq!(c.tools.parallel, None);
    let sent: serde_json::Value = serde_json::from_str(&c.tools.tools).unwrap();
    assert_eq!(sent.as_array().unwrap().len(), 2);
    // A named function: only it is offered, and a call is required.
    let c = chat_of(&format!(
        r#""tools":[{tool},{other}],"tool_choice":{{"type":"function","function":{{"name":"g"}}}},"parallel_tool_calls":false"#
    ))
    .unwrap();
    assert_eq!(c.tools.choice, ToolChoice::Required);
    assert_eq!(c.tools.parallel, Some(false));
    assert_eq!(c.tools.tools, format!("[{other}]"));
    for (fields, param) in [
        (r#""tools":{"a":1}"#.to_string(), "tools"),
        (r#""tools":[{"type":"retrieval"}]"#.into(), "tools[0]"),
        (
            r#""tools":[{"type":"function","function":{}}]"#.into(),
            "tools[0]",
        ),
        (
            format!(r#""tools":[{tool}],"tool_choice":"sometimes""#),
            "tool_choice",
        ),
        (
            format!(
                r#""tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"h"}}}}"#
            ),
            "tool_choice",
        ),
        (r#""tool_choice":"required""#.into(), "tool_choice"),
        (
            format!(r#""tools":[{tool}],"grammar":"root ::= \"a\"""#),
            "grammar",
        ),
        (
            r#""chat_template_kwargs":{"enable_thinking":"yes"}"#.into(),
            "chat_template_kwargs",
        ),
        (r#""reasoning_format":"verbose""#.into(), "reasoning_format"),
    ] {
        let e = chat_of(&fields).unwrap_err();
        assert_eq!(param_of(&e), Some(param), "{fields}: {e:?}");
    }
    // Assistant tool calls and tool results in the conversation.
    let body = r#"{"messages":[{"role":"user","content":"x"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":{"a":1}}}]},
        {"role":"tool","tool_call_id":"c1","content":"42"}]}"#;
    let c = match chat(body).unwrap().generate.prompt {
        Prompt::Chat(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(c.messages[1].tool_calls[0].arguments, r#"{"a":1}"#);
    assert_eq!(c.messages[1].tool_calls[0].id, "c1");
    assert_eq!(c.messages[2].tool_call_id, "c1");
    let e = chat(
        r#"{"messages":[{"role":"user","content":"x","tool_calls":[{"function":{"name":"f"}}]}]}"#,
    )
    .unwrap_err();
    assert_eq!(param_of(&e), Some("messages[0].tool_calls"));
}

#[test]
fn n_asks_for_several_choices_and_best_of_may_only_equal_it() {
    assert_eq!(
        chat(r#"{"messages":[{"role":"user","content":"x"}]}"#)
            .unwrap()
            .n,
        1
    );
    assert_eq!(
        chat(r#"{"messages":[{"role":"user","content":"x"}],"n":null}"#)
            .unwrap()
            .n,
        1
    );
    let r = completion(r#"{"prompt":"x","n":16,"best_of":16}"#).unwrap();
    assert_eq!(r.n, 16);
    assert_eq!(
        completion(r#"{"prompt":"x","n":3,"best_of":null}"#)
            .unwrap()
            .n,
        3
    );
    for (body, param) in [
        (r#"{"prompt":"x","n":-1}"#, "n"),
        (r#"{"prompt":"x","n":4294967297}"#, "n"),
        (r#"{"prompt":"x","n":2.5}"#, "n"),
        (r#"{"prompt":"x","n":2,"best_of":3}"#, "best_of"),
        (r#"{"prompt":"x","best_of":2}"#, "best_of"),
    ] {
        let e = completion(body).unwrap_err();
        assert_eq!(param_of(&e), Some(param), "{body}: {e:?}");
    }
}

/// The ending a chat body asks for, or the refused parameter.
fn ending(body: &str) -> Result<ChatEnding, String> {
    match chat(body) {
        Ok(r) => match r.generate.prompt {
            Prompt::Chat(c) => Ok(c.ending),
            other => panic!("not a chat prompt: {other:?}"),
        },
        Err(InvalidRequest::Field { param, .. }) => Err(param),
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn chat_endings_follow_llama_server() {
    let u = r#"{"role":"user","content":"Hi"}"#;
    let a = r#"{"role":"assistant","content":"Hello"}"#;
    let body =
        |msgs: &[&str], extra: &str| format!(r#"{{"messages":[{}]{extra}}}"#, msgs.join(","));
    assert_eq!(ending(&body(&[u], "")), Ok(ChatEnding::OpenAssistant));
    assert_eq!(
        ending(&body(&[u], r#","add_generation_prompt":false"#)),
        Ok(ChatEnding::AsRendered)
    );
    // A final assistant message is continued (llama-server's prefill), asked or not.
    assert_eq!(ending(&body(&[u, a], "")), Ok(ChatEnding::ContinueFinal));
    assert_eq!(
        ending(&body(
            &[u, a],
            r#","continue_final_message":true,"add_generation_prompt":false"#
        )),
        Ok(ChatEnding::ContinueFinal)
    );
    assert_eq!(
        ending(&body(&[u, a], r#","continue_final_message":true"#)),
        Err("continue_final_message".into())
    );
    assert_eq!(
        ending(&body(
            &[u],
            r#","continue_final_message":true,"add_generation_prompt":false"#
        )),
        Err("continue_final_message".into())
    );
    // Two assistant turns at the end: refused unless continuing is asked for explicitly.
    assert_eq!(ending(&body(&[u, a, a], "")), Err("messages".into()));
    assert_eq!(
        ending(&body(
            &[u, a, a],
            r#","continue_final_message":true,"add_generation_prompt":false"#
        )),
        Ok(ChatEnding::ContinueFinal)
    );
    assert_eq!(ending(&body(&[u, a, u], "")), Ok(ChatEnding::OpenAssistant));
}

#[test]
fn log_probabilities_are_asked_for_per_endpoint() {
    let logprobs = |body: &str| chat(body).map(|v| v.generate.sampling.logprobs);
    let msgs = r#""messages":[{"role":"user","content":"x"}]"#;
    assert_eq!(logprobs(&format!("{{{msgs}}}")).unwrap(), None);
    assert_eq!(
        logprobs(&format!(r#"{{{msgs},"logprobs":false}}"#)).unwrap(),
        None
    );
    assert_eq!(
        logprobs(&format!(r#"{{{msgs},"logprobs":true}}"#)).unwrap(),
        Some(0)
    );
    assert_eq!(
        logprobs(&format!(r#"{{{msgs},"logprobs":true,"top_logprobs":20}}"#)).unwrap(),
        Some(20)
    );
    assert_eq!(
        logprobs(&format!(r#"{{{msgs},"n_probs":3}}"#)).unwrap(),
        Some(3)
    );
    assert_eq!(
        logprobs(&format!(r#"{{{msgs},"n_probs":0}}"#)).unwrap(),
        None
    );
    let c = |body: &str| completion(body).map(|v| v.generate.sampling.logprobs);
    assert_eq!(c(r#"{"prompt":"x","logprobs":2}"#).unwrap(), Some(2));
    assert_eq!(c(r#"{"prompt":"x","logprobs":null}"#).unwrap(), None);
    for (field, param) in [
        (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
        (r#""logprobs":true,"top_logprobs":-1"#, "top_logprobs"),
        (r#""top_logprobs":2"#, "top_logprobs"),
        (r#""logprobs":21"#, "logprobs"),
        (r#""logprobs":"yes""#, "logprobs"),
        (r#""logprobs":1.5"#, "logprobs"),
        (r#""n_probs":21"#, "n_probs"),
    ] {
        let body = format!("{{{msgs},{field}}}");
        match chat(&body) {
            Err(InvalidRequest::Field { param: p, .. }) => assert_eq!(p, param, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}

#[test]
fn cache_prompt_is_on_unless_the_request_turns_it_off() {
    let on = completion(r#"{"model":"m","prompt":"hi"}"#).unwrap();
    assert!(on.generate.stopping.cache_prompt);
    let off =
        chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"cache_prompt":false}"#)
            .unwrap();
    assert!(!off.generate.stopping.cache_prompt);
}

#[test]
fn stream_reports_apply_to_streams_and_ask_the_worker_for_progress() {
    let reports = |body: &str| {
        let r = chat(body).unwrap();
        (r.reports, r.generate.report_progress)
    };
    let msg = r#""messages":[{"role":"user","content":"x"}]"#;
    assert_eq!(
        reports(&format!(r#"{{{msg},"stream":true}}"#)),
        (StreamReports::default(), false)
    );
    let progress = StreamReports {
        progress: true,
        timings: false,
    };
    assert_eq!(
        reports(&format!(
            r#"{{{msg},"stream":true,"return_progress":true}}"#
        )),
        (progress, true)
    );
    let timings = StreamReports {
        progress: false,
        timings: true,
    };
    assert_eq!(
        reports(&format!(
            r#"{{{msg},"stream":true,"timings_per_token":true}}"#
        )),
        (timings, true)
    );
    // A non-streamed result has its timings; there is nothing to report per chunk.
    assert_eq!(
        reports(&format!(
            r#"{{{msg},"return_progress":true,"timings_per_token":true}}"#
        )),
        (StreamReports::default(), false)
    );
    let bad = chat(&format!(r#"{{{msg},"return_progress":"yes"}}"#)).unwrap_err();
    assert_eq!(param_of(&bad), Some("return_progress"));
}

#[test]
fn logit_bias_takes_llama_server_pairs_and_texts() {
    let parse = |bias: &str| {
        let body = format!(r#"{{"prompt":"x","logit_bias":{bias}}}"#);
        parse_generation(
            body.as_bytes(),
            Endpoint::Completions,
            &ServedModel::new("m"),
            RequestId(1),
        )
        .unwrap()
        .generate
        .sampling
    };
    let pairs = parse(r#"[[15, -100], [" the ", false], [7, 2.5]]"#);
    assert_eq!(pairs.logit_bias, vec![(15, -100.0), (7, 2.5)]);
    assert_eq!(
        pairs.logit_bias_text,
        vec![(" the ".to_string(), f32::NEG_INFINITY)]
    );
    let texts = parse(r#"{" the ": -100, "12": 1}"#);
    assert_eq!(texts.logit_bias, vec![(12, 1.0)]);
    assert_eq!(texts.logit_bias_text, vec![(" the ".to_string(), -100.0)]);
}

#[test]
fn schemas_are_bounded_before_a_worker_converts_them() {
    let refused = |schema: serde_json::Value| {
        let body = serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}});
        let e = chat(&body.to_string()).unwrap_err();
        assert_eq!(param_of(&e), Some("response_format"), "{e:?}");
        e.to_string()
    };
    let mut deep = serde_json::json!({"type": "string"});
    for _ in 0..70 {
        deep = serde_json::json!({"type": "array", "items": deep});
    }
    assert!(refused(deep).contains("nested more than 64"));
    let optional: serde_json::Map<String, serde_json::Value> = (0..101)
        .map(|i| (format!("p{i}"), serde_json::json!({"type": "integer"})))
        .collect();
    let names: Vec<String> = optional.keys().cloned().collect();
    assert!(
        refused(serde_json::json!({"type": "object", "properties": optional.clone()}))
            .contains("101 optional properties")
    );
    // Required ones cost little: the same object with all of them required passes.
    let body = serde_json::json!({"messages": [{"role": "user", "content": "x"}],
        "json_schema": {"type": "object", "properties": optional, "required": names}});
    chat(&body.to_string()).unwrap();
}
