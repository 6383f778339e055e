//! JSON schemas to GBNF grammars (llama.cpp's grammar format), for structured output.
//!
//! `request.rs` calls [`json_object_grammar`] for `response_format: {"type": "json_object"}`
//! and [`schema_grammar`] for a JSON schema (`response_format.json_schema.schema`, or
//! llama-server's `json_schema`); the grammar travels in `SamplingParams::grammar` and the
//! worker's llama.cpp grammar sampler enforces it.
//!
//! The schema subset: `type` (one name or a list), `object` with `properties` and `required`
//! (properties are written in name order; `additionalProperties` is accepted and no others are
//! generated), `string` with `minLength`/`maxLength`, `integer`, `number`, `boolean`, `null`,
//! `array` with `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`, `nullable`, the
//! empty schema (any JSON value), and annotations (`title`, `description`, …). Any other
//! keyword (`pattern`, `format`, `$ref`, `minimum`, …) is refused with its path, rather than
//! generating output that might not validate. Whitespace is limited to one optional space
//! between tokens, so that a model cannot pad the output with newlines until `max_tokens`.
//!
//! Size: every sub-schema that is not a bare primitive becomes a named rule (identical bodies
//! share one), so an array's `item ("," item)*` names its item instead of copying it and the
//! grammar grows linearly with the schema. The converter stops with an error, naming the path
//! where it was, past [`MAX_DEPTH`] nested schemas or once the grammar would exceed
//! [`MAX_GRAMMAR_BYTES`] (the limit on any grammar); the result also passes
//! [`gbnf::check`] (what llama.cpp's parser will cost), or the error names the schema (`$`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use llamapool_common::{gbnf, SamplingParams};
use serde_json::{Map, Value};

/// A schema this converter cannot turn into a grammar, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at {path})")]
pub struct SchemaError {
    /// A JSON path inside the schema, `$` being the schema itself.
    pub path: String,
    pub message: String,
}

/// Keywords that do not constrain the output.
const ANNOTATIONS: [&str; 9] = [
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "strict",
];

/// Most alternatives, properties or repetitions a schema may ask for: keeps grammars small.
const MAX_ITEMS: u64 = 1000;

/// Deepest nesting of schemas in schemas (`items`, `properties`, `anyOf`); OpenAI allows 10.
pub const MAX_DEPTH: usize = 64;

/// Largest grammar the converter builds: the limit on any grammar.
pub const MAX_GRAMMAR_BYTES: usize = SamplingParams::MAX_GRAMMAR_BYTES;

/// The shared rules: JSON's primitives, and a generic value for `{}`.
const PRIMITIVES: &str = r#"space ::= " "?
char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
string ::= "\"" char* "\"" space
integral-part ::= [0] | [1-9] [0-9]{0,15}
integer ::= "-"? integral-part space
number ::= "-"? integral-part ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})? space
boolean ::= ("true" | "false") space
null ::= "null" space
value ::= object | array | string | number | boolean | null
object ::= "{" space (string ":" space value ("," space string ":" space value)*)? "}" space
array ::= "[" space (value ("," space value)*)? "]" space
"#;

/// `response_format: {"type": "json_object"}`: any JSON object.
pub fn json_object_grammar() -> String {
    format!("root ::= object\n{PRIMITIVES}")
}

/// A grammar whose language is (a subset of) the JSON documents `schema` accepts.
pub fn schema_grammar(schema: &Value) -> Result<String, SchemaError> {
    let mut converter = Converter {
        bytes: PRIMITIVES.len(),
        ..Converter::default()
    };
    let root = converter.visit(schema, "$")?;
    converter.charge("root", &root, "$")?;
    let mut out = format!("root ::= {root}\n");
    for (name, body) in &converter.rules {
        let _ = writeln!(out, "{name} ::= {body}");
    }
    out.push_str(PRIMITIVES);
    gbnf::check(&out).map_err(|message| error("$", message))?;
    Ok(out)
}

