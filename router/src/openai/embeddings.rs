//! Embeddings and reranking, both ways: the bodies of `/v1/embeddings` (OpenAI), llama-server's
//! `/embedding(s)` and `/v1/rerank` (Jina's shape, or TEI's with `texts`) parsed into
//! [`EmbeddingsRequest`] and [`RerankRequest`] (every input as the worker tokenizes it, each
//! rejection naming its field), and the response bodies built from the workers' vectors.
//!
//! The inputs take every shape llama-server takes: a string; token ids; a list mixing both
//! (one input); a list of those, or of `{"prompt_string"}` or `{"content": [text parts]}`
//! objects (one input each).

use base64::Engine as _;
use llamapool_common::protocol::{EmbedInput, InputPart};
use llamapool_common::Token;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{has_media, parse_json};
use super::InvalidRequest;

/// Most inputs of one embeddings request, or documents of one rerank request (OpenAI's limit
/// for `input`).
pub const MAX_INPUTS: usize = 2048;

/// llama-server's default `embd_normalize`: Euclidean.
const EUCLIDEAN: i32 = 2;

/// How the vectors go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingsShape {
    /// OpenAI's list object; `base64`: each vector as the base64 of its little-endian f32s.
    OpenAi { base64: bool },
    /// llama-server's `/embedding`: a list of `{index, embedding: [vectors]}`.
    Native,
}

/// A checked embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: Option<String>,
    pub inputs: Vec<EmbedInput>,
    pub normalize: i32,
    pub shape: EmbeddingsShape,
}

#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    model: Option<String>,
    input: Option<Value>,
    content: Option<Value>,
    encoding_format: Option<String>,
    embd_normalize: Option<i32>,
}

impl EmbeddingsRequest {
    /// Parses a body that came to `/v1/embeddings` (`openai`) or `/embedding(s)`. A body with
    /// `content` instead of `input` gets the native shape wherever it came (llama-server).
    pub fn parse(body: &[u8], openai: bool) -> Result<Self, InvalidRequest> {
        let body: EmbeddingsBody = parse_json(body)?;
        let (prompt, openai) = match (body.input, body.content) {
            (Some(input), _) => (input, openai),
            (None, Some(content)) => (content, false),
            (None, None) => {
                return Err(InvalidRequest::field(
                    "input",
                    "\"input\" or \"content\" must be provided",
                ))
            }
        };
        let base64 = match body.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => {
                return Err(InvalidRequest::field(
                    "encoding_format",
                    "The format to return the embeddings in. Can be either float or base64",
                ))
            }
        };
        Ok(Self {
            model: body.model,
            inputs: inputs(prompt)?,
            normalize: body.embd_normalize.unwrap_or(EUCLIDEAN),
            shape: if openai {
                EmbeddingsShape::OpenAi { base64 }
            } else {
                EmbeddingsShape::Native
            },
        })
    }
}

