"""The vLLM-shaped parts of `lmdistill serve` (issue #18), over real HTTP on 127.0.0.1 with the
official `openai` client where it has the call: /v1/completions, echo and prompt log-probs,
streaming, stop strings and stop tokens, EOS log-probs, token ids, sampling fields, tokenize."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmdistill.serve import create_app, running_server
from lmdistill.teachers.local import HFTeacher

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello"}]
TEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> HFTeacher:
    return HFTeacher(tiny_model_dir, batch_size=16, name=MODEL)


@pytest.fixture(scope="module")
def server(teacher: HFTeacher) -> Iterator[tuple[str, object]]:
    app = create_app(teacher)
    with running_server(app) as base_url:
        yield base_url, app


@pytest.fixture(scope="module")
def client(server: tuple[str, object]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def reference_logprobs(teacher: HFTeacher, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from the in-process model, float64."""
    logits = teacher.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def post(server: tuple[str, object], path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server[0]}{path}", json=body, timeout=60)


# ---------------------------------------------------------------------------------- completions
def test_echo_with_max_tokens_0_scores_the_prompt(
    client: openai.OpenAI, teacher: HFTeacher
) -> None:
    response = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    (choice,) = response.choices
    ids = teacher.tokenizer(TEXT)["input_ids"]
    assert choice.text == TEXT
    assert choice.logprobs.tokens == [teacher.token_text(i) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = reference_logprobs(teacher, ids)
    got = torch.tensor(choice.logprobs.token_logprobs[1:], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 0


def test_prompt_forms_string_list_and_token_ids_agree(
    client: openai.OpenAI, teacher: HFTeacher
) -> None:
    ids = teacher.tokenizer(TEXT)["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    both = client.completions.create(
        model=MODEL, prompt=[TEXT, "Hello world"], max_tokens=4, temperature=0, n=2
    )
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == by_text.choices[0].text
    hello = client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=4, temperature=0
    )
    assert both.choices[2].text == hello.choices[0].text
    assert both.usage.completion_tokens == 4 * 4


def test_lm_eval_loglikelihood_shape(client: openai.OpenAI) -> None:
    """What lm-eval's local-completions sends for loglikelihood: echo, max_tokens 1, logprobs 1.
    The generated token comes after the prompt's and the top-1 check can be made exactly."""
    response = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == response.usage.prompt_tokens + 1
    for value, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert value <= max(top.values())
    # Greedy: the generated token is the most likely one, exactly.
    assert logprobs.token_logprobs[-1] == max(logprobs.top_logprobs[-1].values())


def test_return_tokens_as_token_ids_and_return_token_ids(
    client: openai.OpenAI, teacher: HFTeacher
) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt=TEXT,
        max_tokens=5,
        logprobs=2,
        temperature=0,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True},
    )
    choice = response.choices[0].model_dump()
    tokens = choice["logprobs"]["tokens"]
    assert tokens == [f"token_id:{i}" for i in choice["token_ids"]]
    assert all(
        key.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for key in top
    )
    assert choice["prompt_token_ids"] == teacher.tokenizer(TEXT)["input_ids"]
    assert teacher.tokenizer.decode(choice["token_ids"]) == choice["text"]


