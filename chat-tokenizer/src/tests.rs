//! Unit tests on a tiny byte-level BPE tokenizer built here.

use super::*;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE tokenizer: the 256 byte symbols, the words "hello" and "Ġworld" merged,
/// three special tokens; with `add_bos`, its post-processor adds `<s>`.
fn tokenizer_json(add_bos: bool) -> Value {
    let specials = ["<s>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = Map::new();
    for s in specials {
        vocab.insert(s.to_owned(), json!(vocab.len()));
    }
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    for c in alphabet {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    let merges = [
        ("h", "e"),
        ("he", "l"),
        ("hel", "l"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("Ġw", "o"),
        ("Ġwo", "r"),
        ("Ġwor", "l"),
        ("Ġworl", "d"),
    ];
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(vocab.len()));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let post = if add_bos {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    })
}

/// A model directory holding `files` (name, contents).
fn model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }
    dir
}

fn load(template: &str, add_bos: bool) -> ChatTokenizer {
    let config = json!({"chat_template": template, "bos_token": "<s>",
                        "eos_token": {"content": "<|im_end|>", "special": true}});
    let dir = model_dir(&[
        ("tokenizer.json", tokenizer_json(add_bos).to_string()),
        ("tokenizer_config.json", config.to_string()),
    ]);
    ChatTokenizer::from_dir(dir.path()).expect("load")
}

fn render(tok: &ChatTokenizer, request: Value) -> String {
    tok.render_chat(&request).expect("render")
}

fn id(tok: &ChatTokenizer, token: &str) -> u32 {
    tok.tokenizer().token_to_id(token).expect("token")
}

#[test]
fn is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ChatTokenizer>();
}

#[test]
fn encodes_words_digits_and_special_tokens() {
    let tok = load(CHATML, false);
    let ids = tok
        .encode("<|im_start|>hello world 42", false)
        .expect("encode");
    let want = vec![
        id(&tok, "<|im_start|>"),
        id(&tok, "hello"),
        id(&tok, "Ġworld"),
        id(&tok, "Ġ"),
        id(&tok, "4"),
        id(&tok, "2"),
    ];
    assert_eq!(ids, want);
    // No BOS in this tokenizer's post-processor.
    assert_eq!(
        tok.encode("hello", true).expect("encode"),
        vec![id(&tok, "hello")]
    );
    assert_eq!(
        tok.completion_tokens("hello").expect("encode"),
        vec![id(&tok, "hello")]
    );
}

#[test]
fn renders_chatml_with_generation_prompt_by_default() {
    let tok = load(CHATML, false);
    let req = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"}]});
    assert_eq!(
        render(&tok, req.clone()),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.chat_tokens(&req).expect("tokens");
    assert_eq!(ids.first(), Some(&id(&tok, "<|im_start|>")));
    assert_eq!(ids, tok.encode(&render(&tok, req), false).expect("encode"));

    let mut no_prompt = json!({"messages": [{"role": "user", "content": "hello"}]});
    no_prompt["add_generation_prompt"] = json!(false);
    assert_eq!(
        render(&tok, no_prompt),
        "<|im_start|>user\nhello<|im_end|>\n"
    );
}

#[test]
fn joins_text_parts_for_string_templates() {
    let tok = load(CHATML, false);
    let req = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "second"}]}]});
    assert_eq!(
        render(&tok, req),
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn passes_parts_to_templates_that_iterate_them() {
    let typed =
        "{% for m in messages %}[{% for p in m.content %}{{ p.text }};{% endfor %}]{% endfor %}";
    let tok = load(typed, false);
    let parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
    assert_eq!(render(&tok, parts), "[a;b;]");
    // A string becomes one text part.
    let string = json!({"messages": [{"role": "user", "content": "c"}]});
    assert_eq!(render(&tok, string), "[c;]");
}

#[test]
fn continue_final_message_ends_after_its_text() {
    let tok = load(CHATML, false);
    let req = json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello wor"}],
        "add_generation_prompt": false, "continue_final_message": true});
    assert_eq!(
        render(&tok, req),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello wor"
    );
    let both = json!({"messages": [{"role": "assistant", "content": "x"}],
                      "continue_final_message": true});
    assert!(matches!(
        tok.render_chat(&both),
        Err(TokenizerError::InvalidRequest(_))
    ));
}

#[test]
fn llama_cpp_continues_a_trailing_assistant_message() {
    let tok = load(CHATML, false).with_engine(Engine::LlamaCpp);
    let req = json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hel"}]});
    assert_eq!(
        render(&tok, req),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhel"
    );
}

#[test]
fn llama_cpp_adds_bos_once() {
    let template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}";
    let hf = load(template, true);
    let llama = load(template, true).with_engine(Engine::LlamaCpp);
    let req = json!({"messages": [{"role": "user", "content": "hello"}]});
    let bos = id(&hf, "<s>");
    let hello = id(&hf, "hello");
    assert_eq!(hf.chat_tokens(&req).expect("tokens"), vec![bos, hello]);
    assert_eq!(llama.chat_tokens(&req).expect("tokens"), vec![bos, hello]);
    // A template that does not write BOS: llama.cpp adds it, vLLM does not.
    let bare = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let req = json!({"messages": [{"role": "user", "content": "hello"}]});
    assert_eq!(load(bare, true).chat_tokens(&req).expect("t"), vec![hello]);
    let llama = load(bare, true).with_engine(Engine::LlamaCpp);
    assert_eq!(llama.chat_tokens(&req).expect("t"), vec![bos, hello]);
    assert_eq!(
        llama.completion_tokens("hello").expect("t"),
        vec![bos, hello]
    );
}

