//! The model a request body names, read before anything else of it: with several models the
//! router must know which model's permits and workers a request goes to before it parses the
//! body in full.

use serde::Deserialize;

use super::{parse_json, InvalidRequest};

/// The body's `model` when it is a string; `None` when it is absent or any other value (the
/// route's own parse then refuses what it must). Every other field is skipped unread, so the
/// cost is one pass over the bytes; a body that is not a JSON object is refused as the routes
/// refuse it.
pub fn requested_model(body: &[u8]) -> Result<Option<String>, InvalidRequest> {
    parse_json::<NamedModel>(body).map(|named| named.model)
}

/// What a body says its model is; every other field is skipped unread.
#[derive(Debug, Deserialize)]
struct NamedModel {
    #[serde(default, deserialize_with = "name_or_nothing")]
    model: Option<String>,
}

/// A string, or nothing for any other value (the handler then refuses it by its own rules).
fn name_or_nothing<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a model name")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_string_names_a_model() {
        let name = |body: &str| requested_model(body.as_bytes());
        assert_eq!(
            name(r#"{"model": "gemma", "x": [1, {"a": 2}]}"#).unwrap(),
            Some("gemma".into())
        );
        for other in [
            r#"{}"#,
            r#"{"model": null}"#,
            r#"{"model": 5}"#,
            r#"{"model": ["a"]}"#,
            r#"{"model": {"a": "b"}}"#,
            r#"{"model": true}"#,
        ] {
            assert_eq!(name(other).unwrap(), None, "{other}");
        }
        for bad in ["", "{", "not json", "\"model\""] {
            assert!(name(bad).is_err(), "{bad}");
        }
        let deep = "[".repeat(100_000);
        assert!(name(&format!(r#"{{"a": {deep}"#)).is_err());
    }
}
