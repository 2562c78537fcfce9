#!/usr/bin/env python3
"""Drive a running vllm-sim with the official `openai` client and check what it returns.

Usage: check_openai.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8001/v1)

Checks: model list; non-streaming and streaming chat and text completions (usage, one token
per chunk, finish_reason, include_usage chunk); a two-turn conversation whose second turn
reports vLLM's cached-token count; error mapping (404 unknown model, 400 bad request); the
Responses API (`client.responses.create` plain and with stream=True, the `responses.stream`
helper, a second turn by previous_response_id served from the prefix cache, 404 for an unknown
id); embeddings (the client's default base64 and floats with `dimensions`).
Exits non-zero on the first failed check.
"""
import sys
import uuid

import openai
from openai import OpenAI

BLOCK = 16


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)

    ids = [m.id for m in client.models.list().data]
    check(model in ids, f"/v1/models lists {model} ({ids})")

    # A system prompt no other client used, so this conversation starts cold.
    system = f"Session {uuid.uuid4().hex}. You are a patient assistant. " * 4
    q1 = "Explain how a bicycle stays upright while moving."
    r1 = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q1}],
        max_tokens=40,
        extra_body={"ignore_eos": True},
    )
    c1 = r1.choices[0]
    check(r1.object == "chat.completion" and r1.id.startswith("chatcmpl-"), "chat completion object")
    check(c1.message.role == "assistant" and len(c1.message.content) > 0, "assistant message")
    check(c1.finish_reason == "length", "ignore_eos runs to max_tokens (finish_reason length)")
    check(r1.usage.completion_tokens == 40, "usage.completion_tokens == max_tokens with ignore_eos")
    p1 = r1.usage.prompt_tokens
    cached1 = r1.usage.prompt_tokens_details.cached_tokens
    check(cached1 == 0, f"turn 1 on a cold prefix: cached_tokens == 0 (got {cached1})")

    # Turn 2, streaming, with the reply in the history.
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": q1},
        {"role": "assistant", "content": c1.message.content},
        {"role": "user", "content": "And why does it fall over when it stops?"},
    ]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
    check(len(content) == 12, f"one token per chunk ({len(content)} content chunks)")
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    check(len(finals) == 1 and finals[0].choices[0].finish_reason == "length", "finish_reason on the last token")
    usage = chunks[-1].usage
    check(usage is not None and not chunks[-1].choices, "final usage chunk (include_usage)")
    p2 = usage.prompt_tokens
    cached2 = usage.prompt_tokens_details.cached_tokens
    # vLLM: cached full blocks of the previous turn's computed tokens (prompt + all output
    # tokens but the last), capped at floor((n-1)/B)*B.
    expect = min((p1 + 40 - 1) // BLOCK, (p2 - 1) // BLOCK) * BLOCK
    check(cached2 == expect, f"turn 2 cached_tokens == vLLM's rule ({cached2} == {expect}, prompt {p2})")

    # Text completions, both ways.
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    check(r.object == "text_completion" and r.usage.completion_tokens == 5, "text completion")
    pieces = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    check(sum(1 for p in pieces if p.choices and p.choices[0].text) == 5, "streamed text completion")
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=8)
    check(1 <= r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length"), "max_completion_tokens honoured")

    # Errors.
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        check(False, "unknown model raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model -> NotFoundError (404)")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=3)
        check(False, "n=3 raises")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "unsupported n -> BadRequestError (400)")
    check_responses(client, model)
    check_embeddings(client, model)
    print("openai client checks passed")


def check_responses(client: OpenAI, model: str) -> None:
    instructions = f"Session {uuid.uuid4().hex}. You answer in short sentences. " * 4
    r1 = client.responses.create(
        model=model,
        instructions=instructions,
        input="Name the three primary colours.",
        max_output_tokens=24,
        extra_body={"ignore_eos": True},
    )
    check(r1.object == "response" and r1.id.startswith("resp_"), "responses.create: response object")
    check(len(r1.output_text) > 0 and r1.output[0].type == "message", "responses.create: output_text")
    check(r1.status == "incomplete" and r1.incomplete_details.reason == "max_output_tokens",
          "output limit reached: status incomplete (max_output_tokens), as vLLM")
    u1 = r1.usage
    check(u1.output_tokens == 24 and u1.total_tokens == u1.input_tokens + 24, "responses usage tokens")
    check(u1.input_tokens_details.cached_tokens == 0, "turn 1 on a cold prefix: cached_tokens == 0")

    # Turn 2 by previous_response_id, streamed: the first turn's prompt and reply are cached.
    stream = client.responses.create(
        model=model,
        instructions=instructions,
        input="And the three secondary ones?",
        previous_response_id=r1.id,
        max_output_tokens=8,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = list(stream)
    types = [e.type for e in events]
    check(types[:2] == ["response.created", "response.in_progress"], "stream opens with created, in_progress")
    check(types[-4:] == ["response.output_text.done", "response.content_part.done",
                         "response.output_item.done", "response.incomplete"], "stream closes as vLLM's")
    check([e.sequence_number for e in events] == list(range(len(events))), "sequence_number counts the events")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    check(len(deltas) == 8 and "".join(deltas) == final.output_text, "one delta per token, joined = output_text")
    p1, p2 = u1.input_tokens, final.usage.input_tokens
    cached2 = final.usage.input_tokens_details.cached_tokens
    expect = min((p1 + 24 - 1) // BLOCK, (p2 - 1) // BLOCK) * BLOCK
    check(cached2 == expect and cached2 > 0,
          f"previous_response_id turn reads the cache ({cached2} == {expect}, prompt {p2})")

    # The stream helper accumulates a completed response.
    with client.responses.stream(model=model, input="Say something short.", max_output_tokens=200) as s:
        for _ in s:
            pass
        done = s.get_final_response()
    check(done.status == "completed" and len(done.output_text) > 0, "responses.stream helper: completed response")
    got = client.responses.retrieve(r1.id)
    check(got.id == r1.id and got.output_text == r1.output_text, "responses.retrieve returns the stored response")

    try:
        client.responses.create(model=model, input="x", previous_response_id="resp_unknown")
        check(False, "unknown previous_response_id raises")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown previous_response_id -> NotFoundError (404)")


def check_embeddings(client: OpenAI, model: str) -> None:
    e = client.embeddings.create(model=model, input=["hello world", "goodbye, moon"])
    check(len(e.data) == 2 and [d.index for d in e.data] == [0, 1], "embeddings: one per input")
    v = e.data[0].embedding
    norm = sum(x * x for x in v) ** 0.5
    check(len(v) == 1024 and abs(norm - 1) < 1e-3, "embeddings (client default base64): unit vectors")
    check(e.usage.prompt_tokens == e.usage.total_tokens > 0, "embeddings usage")
    f = client.embeddings.create(model=model, input="hello world", encoding_format="float", dimensions=64)
    w = f.data[0].embedding
    head = sum(x * x for x in v[:64]) ** 0.5
    check(len(w) == 64 and all(abs(a - b / head) < 1e-5 for a, b in zip(w, v)),
          "embeddings: floats with dimensions = the leading components, normalised")


if __name__ == "__main__":
    main()
