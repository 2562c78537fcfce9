//! The simulator's counters as a test reads them: [`Stats`] (what
//! [`crate::SimHandle::stats`] returns) and its per-endpoint breakdown, [`ByApi`], which tells
//! how many requests, prompt, cached and generated tokens each API ([`Api`]) accounted for.

/// The endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/responses` (OpenAI Responses API).
    Responses,
    /// `POST /v1/messages` (Anthropic Messages API).
    Messages,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Api {
    /// Every API, in a fixed order.
    pub const ALL: [Api; 5] = [
        Api::ChatCompletions,
        Api::Completions,
        Api::Responses,
        Api::Messages,
        Api::Embeddings,
    ];

    /// The path the API is served on.
    pub fn path(self) -> &'static str {
        match self {
            Api::ChatCompletions => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
            Api::Responses => "/v1/responses",
            Api::Messages => "/v1/messages",
            Api::Embeddings => "/v1/embeddings",
        }
    }
}

/// What one API's requests cost the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// Requests accepted into the queue (an embeddings request counts once per input).
    pub requests_received: u64,
    /// Requests finished normally (`stop` or `length`).
    pub requests_served: u64,
    /// Prompt tokens of requests that produced a first token (or, for embeddings, their
    /// pooled output).
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache at first scheduling.
    pub cached_tokens: u64,
    /// Output tokens produced (0 for embeddings).
    pub generation_tokens: u64,
}

/// [`ApiStats`] of every API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByApi {
    /// `/v1/chat/completions`.
    pub chat_completions: ApiStats,
    /// `/v1/completions`.
    pub completions: ApiStats,
    /// `/v1/responses`.
    pub responses: ApiStats,
    /// `/v1/messages`.
    pub messages: ApiStats,
    /// `/v1/embeddings`.
    pub embeddings: ApiStats,
}

impl ByApi {
    /// One API's counters.
    pub fn get(&self, api: Api) -> &ApiStats {
        match api {
            Api::ChatCompletions => &self.chat_completions,
            Api::Completions => &self.completions,
            Api::Responses => &self.responses,
            Api::Messages => &self.messages,
            Api::Embeddings => &self.embeddings,
        }
    }

    /// One API's counters, to update.
    pub fn get_mut(&mut self, api: Api) -> &mut ApiStats {
        match api {
            Api::ChatCompletions => &mut self.chat_completions,
            Api::Completions => &mut self.completions,
            Api::Responses => &mut self.responses,
            Api::Messages => &mut self.messages,
            Api::Embeddings => &mut self.embeddings,
        }
    }
}

/// A snapshot of the simulator's counters and gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Requests accepted into the queue.
    pub requests_received: u64,
    /// Requests finished normally (`stop` or `length`).
    pub requests_served: u64,
    /// Requests aborted because the client went away.
    pub requests_aborted: u64,
    /// Requests refused with 429 (waiting queue full).
    pub requests_rejected: u64,
    /// Requests answered with an injected failure.
    pub requests_failed: u64,
    /// Prompt tokens of requests that produced a first token.
    pub prompt_tokens: u64,
    /// Cached prompt tokens reported in `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// `vllm:prefix_cache_queries_total`.
    pub prefix_cache_queries: u64,
    /// `vllm:prefix_cache_hits_total`.
    pub prefix_cache_hits: u64,
    /// Requests in the running batch now.
    pub running: usize,
    /// Requests waiting now.
    pub waiting: usize,
    /// KV-cache usage now, 0–1.
    pub kv_cache_usage: f64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Model milliseconds (before `time_scale`) spent on prefill, load multiplier included:
    /// a deterministic measure of how much prompt work the cache saved.
    pub prefill_model_ms: f64,
    /// Sum of measured times to first token, seconds.
    pub ttft_seconds_sum: f64,
    /// Number of first tokens measured.
    pub ttft_count: u64,
    /// The request and token counters split by the endpoint the requests came through; the
    /// totals above are their sums.
    pub by_api: ByApi,
}

impl Stats {
    /// One API's counters (`stats.api(Api::Responses).cached_tokens`).
    pub fn api(&self, api: Api) -> &ApiStats {
        self.by_api.get(api)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_has_its_own_counters() {
        let mut by = ByApi::default();
        for (i, api) in Api::ALL.into_iter().enumerate() {
            by.get_mut(api).cached_tokens = i as u64 + 1;
        }
        let stats = Stats {
            by_api: by,
            ..Stats::default()
        };
        for (i, api) in Api::ALL.into_iter().enumerate() {
            assert_eq!(stats.api(api).cached_tokens, i as u64 + 1, "{api:?}");
            assert!(api.path().starts_with("/v1/"));
        }
    }
}