#[derive(Default)]
struct Converter {
    /// Named rules beyond the primitives, by name.
    rules: BTreeMap<String, String>,
    /// The rule of each sub-schema body, so that identical ones share a rule.
    named: HashMap<String, String>,
    /// The grammar's size so far.
    bytes: usize,
    /// How many schemas the one being visited is inside.
    depth: usize,
    /// Objects with optional properties so far (their rules' names).
    objects: usize,
}

/// Longest path an error shows: its end, after `$…`.
const MAX_PATH_CHARS: usize = 160;

fn error(path: &str, message: impl Into<String>) -> SchemaError {
    let chars = path.chars().count();
    let path = if chars > MAX_PATH_CHARS {
        let tail: String = path.chars().skip(chars - MAX_PATH_CHARS).collect();
        // From a segment's start, where there is one.
        let from = tail.find('.').unwrap_or(0);
        format!("$…{}", &tail[from..])
    } else {
        path.to_string()
    };
    SchemaError {
        path,
        message: message.into(),
    }
}

/// A GBNF literal matching exactly `text`.
fn literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON text of `value` as a literal, followed by optional space.
fn json_literal(value: &Value) -> String {
    format!("{} space", literal(&value.to_string()))
}

fn count(map: &Map<String, Value>, key: &str, path: &str) -> Result<Option<u64>, SchemaError> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_ITEMS => Ok(Some(n)),
            _ => Err(error(
                path,
                format!("{key} must be an integer between 0 and {MAX_ITEMS}"),
            )),
        },
    }
}

/// `item` repeated between `min` and `max` times (unbounded when `None`), separated by `sep`.
fn repeat(item: &str, sep: &str, min: u64, max: Option<u64>) -> String {
    let tail = format!("({sep} {item})");
    let body = match (min, max) {
        (_, Some(0)) => return String::new(),
        (0 | 1, None) => format!("{item} {tail}*"),
        (m, None) => format!("{item} {tail}{{{},}}", m - 1),
        (m, Some(x)) => format!("{item} {tail}{{{},{}}}", m.saturating_sub(1), x - 1),
    };
    if min == 0 {
        format!("({body})?")
    } else {
        body
    }
}

impl Converter {
    /// Counts a rule `name ::= body` against [`MAX_GRAMMAR_BYTES`].
    fn charge(&mut self, name: &str, body: &str, path: &str) -> Result<(), SchemaError> {
        self.bytes += name.len() + body.len() + " ::= \n".len();
        if self.bytes > MAX_GRAMMAR_BYTES {
            return Err(error(
                path,
                format!(
                    "the schema's grammar would be larger than {} KiB",
                    MAX_GRAMMAR_BYTES / 1024
                ),
            ));
        }
        Ok(())
    }

    fn add_rule(&mut self, name: String, body: String, path: &str) -> Result<(), SchemaError> {
        self.charge(&name, &body, path)?;
        self.rules.insert(name, body);
        Ok(())
    }

