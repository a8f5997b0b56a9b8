"""Prompt log-probabilities through the official `openai` client against a real cluster, as
lm-evaluation-harness asks for them (`echo` + `logprobs` with `max_tokens` 1 or 0) and as vLLM's
`prompt_logprobs` extension gives them: the numbers are transformers'
(tools/record_prompt_logprobs.py), within 1e-3."""

import json

import openai
import pytest

from conftest import FIXTURES, ids_of

MODEL = "qwen3_moe"
TOLERANCE = 1e-3
# Ranks and orders are compared only where the nearest other token is farther than this.
TIE = 1e-4
CASES = json.loads((FIXTURES / MODEL / "prompt_logprobs.json").read_text())["cases"]


def complete(server, prompt, **kw):
    extra = kw.pop("extra_body", {})
    return server.client().completions.create(
        model=MODEL, prompt=prompt, temperature=0, extra_body={"return_tokens_as_token_ids": True, **extra}, **kw
    )


def check_prompt_part(lp, case, top):
    """The first len(ids) entries of a legacy `logprobs` object against transformers."""
    n = len(case["ids"])
    assert ids_of(lp.tokens[:n]) == case["ids"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, n):
        want = case["logprobs"][p - 1]
        assert abs(lp.token_logprobs[p] - want) <= TOLERANCE, (p, lp.token_logprobs[p], want)
        alternatives = lp.top_logprobs[p]
        chosen = f"token_id:{case['ids'][p]}"
        # The scored token is always there, beside the `top` most likely.
        assert abs(alternatives[chosen] - want) <= TOLERANCE
        assert len(alternatives) <= top + 1 and len(alternatives) >= max(top, 1)
        best_id, best = case["top_logprobs"][p - 1][0]
        second = case["top_logprobs"][p - 1][1][1]
        if top > 0 and best - second > TIE:
            assert abs(alternatives[f"token_id:{best_id}"] - best) <= TOLERANCE


def test_echo_with_logprobs_scores_the_prompt_as_transformers(qwen):
    """lm-evaluation-harness' loglikelihood request (`max_tokens` 1) and vLLM's (`max_tokens` 0)."""
    for case in CASES:
        n = len(case["ids"])
        only = complete(qwen, case["ids"], echo=True, logprobs=1, max_tokens=0)
        c = only.choices[0]
        check_prompt_part(c.logprobs, case, 1)
        assert len(c.logprobs.tokens) == n and c.finish_reason == "length"
        assert only.usage.prompt_tokens == n and only.usage.completion_tokens == 0
        prompt_text = c.text

        one = complete(qwen, case["ids"], echo=True, logprobs=1, max_tokens=1)
        c = one.choices[0]
        check_prompt_part(c.logprobs, case, 1)
        assert len(c.logprobs.tokens) == n + 1 and one.usage.completion_tokens == 1
        assert c.logprobs.token_logprobs[n] is not None
        # The text starts with the prompt; the generated token's offset is where it ends.
        assert c.text.startswith(prompt_text)
        assert c.logprobs.text_offset[n] == len(prompt_text)
        assert c.logprobs.text_offset[:n] == only.choices[0].logprobs.text_offset


def test_echo_text_and_offsets_cover_the_prompt(qwen):
    case = CASES[0]
    prompt = case["prompt"]
    r = qwen.client().completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    c = r.choices[0]
    assert c.text == prompt
    lp = c.logprobs
    assert len(lp.tokens) == case["prompt_tokens"]
    # Every token's text sits at its offset (the first is BOS, which the text leaves out).
    offsets = lp.text_offset + [len(c.text)]
    assert offsets[0] == 0 and offsets[1] == 0
    for i in range(1, len(lp.tokens)):
        assert c.text[offsets[i] : offsets[i + 1]] == lp.tokens[i], i
    for p in range(1, case["prompt_tokens"]):
        assert abs(lp.token_logprobs[p] - case["logprobs"][p - 1]) <= TOLERANCE
        assert list(lp.top_logprobs[p]) == [lp.tokens[p]]  # logprobs 0: the token alone


def test_echo_alone_with_max_tokens_0_returns_the_prompt(qwen):
    r = qwen.client().completions.create(model=MODEL, prompt="def add(a, b):", echo=True, max_tokens=0)
    c = r.choices[0]
    assert (c.text, c.finish_reason, c.logprobs) == ("def add(a, b):", "length", None)
    assert r.usage.completion_tokens == 0


