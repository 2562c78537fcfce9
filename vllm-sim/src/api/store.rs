//! The Responses API's store: the responses a later request may continue with
//! `previous_response_id` or read back with `GET /v1/responses/{id}`.
//!
//! vLLM keeps them when started with `VLLM_ENABLE_RESPONSES_API_STORE=1` and the request does
//! not say `store: false`: the request's chat messages (`msg_store`) and the finished response
//! (`response_store`), in process memory and never evicted. vllm-sim always stores (unless
//! `store: false`) but bounds the memory: at most [`MAX_RESPONSES`] responses and about
//! [`MAX_BYTES`] of text, dropping the oldest first. As in vLLM the store belongs to one
//! server: a `previous_response_id` must go back to the server that produced it (anywhere
//! else it is a 404).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

/// Most responses kept.
pub const MAX_RESPONSES: usize = 4096;
/// About the most bytes of messages and response bodies kept.
pub const MAX_BYTES: usize = 64 << 20;

/// A finished, stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The conversation a continuation starts from: the request's messages without its system
    /// messages (instructions do not carry over), then the response's output as assistant
    /// messages.
    pub history: Vec<Value>,
    /// The response object, as JSON.
    pub body: String,
}

impl StoredResponse {
    fn bytes(&self) -> usize {
        self.body.len()
            + self
                .history
                .iter()
                .map(|m| serde_json::to_string(m).map_or(0, |s| s.len()))
                .sum::<usize>()
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Arc<StoredResponse>, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

/// Responses by id, bounded, oldest dropped first.
#[derive(Debug)]
pub struct ResponseStore {
    inner: Mutex<Inner>,
    max_responses: usize,
    max_bytes: usize,
}

impl Default for ResponseStore {
    fn default() -> Self {
        Self::with_limits(MAX_RESPONSES, MAX_BYTES)
    }
}

impl ResponseStore {
    /// A store keeping at most `max_responses` responses and about `max_bytes` bytes.
    pub fn with_limits(max_responses: usize, max_bytes: usize) -> Self {
        ResponseStore {
            inner: Mutex::new(Inner::default()),
            max_responses,
            max_bytes,
        }
    }

    /// The response stored under `id`.
    pub fn get(&self, id: &str) -> Option<Arc<StoredResponse>> {
        self.inner.lock().entries.get(id).map(|(r, _)| r.clone())
    }

    /// Stores a response, dropping the oldest ones beyond the limits (a response larger than
    /// the byte limit alone is still kept, as the only one).
    pub fn insert(&self, id: String, response: StoredResponse) {
        let size = response.bytes();
        let mut inner = self.inner.lock();
        if let Some((_, old)) = inner.entries.remove(&id) {
            inner.bytes -= old;
            inner.order.retain(|k| *k != id);
        }
        while !inner.order.is_empty()
            && (inner.order.len() >= self.max_responses || inner.bytes + size > self.max_bytes)
        {
            if let Some(oldest) = inner.order.pop_front() {
                if let Some((_, n)) = inner.entries.remove(&oldest) {
                    inner.bytes -= n;
                }
            }
        }
        inner.bytes += size;
        inner.order.push_back(id.clone());
        inner.entries.insert(id, (Arc::new(response), size));
    }

    /// How many responses are stored.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(n: usize) -> StoredResponse {
        StoredResponse {
            history: Vec::new(),
            body: "x".repeat(n),
        }
    }

    #[test]
    fn keeps_the_newest_within_count_and_bytes() {
        let s = ResponseStore::with_limits(2, 100);
        s.insert("a".into(), resp(10));
        s.insert("b".into(), resp(10));
        s.insert("c".into(), resp(10));
        assert!(s.get("a").is_none());
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("c").unwrap().body.len(), 10);
        s.insert("d".into(), resp(95));
        assert_eq!(s.len(), 1, "bytes bound drops b and c");
        assert!(s.get("d").is_some());
        s.insert("e".into(), resp(500));
        assert_eq!(s.len(), 1);
        assert!(s.get("e").is_some() && !s.is_empty());
        s.insert("e".into(), resp(1));
        assert_eq!(s.len(), 1);
    }
}
