//! The APIs vLLM serves next to chat and text completions ([`crate::openai`]):
//!
//! * [`responses`]: the OpenAI Responses API, `POST /v1/responses` (and `GET
//!   /v1/responses/{id}`), with `previous_response_id` continuations kept in a bounded
//!   [`store`];
//! * [`messages`]: the Anthropic Messages API, `POST /v1/messages`;
//! * [`embeddings`]: `POST /v1/embeddings`, prefill-only requests.
//!
//! Each turns its request into chat messages (or text), renders them to prompt ids exactly as
//! a chat request is rendered ([`render`]), and runs them through the same engine as chat
//! completions, so prefix caching, KV events, metrics, [`crate::Stats`], faults and time
//! scaling apply to them all; [`drive`] turns the engine's events into their JSON or SSE
//! bodies.

pub mod drive;
pub mod embeddings;
pub mod messages;
pub mod messages_body;
pub mod render;
pub mod responses;
pub mod responses_body;
pub mod store;