def test_vllm_prompt_logprobs(qwen):
    for case in CASES:
        r = complete(qwen, case["ids"], max_tokens=0, echo=True, extra_body={"prompt_logprobs": 3})
        got = r.choices[0].model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(case["ids"])
        for p in range(1, len(case["ids"])):
            entries = got[p]
            assert 3 <= len(entries) <= 4
            mine = entries[str(case["ids"][p])]
            assert abs(mine["logprob"] - case["logprobs"][p - 1]) <= TOLERANCE
            assert mine["decoded_token"] == f"token_id:{case['ids'][p]}"
            if case["rank_margins"][p - 1] > TIE:
                assert mine["rank"] == case["ranks"][p - 1]
            top = case["top_logprobs"][p - 1]
            for k, (tid, lp) in enumerate(top[:3]):
                clear = all(abs(v - lp) > TIE for j, (_, v) in enumerate(top) if j != k)
                if clear:
                    assert abs(entries[str(tid)]["logprob"] - lp) <= TOLERANCE
                    if tid != case["ids"][p]:
                        assert entries[str(tid)]["rank"] == k + 1


def test_prompt_logprobs_without_echo_and_with_generation(qwen):
    case = CASES[1]
    r = complete(qwen, case["ids"], max_tokens=3, logprobs=1, extra_body={"prompt_logprobs": 0})
    c = r.choices[0]
    got = c.model_extra["prompt_logprobs"]
    assert [list(e) for e in got[1:]] == [[str(t)] for t in case["ids"][1:]]
    for p in range(1, len(case["ids"])):
        assert abs(got[p][str(case["ids"][p])]["logprob"] - case["logprobs"][p - 1]) <= TOLERANCE
    # Without echo, `logprobs` covers the generated tokens only.
    assert len(c.logprobs.tokens) == 3 and c.logprobs.token_logprobs[0] is not None


def test_batched_prompts_are_scored_each_on_its_own(qwen):
    r = complete(qwen, [c["ids"] for c in CASES], echo=True, logprobs=2, max_tokens=0)
    assert len(r.choices) == len(CASES)
    for choice, case in zip(sorted(r.choices, key=lambda c: c.index), CASES):
        check_prompt_part(choice.logprobs, case, 2)


def test_streamed_echo_carries_the_prompt_logprobs_first(qwen):
    case = CASES[2]
    chunks = list(
        qwen.client().completions.create(
            model=MODEL, prompt=case["ids"], echo=True, logprobs=1, max_tokens=2, temperature=0, stream=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
    )
    first = chunks[0].choices[0]
    check_prompt_part(first.logprobs, case, 1)
    generated = [t for ch in chunks[1:] for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert len(generated) == 2
    whole = complete(qwen, case["ids"], echo=True, logprobs=1, max_tokens=2)
    assert ids_of(first.logprobs.tokens) + ids_of(generated) == ids_of(whole.choices[0].logprobs.tokens)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


@pytest.mark.parametrize(
    "body, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ({"max_tokens": 1, "extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
        ({"max_tokens": 1, "extra_body": {"prompt_logprobs": -1}}, "prompt_logprobs"),
        ({"max_tokens": 1, "extra_body": {"prompt_logprobs": "all"}}, "prompt_logprobs"),
        ({"max_tokens": 1, "echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_bad_values_are_refused_by_name(qwen, body, field):
    with pytest.raises(openai.BadRequestError) as e:
        qwen.client().completions.create(model=MODEL, prompt="def f(x):", **body)
    assert f"`{field}`" in e.value.message, e.value.message
    assert e.value.param == field, (e.value.param, e.value.message)


def test_chat_prompt_logprobs_score_the_rendered_prompt(qwen):
    """On chat, `prompt_logprobs` scores the prompt the template rendered: the same numbers as
    `/v1/completions` gives for those token ids (checked against transformers above)."""
    import json as _json
    import urllib.request

    messages = [{"role": "user", "content": "def fibonacci(n):"}]
    req = urllib.request.Request(qwen.http + "/tokenize", data=_json.dumps({"messages": messages}).encode(),
                                 headers={"content-type": "application/json"})
    ids = _json.load(urllib.request.urlopen(req))["tokens"]
    chat = qwen.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0, n=2,
        extra_body={"prompt_logprobs": 2, "return_tokens_as_token_ids": True},
    )
    got = chat.model_extra["prompt_logprobs"]
    want = complete(qwen, ids, max_tokens=1, extra_body={"prompt_logprobs": 2}).choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids) == len(want)
    for p in range(1, len(ids)):
        assert got[p].keys() == want[p].keys(), p
        for token, entry in got[p].items():
            assert abs(entry["logprob"] - want[p][token]["logprob"]) <= 1e-5
            assert entry["rank"] == want[p][token]["rank"]
    # The choices share the prompt, so the response carries its log-probabilities once.
    assert all("prompt_logprobs" not in (c.model_extra or {}) for c in chat.choices)


def test_chat_refuses_prompt_logprobs_when_streamed_or_out_of_range(qwen):
    for extra, stream in (({"prompt_logprobs": 1}, True), ({"prompt_logprobs": 21}, False)):
        with pytest.raises(openai.BadRequestError) as e:
            qwen.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1, stream=stream, extra_body=extra
            )
        assert e.value.param == "prompt_logprobs", e.value.message