/// The inputs of `input` (or `content`): one, or one per element of a list without token ids.
fn inputs(prompt: Value) -> Result<Vec<EmbedInput>, InvalidRequest> {
    let items = match prompt {
        Value::Array(items) if !items.iter().any(Value::is_number) => items,
        one => return Ok(vec![input(one, "input")?]),
    };
    if items.is_empty() {
        return Err(InvalidRequest::field(
            "input",
            "\"input\" must not be empty",
        ));
    }
    if items.len() > MAX_INPUTS {
        return Err(InvalidRequest::field(
            "input",
            format!(
                "at most {MAX_INPUTS} inputs per request, got {}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| input(item, &format!("input[{i}]")))
        .collect()
}

/// One input: a string, a list of token ids and strings, `{"prompt_string"}`, or
/// `{"content": [text parts]}`.
fn input(value: Value, param: &str) -> Result<EmbedInput, InvalidRequest> {
    let parts = match value {
        Value::String(text) => vec![InputPart::Text(text)],
        Value::Array(items) => mixed(items, param)?,
        Value::Object(mut object) => {
            if let Some(content) = object.remove("content") {
                vec![InputPart::Text(content_text(content, param)?)]
            } else if let Some(Value::String(text)) = object.remove("prompt_string") {
                if has_media(object.get("multimodal_data")) {
                    return Err(not_multimodal(param));
                }
                vec![InputPart::Text(text)]
            } else {
                return Err(InvalidRequest::field(
                    param,
                    "an input object holds prompt_string (a string) or content (text parts)",
                ));
            }
        }
        _ => return Err(bad_input(param)),
    };
    Ok(EmbedInput::Parts(parts))
}

/// A list of token ids and strings, in order; consecutive ids are one part.
fn mixed(items: Vec<Value>, param: &str) -> Result<Vec<InputPart>, InvalidRequest> {
    let mut parts: Vec<InputPart> = Vec::new();
    for item in items {
        match item {
            Value::String(text) => parts.push(InputPart::Text(text)),
            Value::Number(n) => {
                let token = n
                    .as_i64()
                    .and_then(|t| Token::try_from(t).ok())
                    .filter(|&t| t >= 0)
                    .ok_or_else(|| {
                        InvalidRequest::field(param, format!("{n} is not a token id"))
                    })?;
                match parts.last_mut() {
                    Some(InputPart::Tokens(tokens)) => tokens.push(token),
                    _ => parts.push(InputPart::Tokens(vec![token])),
                }
            }
            _ => return Err(bad_input(param)),
        }
    }
    Ok(parts)
}

/// OpenAI's content parts: text only (the served model has no multimodal projector); their
/// texts joined, as llama-server tokenizes them.
fn content_text(content: Value, param: &str) -> Result<String, InvalidRequest> {
    let Value::Array(parts) = content else {
        return Err(InvalidRequest::field(
            format!("{param}.content"),
            "content must be a list of parts",
        ));
    };
    let mut text = String::new();
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => text.push_str(t),
                None => {
                    return Err(InvalidRequest::field(
                        format!("{param}.content"),
                        "a text part needs a string text",
                    ))
                }
            },
            Some("image_url" | "input_audio" | "input_video" | "file") => {
                return Err(not_multimodal(param))
            }
            other => {
                return Err(InvalidRequest::field(
                    format!("{param}.content"),
                    format!("unsupported content part type {other:?}"),
                ))
            }
        }
    }
    Ok(text)
}

fn not_multimodal(param: &str) -> InvalidRequest {
    InvalidRequest::field(
        param,
        "multimodal input is not supported: the served model has no multimodal projector",
    )
}

fn bad_input(param: &str) -> InvalidRequest {
    InvalidRequest::field(
        param,
        "an input is a string, a list of token ids and strings, or an object with prompt_string \
         or content",
    )
}

/// One input's result from its worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub n_tokens: u32,
}

/// The response body of an embeddings request.
pub fn embeddings_response(shape: EmbeddingsShape, model: &str, results: Vec<Embedded>) -> Value {
    match shape {
        EmbeddingsShape::Native => serde_json::to_value(
            results
                .into_iter()
                .enumerate()
                .map(|(index, r)| NativeEmbedding {
                    index,
                    embedding: r.vectors,
                })
                .collect::<Vec<_>>(),
        ),
        EmbeddingsShape::OpenAi { base64 } => {
            let n_tokens = results.iter().map(|r| u64::from(r.n_tokens)).sum();
            let data = results
                .into_iter()
                .enumerate()
                .map(|(index, r)| {
                    let vector = r.vectors.into_iter().next().unwrap_or_default();
                    OpenAiEmbedding {
                        embedding: if base64 {
                            VectorBody::Base64(encode_base64(&vector))
                        } else {
                            VectorBody::Floats(vector)
                        },
                        index,
                        object: "embedding",
                        encoding_format: base64.then_some("base64"),
                    }
                })
                .collect();
            serde_json::to_value(OpenAiEmbeddings {
                model,
                object: "list",
                usage: Usage {
                    prompt_tokens: n_tokens,
                    total_tokens: n_tokens,
                },
                data,
            })
        }
    }
    .expect("embeddings serialize to JSON")
}

