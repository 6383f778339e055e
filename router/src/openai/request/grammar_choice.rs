//! Which constraint a request's output follows: at most one of `response_format`,
//! llama-server's `json_schema` and `grammar`. A JSON schema travels as text to the worker,
//! where llama.cpp's own converter turns it into a grammar (for a chat request together with
//! its tools), so every schema llama-server accepts is accepted. A second constraint, or a
//! schema that is not a JSON object, is a 400 naming the field it came in.

use serde_json::Value;

use super::body::{is_neutral, GenerationBody};
use super::invalid::InvalidRequest;

/// What the output must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// GBNF text (llama-server's `grammar`).
    Grammar(String),
    /// A JSON schema's text, and the field it came in.
    Schema(&'static str, String),
}

/// llama-server's schema for `json_object` without one, and for an empty schema: any object.
const ANY_OBJECT: &str = r#"{"type":"object"}"#;

/// Structured output: at most one of `response_format` (`text`, `json_object` with an
/// optional `schema`, `json_schema` with `json_schema.schema`), llama-server's `json_schema`
/// (a schema) and `grammar` (GBNF text). Neutral values (`null`, `""`, `{}`, `{"type":
/// "text"}`) ask for nothing.
impl GenerationBody {
    pub(super) fn constraint(&self) -> Result<Option<Constraint>, InvalidRequest> {
        let mut found: Vec<(&'static str, Constraint)> = Vec::new();
        if let Some(format) = self.response_format.as_ref().filter(|v| !is_neutral(v)) {
            if let Some(schema) = response_format_schema(format)? {
                found.push(("response_format", schema));
            }
        }
        if let Some(schema) = self.json_schema.as_ref().filter(|v| !v.is_null()) {
            found.push(("json_schema", schema_text("json_schema", schema)?));
        }
        match &self.grammar {
            None | Some(Value::Null) => {}
            Some(Value::String(g)) if g.is_empty() => {}
            Some(Value::String(g)) => found.push(("grammar", Constraint::Grammar(g.clone()))),
            Some(_) => {
                return Err(InvalidRequest::field(
                    "grammar",
                    "grammar must be a string of GBNF rules",
                ))
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, c)| c)),
            _ => Err(InvalidRequest::field(
                found[1].0,
                format!(
                    "{} and {} cannot be used together: give one constraint",
                    found[0].0, found[1].0
                ),
            )),
        }
    }
}

fn response_format_schema(format: &Value) -> Result<Option<Constraint>, InvalidRequest> {
    let bad = |message: &str| InvalidRequest::field("response_format", message);
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format must be an object with a \"type\": \"text\", \"json_object\" or \"json_schema\"")
    })?;
    match kind {
        "text" => Ok(None),
        // llama-server's extension: a json_object may carry a schema.
        "json_object" => match format.get("schema").filter(|s| !is_neutral(s)) {
            Some(schema) => schema_text("response_format", schema).map(Some),
            None => Ok(Some(Constraint::Schema("response_format", ANY_OBJECT.into()))),
        },
        "json_schema" => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required"))?;
            schema_text("response_format", schema).map(Some)
        }
        other => Err(bad(&format!(
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
        ))),
    }
}

/// A schema as the worker gets it: an object's text (`{}` is any object, as llama-server).
fn schema_text(param: &'static str, schema: &Value) -> Result<Constraint, InvalidRequest> {
    match schema {
        Value::Object(map) if map.is_empty() => Ok(Constraint::Schema(param, ANY_OBJECT.into())),
        Value::Object(_) => {
            check_schema_size(param, schema)?;
            Ok(Constraint::Schema(param, schema.to_string()))
        }
        _ => Err(InvalidRequest::field(
            param,
            format!("{param}: a JSON schema must be an object"),
        )),
    }
}

/// The most optional properties one object of a schema may have: llama.cpp's grammar for them
/// grows with their square (1 000 cost seconds of a worker's prepare thread, which every
/// request to that worker waits behind; OpenAI's structured outputs allowed 100 properties).
pub const MAX_OPTIONAL_PROPERTIES: usize = 100;
/// The deepest a schema's objects may nest (llama.cpp's converter recurses per level; OpenAI
/// allows 10).
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// The most properties a whole schema may have (OpenAI's limit for structured outputs).
pub const MAX_SCHEMA_PROPERTIES: usize = 5000;

/// Bounds what a JSON schema (structured output, a tool's parameters) costs to turn into a
/// grammar: nesting, optional properties per object, properties in all. `param` names the
/// field.
pub(super) fn check_schema_size(param: &str, schema: &Value) -> Result<(), InvalidRequest> {
    let mut total = 0usize;
    let mut pending = vec![(schema, 0usize)];
    while let Some((node, depth)) = pending.pop() {
        match node {
            Value::Array(items) => pending.extend(items.iter().map(|i| (i, depth))),
            Value::Object(map) => {
                if depth == MAX_SCHEMA_DEPTH {
                    return Err(InvalidRequest::field(
                        param,
                        format!("{param}: the JSON schema is nested more than {MAX_SCHEMA_DEPTH} objects deep"),
                    ));
                }
                if let Some(Value::Object(properties)) = map.get("properties") {
                    let required = map
                        .get("required")
                        .and_then(Value::as_array)
                        .map_or(0, |r| {
                            r.iter()
                                .filter(|k| k.as_str().is_some_and(|k| properties.contains_key(k)))
                                .count()
                        });
                    let optional = properties.len().saturating_sub(required);
                    if optional > MAX_OPTIONAL_PROPERTIES {
                        return Err(InvalidRequest::field(
                            param,
                            format!("{param}: an object of the JSON schema has {optional} optional properties; at most {MAX_OPTIONAL_PROPERTIES} are supported (list the others in \"required\")"),
                        ));
                    }
                    total += properties.len();
                    if total > MAX_SCHEMA_PROPERTIES {
                        return Err(InvalidRequest::field(
                            param,
                            format!("{param}: the JSON schema has more than {MAX_SCHEMA_PROPERTIES} properties"),
                        ));
                    }
                }
                pending.extend(map.values().map(|v| (v, depth + 1)));
            }
            _ => {}
        }
    }
    Ok(())
}
