//! The engine's events turned into response bodies, as chat completions do it: [`collect`]
//! waits for the whole answer (for a JSON body), [`sse_response`] writes an SSE body through
//! an [`SseFormat`] as the tokens arrive. Both honour the `close_after_tokens` fault the way
//! chat does: a JSON answer is cut before its body, a stream after that many tokens, and an
//! engine that goes away cuts the connection.

use std::collections::VecDeque;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::openai::closed_error;
use crate::scheduler::{Event, Usage};

/// A whole answer: its text and token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The generated text (EOS adds none).
    pub text: String,
    /// Token counts and finish reason.
    pub usage: Usage,
}

/// What [`collect`] ends with.
#[derive(Debug)]
pub enum Collected {
    /// The answer.
    Done(Answer),
    /// The `close_after_tokens` fault cut it: send this response, whose body fails at once.
    Cut(Response),
}

/// A response whose body fails before its first byte (the connection is closed).
pub fn cut_response() -> Response {
    let body = Body::from_stream(futures_util::stream::once(async {
        Err::<Bytes, _>(closed_error())
    }));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Waits for the whole answer; a 500 when the engine goes away first.
pub async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    close_after: Option<u64>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut n = 0u64;
    loop {
        if close_after.is_some_and(|c| n >= c) {
            return Ok(Collected::Cut(cut_response()));
        }
        match rx.recv().await {
            Some(Event::Token(t, _)) => {
                text.push_str(&t);
                n += 1;
            }
            Some(Event::Last(t, usage)) => {
                text.push_str(&t);
                return Ok(Collected::Done(Answer { text, usage }));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The engine stopped before the request finished.",
                ))
            }
        }
    }
}

/// Writes the SSE events of one API as the engine's tokens arrive.
pub trait SseFormat: Send + 'static {
    /// One token (not the last), with the prompt tokens the request found cached.
    fn token(&mut self, text: &str, cached: usize, out: &mut VecDeque<Bytes>);
    /// The last token and the request's token counts: the closing events.
    fn last(&mut self, text: &str, usage: &Usage, out: &mut VecDeque<Bytes>);
}

/// One SSE event with a name, as vLLM's Responses and Messages APIs write them:
/// `event: NAME\ndata: JSON\n\n`.
pub fn event<T: Serialize>(name: &str, data: &T) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

/// The SSE response: `first` goes out at once, then the events `format` writes.
pub fn sse_response<F: SseFormat>(
    rx: mpsc::UnboundedReceiver<Event>,
    close_after: Option<u64>,
    format: F,
    first: VecDeque<Bytes>,
) -> Response {
    let state = SseState {
        rx,
        format,
        pending: first,
        sent_tokens: 0,
        close_after,
        done: false,
    };
    let body = Body::from_stream(futures_util::stream::unfold(state, SseState::next));
    (
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        body,
    )
        .into_response()
}

struct SseState<F> {
    rx: mpsc::UnboundedReceiver<Event>,
    format: F,
    pending: VecDeque<Bytes>,
    sent_tokens: u64,
    close_after: Option<u64>,
    done: bool,
}

type Chunk = Result<Bytes, std::io::Error>;

impl<F: SseFormat> SseState<F> {
    async fn next(mut self) -> Option<(Chunk, Self)> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some((Ok(b), self));
            }
            if self.done {
                return None;
            }
            let ev = self.rx.recv().await;
            if self.close_after.is_some_and(|c| self.sent_tokens >= c) {
                self.done = true;
                return Some((Err(closed_error()), self));
            }
            match ev {
                None => {
                    self.done = true;
                    return Some((Err(closed_error()), self));
                }
                Some(Event::Token(text, cached)) => {
                    self.sent_tokens += 1;
                    self.format.token(&text, cached, &mut self.pending);
                }
                Some(Event::Last(text, usage)) => {
                    self.sent_tokens += 1;
                    self.format.last(&text, &usage, &mut self.pending);
                    self.done = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::FinishReason;
    use crate::tokenizer::TokenText;

    fn usage() -> Usage {
        Usage {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 0,
        }
    }

    #[tokio::test]
    async fn collect_joins_the_tokens_and_honours_the_cut() {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Event::Token(TokenText::from(" a"), 0)).unwrap();
        tx.send(Event::Last(TokenText::from(""), usage())).unwrap();
        match collect(rx, None).await.unwrap() {
            Collected::Done(a) => {
                assert_eq!(a.text, " a");
                assert_eq!(a.usage, usage());
            }
            Collected::Cut(_) => panic!("not cut"),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Event::Token(TokenText::from(" a"), 0)).unwrap();
        assert!(matches!(
            collect(rx, Some(1)).await.unwrap(),
            Collected::Cut(_)
        ));
        let (tx, rx) = mpsc::unbounded_channel::<Event>();
        drop(tx);
        assert_eq!(
            collect(rx, None).await.unwrap_err().status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn events_are_named() {
        let e = event("ping", &serde_json::json!({"type": "ping"}));
        assert_eq!(&e[..], b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
    }
}