#[test]
fn tojson_is_pythons_json_dumps() {
    let template = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}|{{ {'b': 1} | tojson(separators=(',', ':')) }}";
    let tok = load(template, false);
    // Keys in sorted order: the same with and without serde_json's preserve_order.
    let req = json!({"messages": [], "tools": [{"l": [], "n": 1.0, "name": "café", "x": null}]});
    assert_eq!(
        render(&tok, req),
        "[{\"l\": [], \"n\": 1.0, \"name\": \"café\", \"x\": null}]|{\n  \"l\": [],\n  \"n\": 1.0,\n  \"name\": \"café\",\n  \"x\": null\n}|{\"b\":1}"
    );
}

#[test]
fn python_semantics_in_templates() {
    let template = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith('  a') }}|{{ tools }}|{{ eos_token }}|{{ enable_thinking }}";
    let tok = load(template, false);
    let req = json!({"messages": [{"role": "user", "content": "  a b  "}],
                     "chat_template_kwargs": {"enable_thinking": false, "messages": "ignored"}});
    assert_eq!(render(&tok, req), "a b|True|None|<|im_end|>|False");
}

#[test]
fn trims_blocks_like_transformers() {
    let template =
        "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}\n";
    let tok = load(template, false);
    let req =
        json!({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]});
    assert_eq!(render(&tok, req), "x\ny\n");
}

#[test]
fn raise_exception_fails_the_render() {
    let tok = load("{{ raise_exception('roles must alternate') }}", false);
    let err = tok
        .render_chat(&json!({"messages": []}))
        .expect_err("raises");
    assert!(matches!(err, TokenizerError::Template(_)));
    assert!(err.to_string().contains("roles must alternate"), "{err}");
}

#[test]
fn generation_blocks_render_their_body() {
    let tok = load(
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
        false,
    );
    assert_eq!(
        render(
            &tok,
            json!({"messages": [{"role": "assistant", "content": "ok"}]})
        ),
        "ok"
    );
}

#[test]
fn template_sources_and_selection() {
    // A list of named templates: tool_use is used when the request has tools.
    let config = json!({"chat_template": [
        {"name": "default", "template": "plain"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"}]});
    let dir = model_dir(&[
        ("tokenizer.json", tokenizer_json(false).to_string()),
        ("tokenizer_config.json", config.to_string()),
    ]);
    let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(render(&tok, json!({"messages": []})), "plain");
    assert_eq!(
        render(
            &tok,
            json!({"messages": [], "tools": [{"type": "function"}]})
        ),
        "tools:1"
    );

    // chat_template.jinja wins over the config's template.
    let dir = model_dir(&[
        ("tokenizer.json", tokenizer_json(false).to_string()),
        (
            "tokenizer_config.json",
            json!({"chat_template": "old"}).to_string(),
        ),
        ("chat_template.jinja", "new\n".to_owned()),
    ]);
    let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(render(&tok, json!({"messages": []})), "new");

    // No template: completions still work, chat requests are refused.
    let dir = model_dir(&[("tokenizer.json", tokenizer_json(false).to_string())]);
    let tok = ChatTokenizer::from_dir(dir.path()).expect("load");
    assert!(!tok.has_chat_template());
    assert!(matches!(
        tok.render_chat(&json!({"messages": []})),
        Err(TokenizerError::NoChatTemplate)
    ));
    assert!(tok.completion_tokens("hello").is_ok());
}

#[test]
fn tool_call_arguments_reach_the_template_as_objects() {
    let template = "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}";
    let tok = load(template, false);
    let req = json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Paris\"}"}}]}]});
    assert_eq!(render(&tok, req), "Paris");
}

#[test]
fn missing_files_and_bad_requests_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        ChatTokenizer::from_dir(dir.path()),
        Err(TokenizerError::Io { .. })
    ));
    let tok = load(CHATML, false);
    assert!(matches!(
        tok.render_chat(&json!({"prompt": "x"})),
        Err(TokenizerError::InvalidRequest(_))
    ));
}

#[test]
fn a_chat_s_earlier_turns_are_tokenized_once_with_the_same_ids() {
    let tok = load(CHATML, false);
    let whole = |text: &str| -> Vec<u32> {
        let e = tok.tokenizer().encode_fast(text, false).expect("encode");
        e.get_ids().to_vec()
    };
    let mut messages = vec![json!({"role": "system", "content": "hello world 1 2 3"})];
    let mut last = SegmentStats::default();
    for turn in 0..6 {
        messages.push(json!({"role": "user", "content": format!("hello {turn} world")}));
        let request = json!({"messages": messages});
        let ids = tok.chat_tokens(&request).expect("tokens");
        assert_eq!(ids, whole(&render(&tok, request)), "turn {turn}");
        let stats = tok.segment_stats();
        assert!(stats.enabled);
        // Only the last answer and the new question are tokenized; every other segment (two a
        // message, then the generation prompt) is found.
        if turn > 0 {
            assert_eq!(stats.misses - last.misses, 2, "turn {turn}: {stats:?}");
            let segments = 2 * messages.len() as u64 + 1;
            assert_eq!(stats.hits - last.hits, segments - 2, "turn {turn}");
        }
        last = stats;
        messages.push(json!({"role": "assistant", "content": format!("world {turn}")}));
    }
    // Text without special tokens is one segment, with the same ids.
    assert_eq!(
        tok.encode("hello world 42", false).expect("encode"),
        whole("hello world 42")
    );
}
