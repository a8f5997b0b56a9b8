"""Sampling controls through the official `openai` client against a real cluster: greedy
continuations under penalties and logit bias are transformers' (tools/record_sampling_controls.py),
each control does what it says on /v1/completions and acts alike on /v1/chat/completions, and a
bad value is a 400 naming its field."""

import json
import urllib.request

import openai
import pytest

from conftest import FIXTURES, ids_of

MODEL = "qwen3_moe"
CHAT = [{"role": "user", "content": "def fibonacci(n):"}]
PROMPT = "def f(x):\n    return"


def post(server, path, body):
    req = urllib.request.Request(
        server.http + path, data=json.dumps({"model": MODEL, **body}).encode(), headers={"content-type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req).read())


def complete(server, prompt, max_tokens=12, temperature=0, **controls):
    """Token ids, text and finish reason of one completion; `controls` go in the body as they are."""
    r = server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=temperature, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True, **controls},
    )
    c = r.choices[0]
    return ids_of(c.logprobs.tokens), c.text, c.finish_reason, r.usage.completion_tokens


def chat(server, max_tokens=12, temperature=0, **controls):
    r = server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=temperature, logprobs=True,
        extra_body={"return_tokens_as_token_ids": True, **controls},
    )
    c = r.choices[0]
    return [int(t.token.removeprefix("token_id:")) for t in c.logprobs.content], c.message.content, c.finish_reason


def test_greedy_continuations_under_controls_are_transformers(qwen):
    cases = json.loads((FIXTURES / MODEL / "controls_expected.json").read_text())["cases"]
    checked = set()
    for case in cases:
        controls = case["controls"]
        if "bad_words" in controls:
            continue  # recorded as token ids; the API takes words (see test_bad_words_are_never_generated)
        r = qwen.client().completions.create(
            model=MODEL, prompt=case["prompt_ids"], max_tokens=case["max_tokens"], temperature=0, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, **controls},
        )
        choice = r.choices[0]
        assert ids_of(choice.logprobs.tokens) == case["tokens"], controls
        for got, want in zip(choice.logprobs.token_logprobs, case["logprobs"]):
            assert abs(got - want) < 1e-3, controls
        assert choice.finish_reason == case["finish_reason"], controls
        checked |= set(controls)
    assert {"frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias"} <= checked


def test_stop_token_ids_end_the_sequence_and_stay_out_of_the_text(qwen):
    plain, _, _, _ = complete(qwen, PROMPT)
    k = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])
    ids, text, finish, used = complete(qwen, PROMPT, stop_token_ids=[plain[k]])
    assert ids == plain[: k + 1] and finish == "stop" and used == k + 1
    assert text == post(qwen, "/detokenize", {"tokens": plain[:k]})["prompt"]
    # With min_tokens the stop token is held back until that many tokens are out.
    ids, _, _, _ = complete(qwen, PROMPT, stop_token_ids=[plain[k]], min_tokens=k + 3)
    assert plain[k] not in ids[: k + 3] and len(ids) >= k + 3


def word_of(server, tokens):
    """The text of the first of `tokens` that, tokenized alone, is that one token."""
    for t in tokens:
        text = post(server, "/detokenize", {"tokens": [t]})["prompt"]
        if text.strip() and post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"] == [t]:
            return text
    raise AssertionError(f"no token of {tokens} tokenizes back to itself")


def test_bad_words_are_never_generated(qwen):
    plain, _, _, _ = complete(qwen, PROMPT)
    word = word_of(qwen, plain)
    banned = post(qwen, "/tokenize", {"prompt": word.lstrip(), "add_special_tokens": False})["tokens"]
    ids, _, _, _ = complete(qwen, PROMPT, bad_words=[word])
    assert ids != plain
    assert not any(ids[i : i + len(banned)] == banned for i in range(len(ids))), (word, ids)


def test_min_p_of_one_keeps_only_the_most_likely_token(qwen):
    greedy, _, _, _ = complete(qwen, PROMPT)
    sampled = [complete(qwen, PROMPT, temperature=1.5, seed=s)[0] for s in range(3)]
    assert any(s != greedy for s in sampled), "sampling at temperature 1.5 should leave the greedy path"
    for s in range(3):
        assert complete(qwen, PROMPT, temperature=1.5, seed=s, min_p=1.0)[0] == greedy


def test_seeded_sampling_under_controls_repeats(qwen):
    kw = dict(temperature=1.0, seed=21, presence_penalty=0.5, repetition_penalty=1.2, min_p=0.05)
    assert complete(qwen, PROMPT, **kw)[:2] == complete(qwen, PROMPT, **kw)[:2]


@pytest.mark.parametrize(
    "controls, expect",
    [
        # Negative: this continuation repeats nothing, so positive penalties would not show.
        ({"frequency_penalty": -1.0, "presence_penalty": -0.5}, "changed"),
        ({"repetition_penalty": 1.6}, "changed"),
        ({"logit_bias": "the first token's: -100"}, "changed"),
        ({"bad_words": "the first token's text"}, "changed"),
        ({"min_tokens": 10, "stop_token_ids": "the third token"}, "changed"),
        ({"min_p": 1.0, "temperature": 1.5, "seed": 3}, "greedy"),
        ({"ignore_eos": True, "max_tokens": 30}, "30 tokens"),
    ],
    ids=lambda x: ",".join(x) if isinstance(x, dict) else x,
)
def test_chat_honours_each_control_as_completions_do(qwen, controls, expect):
    prompt_ids = post(qwen, "/tokenize", {"messages": CHAT})["tokens"]
    plain, _, _ = chat(qwen)
    controls = dict(controls)
    if "logit_bias" in controls:
        controls["logit_bias"] = {str(plain[0]): -100}
    if "bad_words" in controls:
        controls["bad_words"] = [word_of(qwen, plain)]
    if "stop_token_ids" in controls:
        controls["stop_token_ids"] = [plain[2]]
    ids, _, finish = chat(qwen, **controls)
    by_completion = complete(qwen, prompt_ids, **controls)
    assert (ids, finish) == (by_completion[0], by_completion[2]), controls
    if expect == "changed":
        assert ids != plain, controls
    elif expect == "greedy":
        assert ids == plain
    else:
        assert (len(ids), finish) == (30, "length")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": "high"}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.5}, "repetition_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [999999]}, "stop_token_ids"),
        ({"bad_words": "fib"}, "bad_words"),
        ({"bad_words": ["  "]}, "bad_words"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
    ],
    ids=lambda x: json.dumps(x) if isinstance(x, dict) else x,
)
def test_bad_values_are_400_naming_the_field(qwen, body, field):
    body = {"max_tokens": 4, **body}
    c = qwen.client()
    for create in [
        lambda: c.completions.create(model=MODEL, prompt="x", extra_body=body),
        lambda: c.chat.completions.create(model=MODEL, messages=CHAT, extra_body=body),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            create()
        assert f"`{field}`" in e.value.message, e.value.message
        assert e.value.param == field, (e.value.param, e.value.message)


def test_best_of_equal_to_n_returns_every_choice(qwen):
    r = qwen.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, best_of=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