/// A vector as the base64 of its little-endian f32s (what the `openai` client decodes).
fn encode_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[derive(Serialize)]
struct NativeEmbedding {
    index: usize,
    embedding: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct OpenAiEmbeddings<'a> {
    model: &'a str,
    object: &'static str,
    usage: Usage,
    data: Vec<OpenAiEmbedding>,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct OpenAiEmbedding {
    embedding: VectorBody,
    index: usize,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding_format: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum VectorBody {
    Floats(Vec<f32>),
    Base64(String),
}

/// A checked rerank request.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<String>,
    pub top_n: usize,
    /// TEI's shape (the body named its documents `texts`): a bare list, `score` not
    /// `relevance_score`, and each document's text with `return_text`.
    pub tei: bool,
    pub return_text: bool,
}

#[derive(Debug, Deserialize)]
struct RerankBody {
    model: Option<String>,
    query: Option<Value>,
    documents: Option<Vec<String>>,
    texts: Option<Vec<String>>,
    top_n: Option<u64>,
    return_text: Option<bool>,
}

impl RerankRequest {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidRequest> {
        let body: RerankBody = parse_json(body)?;
        let tei = body.texts.is_some();
        let query = match body.query {
            Some(Value::String(query)) => query,
            Some(_) => return Err(InvalidRequest::field("query", "\"query\" must be a string")),
            None => return Err(InvalidRequest::field("query", "\"query\" must be provided")),
        };
        let (param, documents) = match (body.documents, body.texts) {
            (Some(documents), _) => ("documents", documents),
            (None, Some(texts)) => ("texts", texts),
            (None, None) => ("documents", Vec::new()),
        };
        if documents.is_empty() {
            return Err(InvalidRequest::field(
                param,
                "\"documents\" must be a non-empty string array",
            ));
        }
        if documents.len() > MAX_INPUTS {
            return Err(InvalidRequest::field(
                param,
                format!("at most {MAX_INPUTS} documents per request"),
            ));
        }
        let top_n = body.top_n.map_or(documents.len(), |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
        Ok(Self {
            model: body.model,
            query,
            documents,
            top_n,
            tei,
            return_text: tei && body.return_text.unwrap_or(false),
        })
    }

    /// One ranking input per document.
    pub fn inputs(&self) -> Vec<EmbedInput> {
        self.documents
            .iter()
            .map(|document| EmbedInput::Rerank {
                query: self.query.clone(),
                document: document.clone(),
            })
            .collect()
    }

