//! Which grammar constrains a request: at most one of `response_format`, llama-server's
//! `json_schema` and `grammar`, each turned into GBNF text (a JSON schema through
//! [`crate::openai::grammar`], which builds the grammars). A second constraint, or a schema
//! the builder cannot turn into a grammar, is a 400 naming the field it came in.

use serde_json::Value;

use super::body::{is_neutral, GenerationBody};
use super::invalid::InvalidRequest;
use crate::openai::grammar;

/// Structured output: at most one of `response_format` (`text`, `json_object` with an
/// optional `schema`, `json_schema` with `json_schema.schema`), llama-server's `json_schema`
/// (a schema) and `grammar` (GBNF text), turned into one GBNF grammar. Neutral values
/// (`null`, `""`, `{}`, `{"type": "text"}`) ask for nothing. A schema outside what
/// [`grammar::schema_grammar`] supports is a 400 naming the field it came in.
impl GenerationBody {
    pub(super) fn grammar(&self) -> Result<Option<String>, InvalidRequest> {
        let mut found: Vec<(&'static str, String)> = Vec::new();
        if let Some(format) = self.response_format.as_ref().filter(|v| !is_neutral(v)) {
            if let Some(g) = response_format_grammar(format)? {
                found.push(("response_format", g));
            }
        }
        if let Some(schema) = self.json_schema.as_ref().filter(|v| !v.is_null()) {
            found.push(("json_schema", schema_grammar("json_schema", schema)?));
        }
        match &self.grammar {
            None | Some(Value::Null) => {}
            Some(Value::String(g)) if g.is_empty() => {}
            Some(Value::String(g)) => found.push(("grammar", g.clone())),
            Some(_) => {
                return Err(InvalidRequest::field(
                    "grammar",
                    "grammar must be a string of GBNF rules",
                ))
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, g)| g)),
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

fn response_format_grammar(format: &Value) -> Result<Option<String>, InvalidRequest> {
    let bad = |message: &str| InvalidRequest::field("response_format", message);
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format must be an object with a \"type\": \"text\", \"json_object\" or \"json_schema\"")
    })?;
    match kind {
        "text" => Ok(None),
        // llama-server's extension: a json_object may carry a schema.
        "json_object" => match format.get("schema").filter(|s| !is_neutral(s)) {
            Some(schema) => schema_grammar("response_format", schema).map(Some),
            None => Ok(Some(grammar::json_object_grammar())),
        },
        "json_schema" => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required"))?;
            if is_neutral(schema) {
                // llama-server: an empty schema is any object.
                return Ok(Some(grammar::json_object_grammar()));
            }
            schema_grammar("response_format", schema).map(Some)
        }
        other => Err(bad(&format!(
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {other:?}"
        ))),
    }
}

fn schema_grammar(param: &'static str, schema: &Value) -> Result<String, InvalidRequest> {
    grammar::schema_grammar(schema).map_err(|e| {
        InvalidRequest::field(
            param,
            format!("{param}: this server cannot turn the JSON schema into a grammar: {e}"),
        )
    })
}