    /// A sub-schema's expression as a rule name: a primitive's own, or a rule made for it
    /// (shared by identical sub-schemas), so that repeating it repeats only its name.
    fn visit_named(&mut self, schema: &Value, path: &str) -> Result<String, SchemaError> {
        let expr = self.visit(schema, path)?;
        if expr.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Ok(expr);
        }
        if let Some(name) = self.named.get(&expr) {
            return Ok(name.clone());
        }
        let name = format!("schema-{}", self.named.len());
        self.named.insert(expr.clone(), name.clone());
        self.add_rule(name.clone(), expr, path)?;
        Ok(name)
    }

    /// An expression for `schema`, found at `path`.
    fn visit(&mut self, schema: &Value, path: &str) -> Result<String, SchemaError> {
        if self.depth >= MAX_DEPTH {
            return Err(error(
                path,
                format!("the schema nests more than {MAX_DEPTH} schemas deep"),
            ));
        }
        self.depth += 1;
        let expr = self.visit_here(schema, path);
        self.depth -= 1;
        expr
    }

    fn visit_here(&mut self, schema: &Value, path: &str) -> Result<String, SchemaError> {
        let map = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Object(map) => map,
            _ => {
                return Err(error(
                    path,
                    "a schema must be an object (or true for any value)",
                ))
            }
        };
        for key in map.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "type"
                        | "properties"
                        | "required"
                        | "additionalProperties"
                        | "items"
                        | "minItems"
                        | "maxItems"
                        | "minLength"
                        | "maxLength"
                        | "enum"
                        | "const"
                        | "anyOf"
                        | "nullable"
                );
            if !known {
                return Err(error(
                    path,
                    format!("the JSON schema keyword {key:?} is not supported"),
                ));
            }
        }
        let expr = self.visit_inner(map, path)?;
        if map.get("nullable") == Some(&Value::Bool(true)) {
            return Ok(format!("({expr} | null)"));
        }
        Ok(expr)
    }

    fn visit_inner(&mut self, map: &Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        if let Some(value) = map.get("const") {
            return Ok(json_literal(value));
        }
        if let Some(values) = map.get("enum") {
            let values = values
                .as_array()
                .filter(|v| !v.is_empty() && v.len() as u64 <= MAX_ITEMS)
                .ok_or_else(|| {
                    error(
                        path,
                        format!("enum must be a non-empty array of at most {MAX_ITEMS} values"),
                    )
                })?;
            let alternatives: Vec<String> = values.iter().map(json_literal).collect();
            return Ok(format!("({})", alternatives.join(" | ")));
        }
        if let Some(options) = map.get("anyOf") {
            let options = options
                .as_array()
                .filter(|v| !v.is_empty() && v.len() as u64 <= MAX_ITEMS)
                .ok_or_else(|| error(path, "anyOf must be a non-empty array of schemas"))?;
            let alternatives = options
                .iter()
                .enumerate()
                .map(|(i, o)| self.visit_named(o, &format!("{path}.anyOf[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(format!("({})", alternatives.join(" | ")));
        }
        let types: Vec<&str> = match map.get("type") {
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(list)) if !list.is_empty() => list
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| error(path, "type must be a string or a list of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(error(
                    path,
                    "type must be a string or a non-empty list of strings",
                ))
            }
        };
        let alternatives = types
            .into_iter()
            .map(|t| self.typed(t, map, path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match alternatives.as_slice() {
            [one] => one.clone(),
            _ => format!("({})", alternatives.join(" | ")),
        })
    }

    fn typed(
        &mut self,
        kind: &str,
        map: &Map<String, Value>,
        path: &str,
    ) -> Result<String, SchemaError> {
        Ok(match kind {
            "string" => {
                let min = count(map, "minLength", path)?;
                let max = count(map, "maxLength", path)?;
                match (min, max) {
                    (None, None) => "string".into(),
                    (min, max) => {
                        let min = min.unwrap_or(0);
                        if max.is_some_and(|max| max < min) {
                            return Err(error(path, "maxLength is below minLength"));
                        }
                        let max = max.map(|m| m.to_string()).unwrap_or_default();
                        format!("\"\\\"\" char{{{min},{max}}} \"\\\"\" space")
                    }
                }
            }
            "integer" | "number" | "boolean" | "null" => kind.into(),
            "object" => self.object(map, path)?,
            "array" => {
                let item = match map.get("items") {
                    None => "value".to_string(),
                    Some(items) => self.visit_named(items, &format!("{path}.items"))?,
                };
                let min = count(map, "minItems", path)?.unwrap_or(0);
                let max = count(map, "maxItems", path)?;
                if max.is_some_and(|max| max < min) {
                    return Err(error(path, "maxItems is below minItems"));
                }
                let items = repeat(&item, "\",\" space", min, max);
                format!("\"[\" space {items} \"]\" space")
            }
            other => {
                return Err(error(
                    path,
                    format!("unknown type {other:?}: expected string, integer, number, boolean, null, object or array"),
                ))
            }
        })
    }

    fn object(&mut self, map: &Map<String, Value>, path: &str) -> Result<String, SchemaError> {
        let empty = Map::new();
        let properties = match map.get("properties") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(error(path, "properties must be an object")),
        };
        if properties.len() as u64 > MAX_ITEMS {
            return Err(error(path, format!("at most {MAX_ITEMS} properties")));
        }
        let required: Vec<&str> = match map.get("required") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|r| {
                    r.as_str()
                        .ok_or_else(|| error(path, "required must list property names"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(error(path, "required must be an array")),
        };
        if let Some(missing) = required.iter().find(|r| !properties.contains_key(**r)) {
            return Err(error(
                path,
                format!("required property {missing:?} is not in properties"),
            ));
        }
        if properties.is_empty() {
            // No property is described: any object.
            return Ok("object".into());
        }
        let mut mandatory = Vec::new();
        let mut optional = Vec::new();
        for (name, schema) in properties {
            let value = self.visit_named(schema, &format!("{path}.properties.{name}"))?;
            let pair = format!(
                "{} \":\" space {value}",
                json_literal(&Value::String(name.clone()))
            );
            if required.contains(&name.as_str()) {
                mandatory.push(pair);
            } else {
                optional.push(pair);
            }
        }
        // Any ordered subset of the optional properties: rule i is "a non-empty subset of the
        // properties from i on", `pair_i ("," rule_{i+1})? | rule_{i+1}`.
        let id = self.objects;
        self.objects += usize::from(!optional.is_empty());
        let mut next: Option<String> = None;
        for (i, pair) in optional.iter().enumerate().rev() {
            let body = match &next {
                None => pair.clone(),
                Some(rest) => format!("{pair} (\",\" space {rest})? | {rest}"),
            };
            // Identical objects share their rules.
            let name = match self.named.get(&body) {
                Some(name) => name.clone(),
                None => {
                    let name = format!("object-{id}-optional-{i}");
                    self.named.insert(body.clone(), name.clone());
                    self.add_rule(name.clone(), body, path)?;
                    name
                }
            };
            next = Some(name);
        }
        let inside = match (mandatory.is_empty(), next) {
            (false, None) => mandatory.join(" \",\" space "),
            (false, Some(rest)) => {
                format!("{} (\",\" space {rest})?", mandatory.join(" \",\" space "))
            }
            (true, Some(rest)) => format!("({rest})?"),
            (true, None) => unreachable!("properties is not empty"),
        };
        Ok(format!("\"{{\" space {inside} \"}}\" space"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_object_schema_lists_required_then_optional_properties() {
        let g = schema_grammar(&json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            },
            "required": ["name", "age"],
        }))
        .unwrap();
        assert!(g.starts_with("root ::= \"{\" space "), "{g}");
        assert!(g.contains(r#""\"age\"" space ":" space integer"#), "{g}");
        assert!(g.contains(r#""\"name\"" space ":" space string"#), "{g}");
        assert!(g.contains("object-0-optional-0 ::= "), "{g}");
        assert!(g.contains(r#"("\"a\"" space | "\"b\"" space)"#), "{g}");
        assert!(g.contains("{0,2}"), "{g}");
    }

    #[test]
    fn unsupported_keywords_are_named_with_their_path() {
        let e = schema_grammar(&json!({
            "type": "object",
            "properties": {"date": {"type": "string", "format": "date"}},
        }))
        .unwrap_err();
        assert_eq!(e.path, "$.properties.date");
        assert!(e.message.contains("\"format\""), "{e}");
        assert!(schema_grammar(&json!({"$ref": "#/x"})).is_err());
        assert!(schema_grammar(&json!({"type": "tuple"})).is_err());
        assert!(schema_grammar(&json!({"type": "object", "required": ["x"]})).is_err());
        assert!(schema_grammar(&json!(3)).is_err());
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(literal("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\x01""#);
        let g = schema_grammar(&json!({"const": "x\"y"})).unwrap();
        assert!(g.starts_with(r#"root ::= "\"x\\\"y\"" space"#), "{g}");
    }

    #[test]
    fn repetitions_follow_their_bounds() {
        assert_eq!(repeat("i", "\",\"", 0, None), "(i (\",\" i)*)?");
        assert_eq!(repeat("i", "\",\"", 2, Some(4)), "i (\",\" i){1,3}");
        assert_eq!(repeat("i", "\",\"", 3, None), "i (\",\" i){2,}");
        assert_eq!(repeat("i", "\",\"", 0, Some(0)), "");
        assert!(json_object_grammar().starts_with("root ::= object\n"));
        gbnf::check(&json_object_grammar()).unwrap();
    }

    fn nested_arrays(depth: usize) -> Value {
        (0..depth).fold(
            json!({"type": "string"}),
            |inner, _| json!({"type": "array", "items": inner, "minItems": 1}),
        )
    }

    #[test]
    fn nested_arrays_grow_the_grammar_linearly() {
        // The attack: 24 levels used to write each item twice per level, 738 MB of grammar.
        let start = std::time::Instant::now();
        let g = schema_grammar(&nested_arrays(30)).unwrap();
        let took = start.elapsed();
        eprintln!("30 nested arrays: {} bytes of grammar in {took:?}", g.len());
        assert!(took < std::time::Duration::from_millis(100));
        assert!(g.len() < 4 * 1024, "{} bytes", g.len());
        let g60 = schema_grammar(&nested_arrays(60)).unwrap();
        assert!(g60.len() < g.len() * 3);
        assert!(
            g.contains("schema-0 ::= \"[\" space string (\",\" space string)* \"]\" space"),
            "{g}"
        );
    }

    #[test]
    fn deep_schemas_are_refused_with_their_path() {
        let e = schema_grammar(&nested_arrays(1000)).unwrap_err();
        assert!(e.message.contains("more than 64"), "{e}");
        assert!(
            e.path.starts_with("$…") && e.path.ends_with(".items.items"),
            "{e}"
        );
        assert!(e.path.chars().count() < 200, "{e}");
        schema_grammar(&nested_arrays(MAX_DEPTH - 1)).unwrap();
        let deep_any = (0..100).fold(
            json!({"type": "null"}),
            |inner, _| json!({"anyOf": [inner]}),
        );
        assert!(schema_grammar(&deep_any)
            .unwrap_err()
            .message
            .contains("deep"));
    }

    #[test]
    fn wide_and_deep_schemas_stay_small() {
        // Five properties per level, six levels: 5^6 copies if sub-schemas were inlined.
        let tree = (0..6).fold(json!({"type": "integer"}), |inner, level| {
            let properties: Map<String, Value> = (0..5)
                .map(|i| (format!("p{level}-{i}"), inner.clone()))
                .collect();
            json!({"type": "object", "properties": properties, "required": [format!("p{level}-0")]})
        });
        let g = schema_grammar(&tree).unwrap();
        assert!(g.len() < 16 * 1024, "{} bytes", g.len());
        // Strings of one length bound share one rule.
        let strings: Map<String, Value> = (0..500)
            .map(|i| {
                (
                    format!("s{i}"),
                    json!({"type": "string", "maxLength": 1000}),
                )
            })
            .collect();
        let g = schema_grammar(&json!({"type": "object", "properties": strings})).unwrap();
        assert_eq!(g.matches("char{0,1000}").count(), 1);
    }

    #[test]
    fn a_grammar_past_the_budget_is_refused_while_it_is_built() {
        let name = "n".repeat(300);
        let wide: Map<String, Value> = (0..1000)
            .map(|i| (format!("{name}{i}"), json!({"type": "integer"})))
            .collect();
        let e = schema_grammar(&json!({"type": "object", "properties": wide})).unwrap_err();
        assert_eq!(e.path, "$");
        assert!(e.message.contains("larger than 256 KiB"), "{e}");
    }
}
