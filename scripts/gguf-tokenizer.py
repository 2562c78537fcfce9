#!/usr/bin/env python3
"""Writes a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from a GGUF model.

A GGUF file embeds the model's whole tokenizer (vocabulary, token types, BPE merges, the
pre-tokenizer's name, BOS/EOS and whether to add them, the chat template); llama.cpp tokenizes
with exactly that. This script turns it back into the files a Hugging Face model repository
ships, so that the `tokenizers` library (llm-lb's `chat-tokenizer` crate) computes the same token
ids as llama.cpp without reaching the Hub.

Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) with a pre-tokenizer whose
llama.cpp regexes have an exact Hugging Face counterpart are supported (see PRE_TOKENIZERS); any
other GGUF is refused rather than converted approximately.

Usage: gguf-tokenizer.py MODEL.gguf OUT_DIR   (needs the `gguf` package from PyPI)
"""

import json
import os
import sys

from gguf import GGUFReader

# llama.cpp token types (llama_token_type in llama.h).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 regex as llama.cpp spells it; llama.cpp runs a hand-written matcher for it
# (unicode_regex_split_custom_gpt2) that also applies the trailing `|\s+` alternative, which is
# exactly Hugging Face's ByteLevel pre-tokenizer with use_regex = true.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_NO_REGEX = dict(BYTE_LEVEL, use_regex=False)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_gpt2():
    return BYTE_LEVEL


def pre_digits_gpt2():
    # llama.cpp: regexes ["\p{N}", <gpt2>], i.e. every digit on its own, then GPT-2 splitting;
    # Hugging Face: Digits(individual_digits) then ByteLevel, as in StarCoder's/SmolLM's files.
    return {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL],
    }


def pre_llama3():
    return {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": LLAMA3_REGEX},
                "behavior": "Isolated",
                "invert": False,
            },
            BYTE_LEVEL_NO_REGEX,
        ],
    }


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges), following llama.cpp's src/llama-vocab.cpp.
PRE_TOKENIZERS = {}
for _name in ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
              "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo"]:
    PRE_TOKENIZERS[_name] = (pre_gpt2, False)
for _name in ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
              "mellum2"]:
    PRE_TOKENIZERS[_name] = (pre_digits_gpt2, False)
for _name in ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
              "lfm2"]:
    PRE_TOKENIZERS[_name] = (pre_llama3, True)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[-1].strip())
    gguf_path, out_dir = sys.argv[1:]
    reader = GGUFReader(gguf_path)

    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"tokenizer.ggml.model = {model!r}: only byte-level BPE ('gpt2') is supported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        sys.exit(f"tokenizer.ggml.pre = {pre!r} has no exact Hugging Face equivalent here")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    merges = field(reader, "tokenizer.ggml.merges", [])
    if len(types) != len(tokens):
        sys.exit("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            sys.exit(f"token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i

    # Control and unknown tokens are "special" added tokens (llama.cpp parses them out of the text
    # only with parse_special, as Hugging Face does unless told to encode them as text);
    # user-defined tokens are added tokens that are always parsed out, like llama.cpp does.
    added = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ in (CONTROL, UNKNOWN, USER_DEFINED):
            added.append({
                "id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": typ != USER_DEFINED,
            })

    def token_id(key):
        v = field(reader, key)
        return None if v is None or v < 0 or v >= len(tokens) else int(v)

    bos_id = token_id("tokenizer.ggml.bos_token_id")
    eos_id = token_id("tokenizer.ggml.eos_token_id")
    unk_id = token_id("tokenizer.ggml.unknown_token_id")
    pad_id = token_id("tokenizer.ggml.padding_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and bos_id is None:
        sys.exit("tokenizer.ggml.add_bos_token is set but there is no BOS token")
    if add_eos and eos_id is None:
        sys.exit("tokenizer.ggml.add_eos_token is set but there is no EOS token")

    # What `encode(text, add_special_tokens=True)` adds, as llama.cpp's tokenize(add_special=true).
    if add_bos or add_eos:
        single, pair, special = [], [], {}
        if add_bos:
            bos = tokens[bos_id]
            single.append({"SpecialToken": {"id": bos, "type_id": 0}})
            special[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
        single.append({"Sequence": {"id": "A", "type_id": 0}})
        pair = list(single) + [{"Sequence": {"id": "B", "type_id": 1}}]
        if add_eos:
            eos = tokens[eos_id]
            single.append({"SpecialToken": {"id": eos, "type_id": 0}})
            pair.append({"SpecialToken": {"id": eos, "type_id": 1}})
            special[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
        post_processor = {"type": "TemplateProcessing", "single": single, "pair": pair,
                          "special_tokens": special}
    else:
        post_processor = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": True}

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer(),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }

    config = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, f"{field(reader, 'general.architecture')}.context_length", 0))
        or 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
    }
    for name, tid in [("bos_token", bos_id), ("eos_token", eos_id), ("unk_token", unk_id),
                      ("pad_token", pad_id)]:
        if tid is not None:
            config[name] = tokens[tid]
    template = field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    named = [k for k in reader.fields if k.startswith("tokenizer.chat_template.")]
    if named:
        templates = [{"name": "default", "template": template}] if template is not None else []
        templates += [{"name": k.split(".", 2)[2], "template": field(reader, k)} for k in sorted(named)]
        config["chat_template"] = templates

    os.makedirs(out_dir, exist_ok=True)
    for name, data in [("tokenizer.json", tokenizer), ("tokenizer_config.json", config)]:
        part = os.path.join(out_dir, name + ".part")
        with open(part, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(part, os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
