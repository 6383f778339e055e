//! [`InvalidRequest`], why a request body was refused (every variant names the field at
//! fault), and [`parse_json`], which turns body bytes into one of the body types and names the
//! field whose value has the wrong type. Every step of the request module reports through it;
//! `crate::error` maps it to HTTP.

use llamapool_common::ParamError;
use serde::de::DeserializeOwned;

/// Why a request body was refused. Mapped to HTTP in `crate::error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The body is not JSON, or not an object.
    #[error("{0}")]
    Body(String),
    /// A field is missing, of the wrong type or out of range.
    #[error("{message}")]
    Field { param: String, message: String },
    /// A field this server does not honour yet was given a value that needs it.
    #[error("{param} is not supported by this server{detail}")]
    Unsupported { param: &'static str, detail: String },
    #[error("the model {requested:?} does not exist; this server serves {served:?}")]
    UnknownModel { requested: String, served: String },
}

impl InvalidRequest {
    /// A refused field, named by its path, and why.
    pub(crate) fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<ParamError> for InvalidRequest {
    fn from(e: ParamError) -> Self {
        Self::field(e.param, e.message)
    }
}

/// Deserializes a JSON body into `T`, naming the failing field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, InvalidRequest> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                InvalidRequest::field(path.clone(), format!("invalid value for {path}: {inner}"))
            }
            serde_json::error::Category::Data => {
                InvalidRequest::Body(format!("the body must be a JSON object: {inner}"))
            }
            _ => InvalidRequest::Body(format!("the body is not valid JSON: {inner}")),
        }
    })
}
