//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as
//! llama-server serves it: [`request`] turns a Messages body into the same validated chat
//! request the OpenAI route runs; [`response`] holds the message body and the stream's
//! events in Anthropic's shapes. The route's adapters are `crate::http::messages`.
//!
//! Served: `system` (a string or text blocks), `messages` with string or text-block content,
//! `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k`, `stream`; `metadata` and
//! `thinking` are accepted (the model's reasoning is not separated into thinking blocks yet).
//! Tool use (`tools`, `tool_choice`, `tool_use`/`tool_result` blocks) and images are refused
//! by name with a 400.

pub mod request;
pub mod response;
