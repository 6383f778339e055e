//! OpenAI's Responses API (`POST /v1/responses`, also `/responses`), as llama-server serves
//! it: [`request`] turns a Responses body into the same validated chat request the chat route
//! runs; [`response`] holds the response object and the stream's events. The route's adapters
//! are `crate::http::responses`.
//!
//! Served: `instructions`, `input` (a string, or messages whose content is a string or
//! `input_text`/`output_text` parts), `max_output_tokens`, `temperature`, `top_p`, `stream`,
//! and llama-server's `return_progress` and `timings_per_token`. Tools (`tools`,
//! `tool_choice`, `function_call` items), images, files, reasoning items and
//! `previous_response_id` are refused by name with a 400.

pub mod request;
pub mod response;
