//! `--tokenizer DIR`: the simulator tokenizes with a real model's Hugging Face tokenizer and
//! chat template (SmolLM2-135M-Instruct's, which `scripts/engine.sh` provides and caches once
//! per machine) and generates real ids of its vocabulary. Everything is checked against
//! `llm_lb_tokenizer::ChatTokenizer` loaded from the same directory, which is what a router
//! uses to predict the engine's ids.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use llm_lb_tokenizer::ChatTokenizer;
use serde_json::{json, Value};
use vllm_sim::{KvEventsConfig, SimConfig, SimHandle};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const BLOCK: usize = 16;
const DEADLINE: Duration = Duration::from_secs(20);

/// SmolLM2's tokenizer directory, from `scripts/engine.sh` (`LLAMA_TOKENIZER=<dir>`).
fn tokenizer_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/engine.sh");
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/engine.sh");
        assert!(
            out.status.success(),
            "scripts/engine.sh could not provide the model's tokenizer"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let dir = text
            .lines()
            .find_map(|l| l.strip_prefix("LLAMA_TOKENIZER="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("scripts/engine.sh printed no LLAMA_TOKENIZER: {text}"));
        assert!(dir.join("tokenizer.json").is_file(), "{}", dir.display());
        dir
    })
}

/// The router's view of the model: the same directory through `llm_lb_tokenizer`.
fn reference() -> &'static ChatTokenizer {
    static TOK: OnceLock<ChatTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ChatTokenizer::from_dir(tokenizer_dir()).expect("tokenizer loads"))
}

fn config() -> SimConfig {
    SimConfig {
        tokenizer: Some(tokenizer_dir().clone()),
        ..common::instant("m")
    }
}

fn kv_events_config() -> KvEventsConfig {
    KvEventsConfig::from_json(
        &json!({
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": "tcp://*:0",
            "replay_endpoint": "tcp://127.0.0.1:0",
            "topic": "kv",
        })
        .to_string(),
    )
    .expect("valid config")
}

fn messages(turns: &[(&str, &str)]) -> Value {
    turns
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect()
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t.as_u64().expect("integer"))
        .collect()
}

fn ids(tokens: &[u32]) -> Vec<u64> {
    tokens.iter().map(|&t| u64::from(t)).collect()
}

