#!/usr/bin/env python3
"""Build a small local HuggingFace tokenizer offline (no downloads).

Byte-level BPE trained on the given text files (e.g. AIPerf's bundled shakespeare.txt).
LLM benchmark clients need a tokenizer directory; this one is enough for them to count and
synthesise tokens. Usage: make_tokenizer.py OUT_DIR [CORPUS_FILE ...]
"""
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tokenizer"
    corpus = [f for f in sys.argv[2:] if os.path.exists(f)]
    if os.path.exists(os.path.join(out, "tokenizer.json")):
        print("tokenizer exists:", out)
        return
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = []
    for f in corpus:
        with open(f, encoding="utf-8", errors="ignore") as fh:
            texts += fh.read().splitlines()
    texts += [" the and for you not are but can all one her was" * 20] * 50
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000, **special}, fh)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh)
    print("saved", out, "vocab", tok.get_vocab_size())


if __name__ == "__main__":
    main()
