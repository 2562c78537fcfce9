//! Token counts from the `usage` object at the end of a response, in each API's shape: chat and
//! text completions (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`),
//! the Responses API (`input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`) and
//! Anthropic's Messages API (`input_tokens` not read from the cache, `cache_read_input_tokens`,
//! `output_tokens`).
//!
//! vLLM, SGLang and llama.cpp put `usage` at the end: last in a JSON completion (llama.cpp adds
//! only `id` and a few hundred bytes of `timings` after it), and in the last data event before
//! `[DONE]` of a stream (with `stream_options.include_usage`; `response.completed` of a Responses
//! stream, `message_delta` of a Messages stream). So the proxy keeps only the
//! last [`TAIL_BYTES`] of each response body ([`Tail`]) and reads the counts from there when the
//! response ends — no parsing of the whole body, bounded memory per request.

/// Bytes of the response body's end that are kept.
pub const TAIL_BYTES: usize = 1024;

/// The last [`TAIL_BYTES`] of a response body.
#[derive(Debug, Default)]
pub struct Tail(Vec<u8>);

impl Tail {
    /// Append the next chunk of the body, keeping only the last [`TAIL_BYTES`].
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL_BYTES {
            self.0.clear();
            self.0.extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            return;
        }
        let excess = (self.0.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        self.0.drain(..excess);
        self.0.extend_from_slice(chunk);
    }

    /// The token counts of the last `usage` object, if the tail holds one.
    pub fn usage(&self) -> Option<Usage> {
        // The tail may start in the middle of a multi-byte character (or hold other invalid
        // bytes): they are replaced; `usage` itself is ASCII.
        let text = String::from_utf8_lossy(&self.0);
        let at = text.rfind("\"usage\"")?;
        let usage = &text[at..];
        let n = |key: &str| number_after(usage, key);
        if let Some(completion) = n("\"completion_tokens\"") {
            return Some(Usage {
                prompt: n("\"prompt_tokens\"")?,
                completion,
                cached: n("\"cached_tokens\"").unwrap_or(0),
            });
        }
        let completion = n("\"output_tokens\"")?;
        let input = n("\"input_tokens\"").unwrap_or(0);
        Some(match n("\"cache_read_input_tokens\"") {
            // Anthropic's input_tokens leaves out what was read from the cache.
            Some(read) => Usage {
                prompt: input + read + n("\"cache_creation_input_tokens\"").unwrap_or(0),
                completion,
                cached: read,
            },
            None => Usage {
                prompt: input,
                completion,
                cached: n("\"cached_tokens\"").unwrap_or(0),
            },
        })
    }
}

/// Token counts of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens: `prompt_tokens`, `input_tokens` (with Anthropic's cache reads and writes;
    /// 0 when a stream's last usage leaves them out).
    pub prompt: u64,
    /// `completion_tokens`, `output_tokens`.
    pub completion: u64,
    /// Of the prompt, read from the prefix cache: `cached_tokens`, `cache_read_input_tokens`
    /// (0 when absent).
    pub cached: u64,
}

/// The integer after `"key":` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = text[text.find(key)? + key.len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_completion() {
        let mut t = Tail::default();
        t.push(br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#);
        assert_eq!(
            t.usage(),
            Some(Usage {
                prompt: 12,
                completion: 3,
                cached: 8
            })
        );
    }

    #[test]
    fn stream_split_over_chunks() {
        let mut t = Tail::default();
        for _ in 0..200 {
            t.push(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"token \"}}],\"usage\":null}\n\n",
            );
        }
        let last = b"data: {\"choices\":[],\"usage\": {\"prompt_tokens\": 40, \"completion_tokens\": 200}}\n\ndata: [DONE]\n\n";
        for piece in last.chunks(7) {
            t.push(piece);
        }
        assert_eq!(
            t.usage(),
            Some(Usage {
                prompt: 40,
                completion: 200,
                cached: 0
            })
        );
        assert!(t.0.len() <= TAIL_BYTES);
    }

    #[test]
    fn responses_and_messages_usage() {
        let read = |body: &[u8]| {
            let mut t = Tail::default();
            t.push(body);
            t.usage()
        };
        let responses = br#"event: response.completed
data: {"type":"response.completed","response":{"id":"resp_1","output":[],"usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":16},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":35}}}

"#;
        assert_eq!(
            read(responses),
            Some(Usage {
                prompt: 30,
                completion: 5,
                cached: 16
            })
        );
        let messages = br#"{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":14,"cache_creation_input_tokens":0,"cache_read_input_tokens":16,"output_tokens":5}}"#;
        assert_eq!(
            read(messages),
            Some(Usage {
                prompt: 30,
                completion: 5,
                cached: 16
            })
        );
        let stream_end = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            read(stream_end),
            Some(Usage {
                prompt: 0,
                completion: 7,
                cached: 0
            })
        );
    }

    /// Real and representative engine responses, fed in small pieces as a stream arrives.
    #[test]
    fn engine_fixtures() {
        let read = |body: &str| {
            let mut t = Tail::default();
            for piece in body.as_bytes().chunks(17) {
                t.push(piece);
            }
            t.usage()
        };
        let usage = |prompt, completion, cached| {
            Some(Usage {
                prompt,
                completion,
                cached,
            })
        };
        let fixture = |name| {
            std::fs::read_to_string(format!(
                "{}/tests/fixtures/usage/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("fixture")
        };
        assert_eq!(read(&fixture("llama-cpp-chat.json")), usage(45, 40, 0));
        assert_eq!(
            read(&fixture("llama-cpp-chat-stream.txt")),
            usage(45, 40, 44)
        );
        assert_eq!(
            read(&fixture("llama-cpp-completion-stream.txt")),
            usage(4, 20, 0)
        );
        assert_eq!(read(&fixture("vllm-chat-stream.txt")), usage(1034, 3, 1024));
        assert_eq!(read(&fixture("sglang-chat.json")), usage(1034, 3, 1024));
    }

    /// A non-ASCII reply: the kept tail starts inside a character.
    #[test]
    fn tail_starting_mid_character() {
        let usage = br#""},"usage":{"prompt_tokens":7,"completion_tokens":500}}"#;
        let mut body: Vec<u8> = "\u{e9}".repeat(600).into_bytes();
        if body[body.len() + usage.len() - TAIL_BYTES] & 0xc0 != 0x80 {
            body.push(b'a');
        }
        body.extend_from_slice(usage);
        let mut t = Tail::default();
        t.push(&body);
        assert_eq!(
            t.0[0] & 0xc0,
            0x80,
            "the tail starts with a continuation byte"
        );
        assert_eq!(
            t.usage(),
            Some(Usage {
                prompt: 7,
                completion: 500,
                cached: 0
            })
        );
    }

    #[test]
    fn no_usage() {
        let mut t = Tail::default();
        t.push(b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n");
        assert_eq!(t.usage(), None);
        t.push(&[0xe2; 3000]);
        assert_eq!(t.usage(), None);
    }
}
