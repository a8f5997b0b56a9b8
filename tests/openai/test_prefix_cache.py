"""Prefix caching through the OpenAI API: a prompt whose leading KV blocks are cached is
answered exactly as before and reports them in `usage.prompt_tokens_details.cached_tokens`;
tenants and `cache_salt`s share nothing; `--no-prefix-caching` turns it off."""

import hashlib
import urllib.request
import uuid

import openai
import pytest

from conftest import expected, ids_of, up

MODEL = "qwen3_moe"
BLOCK = 16


def servable(prompt_tokens):
    """Leading prompt tokens the cache can serve: whole blocks, never the last position."""
    return (prompt_tokens - 1) // BLOCK * BLOCK


def cached(r):
    return r.usage.prompt_tokens_details.cached_tokens


def fresh_prompt(words=40):
    """A prompt no other test sent (so its first request misses)."""
    tag = uuid.uuid4().hex
    return " ".join(f"{tag[i % 32]}{i}" for i in range(words))


def test_a_repeated_prompt_is_served_from_the_cache_and_answered_alike(qwen):
    client = qwen.client()
    case = expected(MODEL)["cases"][2]
    assert servable(len(case["prompt_ids"])) > 0
    kw = dict(
        model=MODEL,
        prompt=case["prompt"],
        max_tokens=len(case["tokens"]),
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert cached(again) == servable(len(case["prompt_ids"]))
    # Hit or miss, both are transformers' answer.
    for r in (first, again):
        assert ids_of(r.choices[0].logprobs.tokens) == case["tokens"]
        for got, want in zip(r.choices[0].logprobs.token_logprobs, case["logprobs"]):
            assert abs(got - want) < 1e-3


def test_usage_reports_cached_tokens_for_chat_and_streams(qwen):
    client = qwen.client()
    messages = [{"role": "user", "content": fresh_prompt()}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert cached(first) == 0
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert cached(again) == servable(again.usage.prompt_tokens) > 0
    assert again.choices[0].message.content == first.choices[0].message.content

    # The next turn carries the first answer: its blocks were cached as they were decoded.
    turn = messages + [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "and?"}]
    stream = client.chat.completions.create(
        model=MODEL, messages=turn, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens >= servable(first.usage.prompt_tokens)

    text = urllib.request.urlopen(qwen.http + "/metrics").read().decode()
    hits = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("switchyard:prefix_cache_hits_total")]
    queries = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("switchyard:prefix_cache_queries_total")]
    assert hits and queries and 0 < hits[0] < queries[0]


def test_requests_of_different_salts_share_nothing(qwen):
    client = qwen.client()
    prompt = fresh_prompt()
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**kw)
    n = servable(first.usage.prompt_tokens)
    assert client.completions.create(**kw).usage.prompt_tokens_details.cached_tokens == n
    salted = client.completions.create(**kw, extra_body={"cache_salt": "team-b"})
    assert cached(salted) == 0
    assert cached(client.completions.create(**kw, extra_body={"cache_salt": "team-b"})) == n
    for salt in ["", "x" * 257]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw, extra_body={"cache_salt": salt})
        assert e.value.param == "cache_salt"


def test_tenants_never_share_cached_prefixes(tmp_path):
    def sha(key):
        return hashlib.sha256(key.encode()).hexdigest()

    (tmp_path / "tenants.toml").write_text(
        "".join(f'[[tenant]]\nname = "{t}"\napi_key_sha256 = "{sha(t + "-key")}"\n\n' for t in ["a", "b"])
    )
    server = up(MODEL, "--tenants", str(tmp_path / "tenants.toml"))
    try:
        a, b = server.client(api_key="a-key"), server.client(api_key="b-key")
        kw = dict(model=MODEL, prompt=fresh_prompt(), max_tokens=2, temperature=0)
        first = a.completions.create(**kw)
        n = servable(first.usage.prompt_tokens)
        assert n > 0 and cached(a.completions.create(**kw)) == n
        # Another tenant's identical prompt is computed, not timed against a's cache.
        assert cached(b.completions.create(**kw)) == 0
        assert cached(b.completions.create(**kw)) == n
    finally:
        server.stop()


def test_no_prefix_caching_computes_every_prompt():
    server = up(MODEL, "--no-prefix-caching")
    try:
        client = server.client()
        kw = dict(model=MODEL, prompt=fresh_prompt(), max_tokens=2, temperature=0)
        assert [cached(client.completions.create(**kw)) for _ in range(2)] == [0, 0]
    finally:
        server.stop()