    /// The response body from each document's score and tokens (in document order): best
    /// first, at most `top_n`.
    pub fn response(&self, model: &str, scored: &[(f32, u32)]) -> Value {
        let n_tokens: u64 = scored.iter().map(|&(_, n)| u64::from(n)).sum();
        let mut order: Vec<usize> = (0..scored.len()).collect();
        order.sort_by(|&a, &b| scored[b].0.total_cmp(&scored[a].0));
        order.truncate(self.top_n);
        let label = if self.tei { "score" } else { "relevance_score" };
        let results: Vec<Value> = order
            .into_iter()
            .map(|index| {
                let mut result = serde_json::Map::new();
                result.insert("index".into(), index.into());
                result.insert(label.into(), f64::from(scored[index].0).into());
                if self.return_text {
                    result.insert("text".into(), self.documents[index].clone().into());
                }
                Value::Object(result)
            })
            .collect();
        if self.tei {
            return Value::Array(results);
        }
        serde_json::json!({
            "model": model,
            "object": "list",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            "results": results,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<EmbeddingsRequest, InvalidRequest> {
        EmbeddingsRequest::parse(body.to_string().as_bytes(), true)
    }

    fn text(t: &str) -> EmbedInput {
        EmbedInput::Parts(vec![InputPart::Text(t.into())])
    }

    #[test]
    fn inputs_take_every_shape_llama_server_takes() {
        let inputs = |input: Value| parse(json!({ "input": input })).unwrap().inputs;
        assert_eq!(inputs(json!("a")), [text("a")]);
        assert_eq!(
            inputs(json!([12, 34, "s", 56])),
            [EmbedInput::Parts(vec![
                InputPart::Tokens(vec![12, 34]),
                InputPart::Text("s".into()),
                InputPart::Tokens(vec![56]),
            ])],
            "a list with token ids is one input"
        );
        assert_eq!(inputs(json!(["a", "b"])), [text("a"), text("b")]);
        assert_eq!(
            inputs(json!(["a", [1, 2], {"prompt_string": "c"},
                {"content": [{"type": "text", "text": "d "}, {"type": "text", "text": "e"}]}])),
            [
                text("a"),
                EmbedInput::Parts(vec![InputPart::Tokens(vec![1, 2])]),
                text("c"),
                text("d e"),
            ]
        );
    }

    #[test]
    fn bad_inputs_are_refused_naming_the_field() {
        let refused = |body: Value| match parse(body) {
            Err(InvalidRequest::Field { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(json!({})), "input");
        assert_eq!(refused(json!({"input": []})), "input");
        assert_eq!(refused(json!({"input": true})), "input");
        assert_eq!(refused(json!({"input": {"content": "s"}})), "input.content");
        assert_eq!(
            refused(json!({"input": {"content": [{"type": "unknown"}]}})),
            "input.content"
        );
        assert_eq!(
            refused(json!({"input": [{"content": [{"type": "image_url", "image_url": {}}]}]})),
            "input[0]"
        );
        assert_eq!(refused(json!({"input": [[1, [2]]]})), "input[0]");
        assert_eq!(refused(json!({"input": [1, -2]})), "input");
        assert_eq!(
            refused(json!({"input": "a", "encoding_format": "hex"})),
            "encoding_format"
        );
        assert_eq!(
            refused(json!({"input": "a", "encoding_format": 1})),
            "encoding_format"
        );
        let many = vec!["x"; MAX_INPUTS + 1];
        assert_eq!(refused(json!({ "input": many })), "input");
    }

    #[test]
    fn content_means_the_native_shape_and_normalisation_defaults_to_euclidean() {
        let r = parse(json!({"content": "a"})).unwrap();
        assert_eq!((r.shape, r.normalize), (EmbeddingsShape::Native, 2));
        let r = parse(json!({"input": "a", "encoding_format": "base64", "embd_normalize": -1}))
            .unwrap();
        assert_eq!(
            (r.shape, r.normalize),
            (EmbeddingsShape::OpenAi { base64: true }, -1)
        );
    }

    #[test]
    fn responses_have_openais_and_llama_servers_shapes() {
        let results = || {
            vec![
                Embedded {
                    vectors: vec![vec![1.0, 0.5]],
                    n_tokens: 3,
                },
                Embedded {
                    vectors: vec![vec![0.25, 2.0]],
                    n_tokens: 4,
                },
            ]
        };
        let openai = embeddings_response(EmbeddingsShape::OpenAi { base64: false }, "m", results());
        assert_eq!(
            openai,
            json!({"model": "m", "object": "list",
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
                "data": [{"embedding": [1.0, 0.5], "index": 0, "object": "embedding"},
                         {"embedding": [0.25, 2.0], "index": 1, "object": "embedding"}]})
        );
        let b64 = embeddings_response(EmbeddingsShape::OpenAi { base64: true }, "m", results());
        let encoded = b64["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), 0.5f32.to_le_bytes()].concat());
        assert_eq!(b64["data"][0]["encoding_format"], "base64");
        let native = embeddings_response(EmbeddingsShape::Native, "m", results());
        assert_eq!(native[1], json!({"index": 1, "embedding": [[0.25, 2.0]]}));
    }

    #[test]
    fn rerank_orders_by_score_keeps_top_n_and_speaks_jina_or_tei() {
        let jina = RerankRequest::parse(
            json!({"query": "q", "documents": ["a", "b", "c"], "top_n": 2})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let scored = [(0.1, 3), (0.9, 4), (-1.0, 5)];
        let body = jina.response("m", &scored);
        assert_eq!(body["usage"]["prompt_tokens"], 12);
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["index"], 1);
        assert_eq!(results[1]["index"], 0);
        assert!(results[0].get("relevance_score").is_some());
        let tei = RerankRequest::parse(
            json!({"query": "q", "texts": ["a", "b", "c"], "return_text": true})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let body = tei.response("m", &scored);
        assert_eq!(body.as_array().unwrap().len(), 3);
        assert_eq!(body[0]["text"], "b");
        assert!(body[0].get("score").is_some());
        for bad in [
            json!({"documents": ["a"]}),
            json!({"query": 1, "documents": ["a"]}),
            json!({"query": "q", "documents": []}),
            json!({"query": "q"}),
            json!({"query": "q", "documents": [1]}),
            json!({"query": "q", "documents": ["a"], "top_n": -1}),
        ] {
            assert!(
                RerankRequest::parse(bad.to_string().as_bytes()).is_err(),
                "{bad}"
            );
        }
    }
}