fn usage(body: &Value, key: &str) -> u64 {
    body["usage"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.{key}: {body}"))
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens: {body}"))
}

/// The token ids of every `BlockStored` event so far, concatenated, read from the replay
/// socket (which holds every batch from seq 0) until there are at least `want`.
async fn stored_tokens(sim: &SimHandle, want: usize) -> Vec<u64> {
    let endpoint = sim
        .kv_events()
        .and_then(|k| k.local_replay_endpoint())
        .expect("replay socket");
    let end = Instant::now() + DEADLINE;
    loop {
        let mut tokens = Vec::new();
        for payload in replay(&endpoint).await {
            let mut rd = payload.as_ref();
            let batch = rmpv::decode::read_value(&mut rd).expect("msgpack batch");
            for ev in batch[1].as_array().expect("events") {
                let map = ev.as_map().expect("map-encoded event");
                let field = |name: &str| {
                    map.iter()
                        .find(|(k, _)| k.as_str() == Some(name))
                        .map(|(_, v)| v)
                };
                if field("type").and_then(rmpv::Value::as_str) == Some("BlockStored") {
                    let t = field("token_ids").and_then(rmpv::Value::as_array);
                    tokens.extend(t.expect("token_ids").iter().map(|t| t.as_u64().unwrap()));
                }
            }
        }
        if tokens.len() >= want {
            return tokens;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {want} stored tokens: {tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every kept batch's payload, asked as a REQ client asks (a DEALER with the empty delimiter).
async fn replay(endpoint: &str) -> Vec<Bytes> {
    let mut d = DealerSocket::new();
    d.connect(endpoint).await.expect("replay connects");
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&0u64.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, d.recv())
            .await
            .expect("replay answers")
            .expect("replay recv");
        let f = msg.into_vec();
        assert_eq!(f.len(), 4, "[b'', topic, seq, payload]: {f:?}");
        if f[2].as_ref() == [0xff; 8] {
            return out;
        }
        out.push(f[3].clone());
    }
}

#[tokio::test]
async fn prompt_ids_are_the_chat_templates_ids() {
    let sim = common::start(config()).await;
    let body = json!({
        "model": "m",
        "messages": messages(&[
            ("system", "You are a careful assistant who answers briefly."),
            ("user", "Name three rivers of Europe and the seas they flow into, one per line."),
        ]),
        "max_tokens": 8,
    });
    let want = reference().chat_tokens(&body).unwrap();
    assert!(want.len() > 2 * BLOCK, "{} tokens", want.len());
    let (status, resp) = common::post(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(usage(&resp, "prompt_tokens"), want.len() as u64);
    let (status, tok) = common::post(&sim, "/tokenize", &body).await;
    assert_eq!(status, 200, "{tok}");
    assert_eq!(
        u64s(&tok["tokens"]),
        ids(&want),
        "/tokenize shows the same ids"
    );
    assert_eq!(tok["count"], want.len());

    // The whole body reaches the template: the generation prompt can be turned off, tools and
    // template kwargs are passed (SmolLM2's template prints neither).
    let mut without = body.clone();
    without["add_generation_prompt"] = json!(false);
    without["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    without["chat_template_kwargs"] = json!({"enable_thinking": false});
    let want2 = reference().chat_tokens(&without).unwrap();
    assert!(want2.len() < want.len(), "no `<|im_start|>assistant\\n`");
    let (status, resp) = common::post(&sim, "/v1/chat/completions", &without).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(usage(&resp, "prompt_tokens"), want2.len() as u64);

    // A text prompt: the tokenizer's ids with its special tokens; token-id prompts as given.
    let text = "Once upon a time, in a land far away,";
    let want = reference().completion_tokens(text).unwrap();
    let (status, resp) = common::post(
        &sim,
        "/v1/completions",
        &json!({"model": "m", "prompt": text, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(usage(&resp, "prompt_tokens"), want.len() as u64);
    let (status, resp) = common::post(
        &sim,
        "/v1/completions",
        &json!({"model": "m", "prompt": [1, 2, 3, 4, 5], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(usage(&resp, "prompt_tokens"), 5);
    sim.shutdown().await;
}

/// vLLM's cached tokens after a turn that computed `computed` tokens of the prefix.
fn rule(computed: u64, prompt: u64) -> u64 {
    let b = BLOCK as u64;
    (computed / b).min((prompt - 1) / b) * b
}

#[tokio::test]
async fn responses_messages_and_embeddings_use_the_chat_template_and_cache() {
    let sim = common::start(config()).await;
    let system = "You are a careful assistant who answers briefly and precisely.";
    let q1 = "Name three rivers of Europe and the seas they flow into.";
    let q2 = "Which of them is the longest?";

    // Responses: instructions + input_text parts render as the chat messages would.
    let (status, r1) = common::post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "instructions": system, "max_output_tokens": 12, "ignore_eos": true,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": q1}]}]}),
    )
    .await;
    assert_eq!(status, 200, "{r1}");
    let want = reference()
        .chat_tokens(&json!({"messages": messages(&[("system", system), ("user", q1)])}))
        .unwrap();
    let p1 = r1["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(p1, want.len() as u64);
    let reply = r1["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, r2) = common::post(
        &sim,
        "/v1/responses",
        &json!({"model": "m", "instructions": system, "input": q2, "max_output_tokens": 2,
                "previous_response_id": r1["id"]}),
    )
    .await;
    let turn2 = messages(&[
        ("system", system),
        ("user", q1),
        ("assistant", &reply),
        ("user", q2),
    ]);
    let p2 = reference()
        .chat_tokens(&json!({ "messages": turn2 }))
        .unwrap()
        .len() as u64;
    assert_eq!(r2["usage"]["input_tokens"], p2);
    // SmolLM2's generated words round-trip: the whole first turn is a hit.
    assert_eq!(
        r2["usage"]["input_tokens_details"]["cached_tokens"],
        rule(p1 + 12 - 1, p2)
    );

    // Messages: the same conversation, a cold server would read nothing; this one has the
    // Responses turns cached, so the Anthropic request reads them.
    let (status, m) = common::post(
        &sim,
        "/v1/messages",
        &json!({"model": "m", "system": system, "max_tokens": 2, "messages": [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]},
            {"role": "user", "content": q2}]}),
    )
    .await;
    assert_eq!(status, 200, "{m}");
    let u = &m["usage"];
    let total = u["input_tokens"].as_u64().unwrap()
        + u["cache_creation_input_tokens"].as_u64().unwrap()
        + u["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(total, p2);
    assert_eq!(
        u["cache_read_input_tokens"],
        (p2 - 1) / BLOCK as u64 * BLOCK as u64
    );

    // Embeddings: text tokenized with the tokenizer's special tokens, as a completion prompt.
    let (_, e) = common::post(&sim, "/v1/embeddings", &json!({"input": q1})).await;
    assert_eq!(
        e["usage"]["prompt_tokens"],
        reference().encode(q1, true).unwrap().len() as u64
    );
}

#[tokio::test]
async fn kv_events_report_the_chat_tokens_full_blocks() {
    let sim = common::start(SimConfig {
        kv_events_config: Some(kv_events_config()),
        ..config()
    })
    .await;
    let body = json!({
        "model": "m",
        "messages": messages(&[
            ("user", "Write a short poem about the sea, the wind and the sky at night."),
        ]),
        "max_tokens": 1,
    });
    let want = reference().chat_tokens(&body).unwrap();
    let full = want.len() / BLOCK * BLOCK;
    assert!(full >= 2 * BLOCK, "{} tokens", want.len());
    let (status, resp) = common::post(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    // One output token is never computed, so the cache holds the prompt's full blocks only.
    let stored = stored_tokens(&sim, full).await;
    assert_eq!(stored, ids(&want[..full]), "BlockStored token_ids");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_reply_sent_back_retokenizes_to_the_generated_ids() {
    let sim = common::start(SimConfig {
        kv_events_config: Some(kv_events_config()),
        ..config()
    })
    .await;
    let turn1 = [
        ("system", "You are a careful assistant who answers briefly."),
        ("user", "Tell me a story about a cat and a dog."),
    ];
    // Without ignore_eos the reply ends with the tokenizer's EOS (or at the limit).
    let body1 = json!({"model": "m", "messages": messages(&turn1), "max_tokens": 48});
    let t1 = reference().chat_tokens(&body1).unwrap();
    let (status, resp1) = common::post(&sim, "/v1/chat/completions", &body1).await;
    assert_eq!(status, 200, "{resp1}");
    assert_eq!(usage(&resp1, "prompt_tokens"), t1.len() as u64);
    let generated = usage(&resp1, "completion_tokens") as usize;
    assert!(generated >= 24, "{resp1}");
    let reply = resp1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!reply.is_empty());

    // The KV cache holds the prompt and every output token but the last (full blocks).
    let computed = (t1.len() + generated - 1) / BLOCK * BLOCK;
    let stored = stored_tokens(&sim, computed).await;
    assert_eq!(stored.len(), computed);
    assert_eq!(
        stored[..t1.len() / BLOCK * BLOCK],
        ids(&t1)[..t1.len() / BLOCK * BLOCK]
    );

    // The generated ids are the vocabulary's: they decode to the reply.
    let out_ids: Vec<u64> = stored[t1.len()..].to_vec();
    let (status, detok) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "m", "tokens": out_ids}),
    )
    .await;
    assert_eq!(status, 200, "{detok}");
    let prefix = detok["prompt"].as_str().unwrap();
    assert!(
        reply.starts_with(prefix) && !prefix.is_empty(),
        "{prefix:?} / {reply:?}"
    );

    // The next turn: the template renders the reply back to the very ids that were generated
    // (EOS included, as `<|im_end|>` closes the message), so every cached block hits.
    let mut turn2 = turn1.to_vec();
    turn2.push(("assistant", &reply));
    turn2.push(("user", "And then what happened to them?"));
    let body2 = json!({"model": "m", "messages": messages(&turn2), "max_tokens": 4});
    let t2 = reference().chat_tokens(&body2).unwrap();
    assert_eq!(t2[..t1.len()], t1[..], "a conversation grows its prefix");
    assert_eq!(
        ids(&t2[..computed]),
        stored,
        "generated ids == re-tokenized reply"
    );
    let (status, resp2) = common::post(&sim, "/v1/chat/completions", &body2).await;
    assert_eq!(status, 200, "{resp2}");
    assert_eq!(usage(&resp2, "prompt_tokens"), t2.len() as u64);
    assert!(cached(&resp2) >= (t1.len() / BLOCK * BLOCK) as u64);
    assert_eq!(cached(&resp2), computed as u64, "the whole first turn hits");
    sim.shutdown().await;
}

#[tokio::test]
async fn streaming_gives_the_same_answer_token_by_token() {
    let sim = common::start(config()).await;
    let body = json!({
        "model": "m",
        "messages": messages(&[("user", "Hello! How are you today?")]),
        "max_tokens": 30,
        "seed": 3,
    });
    let (status, full) = common::post(&sim, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{full}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = common::stream(&sim, "/v1/chat/completions", &streamed).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let want = reference().chat_tokens(&body).unwrap();
    assert_eq!(usage(last, "prompt_tokens"), want.len() as u64);
    assert_eq!(
        usage(last, "completion_tokens"),
        usage(&full, "completion_tokens")
    );
    // One chunk per token (the role chunk and the usage chunk aside).
    assert_eq!(
        chunks.len() as u64 - 2,
        usage(&full, "completion_tokens"),
        "{chunks:#?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_request_the_template_cannot_render_is_a_400() {
    let sim = common::start(config()).await;
    // SmolLM2's template concatenates `message['content']`: null content is a template error.
    let null_content = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}],
    });
    // vLLM refuses both options at once.
    let both = json!({
        "model": "m",
        "messages": messages(&[("user", "Hi")]),
        "add_generation_prompt": true,
        "continue_final_message": true,
    });
    for body in [null_content, both] {
        assert!(reference().chat_tokens(&body).is_err());
        for path in ["/v1/chat/completions", "/tokenize"] {
            let (status, resp) = common::post(&sim, path, &body).await;
            assert_eq!(status, 400, "{path}: {resp}");
            assert_eq!(resp["error"]["type"], "BadRequestError", "{resp}");
            assert_eq!(resp["error"]["code"], 400);
        }
    }
    assert_eq!(
        sim.stats().requests_received,
        0,
        "nothing reached the engine"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn tokenize_and_detokenize_as_vllm_serves_them() {
    let sim = common::start(config()).await;
    let tok = reference();
    let text = "Hello world, this is <|im_start|> a test.";
    let (status, resp) =
        common::post(&sim, "/tokenize", &json!({"model": "m", "prompt": text})).await;
    assert_eq!(status, 200, "{resp}");
    let want = tok.completion_tokens(text).unwrap();
    assert_eq!(u64s(&resp["tokens"]), ids(&want));
    assert_eq!(resp["count"], want.len());
    assert_eq!(resp["max_model_len"], 32768);
    assert!(resp["token_strs"].is_null());
    let (status, resp) = common::post(
        &sim,
        "/tokenize",
        &json!({"model": "m", "prompt": text, "add_special_tokens": false, "return_token_strs": true}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        u64s(&resp["tokens"]),
        ids(&tok.encode(text, false).unwrap())
    );
    let strs: Vec<&str> = resp["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(strs.contains(&"<|im_start|>"), "{strs:?}");

    let chat = json!({"model": "m", "messages": messages(&[("user", "What is 2+2?")])});
    let ids_chat = tok.chat_tokens(&chat).unwrap();
    let (status, resp) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "m", "tokens": ids(&ids_chat)}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        resp["prompt"],
        tok.render_chat(&chat).unwrap(),
        "special tokens included"
    );

    let (status, resp) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "m", "tokens": [1, 4_000_000]}),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    let (status, _) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "nope", "tokens": [1]}),
    )
    .await;
    assert_eq!(status, 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_stand_in_detokenizes_what_it_can_name() {
    let sim = common::start(common::instant("m")).await;
    let (status, resp) = common::post(
        &sim,
        "/tokenize",
        &json!({"model": "m", "messages": messages(&[("user", "x")])}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let chat = u64s(&resp["tokens"]);
    let (status, resp) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "m", "tokens": [chat[0], 2]}),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["prompt"], "<|im_start|><|im_end|>");
    let (status, resp) = common::post(
        &sim,
        "/detokenize",
        &json!({"model": "m", "tokens": [chat[1]]}),
    )
    .await;
    assert_eq!(
        status, 400,
        "hashed prompt pieces cannot be decoded: {resp}"
    );
    sim.shutdown().await;
}

#[test]
fn the_binary_takes_the_tokenizer_flag() {
    let dir = tokenizer_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args([
            "--port",
            "0",
            "--time-scale",
            "0",
            "--model",
            "smol",
            "--tokenizer",
        ])
        .arg(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    let mut info = String::new();
    stderr.read_line(&mut info).unwrap();
    assert!(
        info.contains("tokenizer") && info.contains("eos id"),
        "{info}"
    );
    let body = json!({"model": "smol", "messages": messages(&[("user", "Hi")]), "max_tokens": 4});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resp: Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        usage(&resp, "prompt_tokens"),
        reference().chat_tokens(&body).unwrap().len() as u64,
        "{resp}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // A directory without a tokenizer is refused at start, naming it.
    let empty = std::env::temp_dir().join(format!("vllm-sim-no-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["--port", "0", "--tokenizer"])
        .arg(&empty)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer") && err.contains("tokenizer.json"),
        "{err}"
    );
}