def test_completions_for_a_non_local_teacher_are_refused() -> None:
    from test_serve_api import BrokenTeacher

    with running_server(create_app(BrokenTeacher())) as base_url:
        response = httpx.post(f"{base_url}/completions", json={"model": "broken", "prompt": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------------------ stop and EOS
def sampled(client: openai.OpenAI, **fields: object) -> openai.types.Completion:
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 24, "temperature": 1.0, "seed": 7}
    return client.completions.create(**{**body, **fields})


def test_stop_string_cuts_before_it(client: openai.OpenAI) -> None:
    full = sampled(client).choices[0].text
    stop = full[8:11]  # a piece from the middle of what the same seed writes
    assert stop and len(full) > 11
    cut = sampled(client, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop" and cut.model_dump()["stop_reason"] == stop
    kept = sampled(client, stop=stop, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_end_the_choice(client: openai.OpenAI) -> None:
    free = sampled(client, max_tokens=10, extra_body={"return_token_ids": True}).choices[0]
    token = free.model_dump()["token_ids"][3]
    first = free.model_dump()["token_ids"].index(token)
    cut = sampled(
        client, max_tokens=10, extra_body={"stop_token_ids": [token], "return_token_ids": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.model_dump()["stop_reason"] == token
    assert cut.model_dump()["token_ids"] == free.model_dump()["token_ids"][: first + 1]


def test_eos_has_a_logprob_and_counts(client: openai.OpenAI, teacher: HFTeacher) -> None:
    eos = teacher.tokenizer.eos_token_id
    response = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=10,
        logprobs=True,
        logit_bias={str(eos): 100},  # the model says EOS at once
        extra_body={"min_tokens": 2},  # ... but not before two tokens
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 3
    assert content[-1].token == teacher.tokenizer.eos_token
    assert content[-1].logprob < 0  # the model's own log-prob, not the biased one


# --------------------------------------------------------------------------------- sampling
def test_tiny_temperature_is_greedy(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0
    )
    tiny = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=1e-40
    )
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_seeded_request_is_independent_of_the_batch(server: tuple[str, object]) -> None:
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    alone = post(server, "/completions", body).json()["choices"][0]["text"]
    results: list[str] = []
    start = threading.Barrier(3)

    def ask(fields: dict) -> None:
        start.wait()
        results.append(
            post(server, "/completions", {**body, **fields}).json()["choices"][0]["text"]
        )

    others = [{}, {"seed": 12}, {"temperature": 0.7, "seed": None}]
    threads = [threading.Thread(target=ask, args=(f,)) for f in others]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert alone in results


def test_top_k_1_is_greedy_and_sampling_fields_are_honoured(client: openai.OpenAI) -> None:
    greedy = sampled(client, temperature=0).choices[0].text
    top1 = sampled(client, extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy
    # min_p 1 keeps only the most likely token too.
    assert sampled(client, extra_body={"min_p": 1.0}).choices[0].text == greedy


def test_n_choices_differ_and_are_reproducible(client: openai.OpenAI) -> None:
    first = sampled(client, n=3, max_tokens=8)
    again = sampled(client, n=3, max_tokens=8)
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1
    assert texts == [c.text for c in again.choices]


# -------------------------------------------------------------------------------- streaming
def test_streamed_chat_equals_non_streamed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI) -> None:
    whole = sampled(client, n=2, stop=["e"])
    stream = sampled(client, n=2, stop=["e"], stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


def test_continuous_usage_stats_count_up(client: openai.OpenAI) -> None:
    stream = sampled(
        client,
        max_tokens=6,
        extra_body={"ignore_eos": True},
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    counts = [chunk.usage.completion_tokens for chunk in stream]
    assert counts == sorted(counts) and counts[-1] == 6


def test_stream_ends_with_done(server: tuple[str, object]) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server[0]}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)
    json.loads(events[-2].removeprefix("data: "))


def test_a_client_that_disconnects_stops_its_generation(server: tuple[str, object]) -> None:
    engine = server[1].state.engine
    steps = engine.decode_steps
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 240, "n": 16, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream("POST", f"{server[0]}/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk arrived: generation is running; now hang up
    deadline = time.monotonic() + 10
    while engine.running_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running_rows == 0
    assert engine.decode_steps - steps < 200  # it did not run to max_tokens


# --------------------------------------------------------------------------- prompt logprobs
def test_chat_prompt_logprobs(client: openai.OpenAI, teacher: HFTeacher) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=1,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True},
    )
    body = response.model_dump()
    ids = teacher.encode_chat(HELLO)
    assert body["prompt_token_ids"] == ids
    scores = body["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    expected = reference_logprobs(teacher, ids)
    for position, entries in enumerate(scores[1:]):
        own = entries[str(ids[position + 1])]
        assert own["logprob"] == pytest.approx(float(expected[position]), abs=1e-4)
        assert len(entries) in (2, 3)  # the top 2, plus the token itself when not among them


# --------------------------------------------------------------------------------- tokenizer
def test_tokenize_and_detokenize(server: tuple[str, object], teacher: HFTeacher) -> None:
    base = server[0].removesuffix("/v1")
    tokens = httpx.post(f"{base}/tokenize", json={"prompt": TEXT}).json()
    assert tokens["tokens"] == teacher.tokenizer(TEXT)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 256
    chat = httpx.post(f"{base}/tokenize", json={"messages": HELLO}).json()
    assert chat["tokens"] == teacher.encode_chat(HELLO)
    text = httpx.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": TEXT}
    bad = httpx.post(f"{base}/detokenize", json={"tokens": [10**7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/completions", {"prompt": TEXT, "max_tokens": 300}, "max_tokens"),  # past the context
        ("/completions", {"prompt": [10**7]}, "prompt"),
        ("/completions", {"prompt": TEXT, "suffix": "x"}, "suffix"),
        ("/completions", {"prompt": TEXT, "logprobs": 21}, "logprobs"),
        ("/completions", {"prompt": TEXT, "best_of": 3}, "best_of"),
        ("/chat/completions", {"messages": HELLO, "echo": True}, "echo"),
        ("/chat/completions", {"messages": HELLO, "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            "/chat/completions",
            {"messages": HELLO, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/completions", {"prompt": TEXT, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ],
)
def test_bad_requests_name_the_field(
    server: tuple[str, object], path: str, fields: dict, param: str
) -> None:
    response = post(server, path, {"model": MODEL, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(
    server: tuple[str, object],
) -> None:
    engine = server[1].state.engine
    # 16 choices of 240 tokens: seconds of work, so the client leaves long before the end.
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": 240, "n": 16, "ignore_eos": True}
    steps = engine.decode_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server[0]}/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while engine.running_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running_rows == 0
    assert engine.decode_steps - steps < 200  # stopped well before max_tokens
