"""The OpenAI API driven by the official `openai` Python client against a real cluster:
completions and chat, streaming and not, log-probabilities, token-id prompts, stop
sequences, seeds, n > 1, concurrency, cancellation, and every error status."""

import asyncio
import json
import time
import urllib.request

import openai
import pytest

from conftest import FIXTURES, Server, expected, ids_of, up

MODEL = "qwen3_moe"


def test_models_lists_the_served_model(qwen):
    c = qwen.client()
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert "gpt-4" in e.value.message
    with urllib.request.urlopen(qwen.http + "/version") as r:
        assert json.loads(r.read())["server"] == "switchyard"


def test_greedy_completion_reproduces_transformers(qwen):
    for case in expected(MODEL)["cases"]:
        r = qwen.client().completions.create(
            model=MODEL,
            prompt=case["prompt"],
            max_tokens=len(case["tokens"]),
            temperature=0,
            logprobs=3,
            extra_body={"return_tokens_as_token_ids": True},
        )
        choice = r.choices[0]
        assert ids_of(choice.logprobs.tokens) == case["tokens"]
        for got, want in zip(choice.logprobs.token_logprobs, case["logprobs"]):
            assert abs(got - want) < 1e-3
        assert len(choice.logprobs.top_logprobs[0]) == 3
        assert r.usage.prompt_tokens == len(case["prompt_ids"])
        assert r.usage.completion_tokens == len(case["tokens"])
        assert choice.finish_reason == case["finish_reason"]


def test_token_id_prompts_equal_text_prompts(qwen):
    case = expected(MODEL)["cases"][0]
    c = qwen.client()
    by_text = c.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=8, temperature=0)
    by_ids = c.completions.create(model=MODEL, prompt=case["prompt_ids"], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    # A batch of prompts gets one choice each, in order.
    for prompts in ([case["prompt_ids"], case["prompt_ids"]], [case["prompt"], case["prompt"]]):
        batch = c.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
        assert [ch.index for ch in batch.choices] == [0, 1]
        assert all(ch.text == by_text.choices[0].text for ch in batch.choices)


def test_streaming_completion_equals_the_whole_answer(qwen):
    c = qwen.client()
    prompt = expected(MODEL)["cases"][1]["prompt"]
    whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(
        c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_echo_prepends_the_prompt(qwen):
    r = qwen.client().completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("def add(a, b):")


def test_chat_streaming_and_not_agree_and_report_logprobs(qwen):
    c = qwen.client()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fibonacci(n):"}]
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    msg = whole.choices[0].message
    assert msg.role == "assistant"
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    assert len(whole.choices[0].logprobs.content[0].top_logprobs) == 2
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    # max_completion_tokens is honoured like max_tokens.
    short = c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_stop_sequences_end_the_text_before_them(qwen):
    c = qwen.client()
    prompt = expected(MODEL)["cases"][0]["prompt"]
    full = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.index(stop)]
    for stream in (False, True):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(r)
            got = "".join(ch.choices[0].text for ch in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert got == cut
        assert reason == "stop"


def test_seeds_repeat_and_n_gives_distinct_choices(qwen):
    c = qwen.client()
    kw = dict(model=MODEL, prompt="import os\n", max_tokens=12, temperature=1.0)
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1, "different seeds should sample differently"
    many = c.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a
    assert len({ch.text for ch in many.choices}) > 1
    greedy = c.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens == 12


def test_errors_have_openai_shape_and_status(qwen):
    c = qwen.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert "gpt-4" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=3)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x " * 1200, max_tokens=1)
    assert "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x y z", max_tokens=2**64 - 1)
    assert "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[10**9], max_tokens=1)
    assert "outside the vocabulary" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    # Malformed JSON and oversized bodies.
    req = urllib.request.Request(qwen.http + "/v1/completions", data=b"{not json", headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())
    assert oversized_body_status(qwen.http, 9 << 20) == 413


def oversized_body_status(base, size):
    """POSTs a body of `size` bytes and returns the status. The server may answer and close
    before the whole body is sent (a broken pipe here): the answer is read all the same."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(size))
    conn.endheaders()
    chunk = b" " * (64 << 10)
    try:
        for _ in range(size // len(chunk)):
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status = conn.getresponse().status
    conn.close()
    return status


def test_tokenize_and_detokenize_round_trip(qwen):
    case = expected(MODEL)["cases"][0]
    body = json.dumps({"model": MODEL, "prompt": case["prompt"]}).encode()
    req = urllib.request.Request(qwen.http.rstrip("/") + "/tokenize", data=body, headers={"content-type": "application/json"})
    got = json.loads(urllib.request.urlopen(req).read())
    assert got["tokens"] == case["prompt_ids"] and got["count"] == len(case["prompt_ids"])
    body = json.dumps({"model": MODEL, "tokens": case["prompt_ids"]}).encode()
    req = urllib.request.Request(qwen.http + "/detokenize", data=body, headers={"content-type": "application/json"})
    assert json.loads(urllib.request.urlopen(req).read())["prompt"] == case["prompt"]


def metric(server, name):
    text = urllib.request.urlopen(server.http + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_64_concurrent_streams_each_get_their_solo_tokens(qwen):
    prompts = [f"def f{i}(x):\n    return x {'+-*/%'[i % 5]} {i}" for i in range(64)]
    c = qwen.client()

    def tokens(r):
        return ids_of(r.choices[0].logprobs.tokens)

    alone = [
        tokens(c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, logprobs=0, extra_body={"return_tokens_as_token_ids": True}))
        for p in prompts
    ]

    async def one(client, p):
        stream = await client.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, logprobs=0, stream=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
        out = []
        async for ch in stream:
            if ch.choices and ch.choices[0].logprobs:
                out += ids_of(ch.choices[0].logprobs.tokens)
        return out

    async def all_at_once():
        client = qwen.async_client()
        return await asyncio.gather(*(one(client, p) for p in prompts))

    together = asyncio.run(all_at_once())
    assert together == alone


def test_a_client_that_disconnects_frees_its_slot(qwen):
    c = qwen.client()
    stream = c.completions.create(model=MODEL, prompt="x", max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert metric(qwen, "switchyard:num_requests_running") == 1
    stream.close()
    deadline = time.time() + 10
    while metric(qwen, "switchyard:num_requests_running") != 0:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert metric(qwen, "switchyard:generation_tokens_total") > 0
    assert metric(qwen, "switchyard:time_to_first_token_seconds_count") > 0


def test_a_full_queue_answers_503():
    # One running sequence and one queued at most, each slowed so they stay there.
    server = up(MODEL, "--max-batch", "1", "--max-queue", "1", env={"SWITCHYARD_FAULT_DISPATCH_DELAY_MS": "20"})
    try:
        async def burst():
            client = server.async_client()
            calls = [client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0) for _ in range(8)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(burst())
        unavailable = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 503]
        served = [r for r in results if not isinstance(r, Exception)]
        assert unavailable, results
        assert served, results
        assert "queue is full" in unavailable[0].message
    finally:
        server.stop()


def test_tenants_need_keys_and_get_429_over_their_limits(tmp_path):
    import hashlib

    def sha(key):
        return hashlib.sha256(key.encode()).hexdigest()

    (tmp_path / "tenants.toml").write_text(
        f"""
[[tenant]]
name = "small"
api_key_sha256 = "{sha('small-key')}"
requests_per_minute = 2

[[tenant]]
name = "big"
api_key_sha256 = "{sha('big-key')}"
priority = 1
metrics = true

[[tenant]]
name = "metered"
api_key_sha256 = "{sha('metered-key')}"
tokens_per_minute = 200
"""
    )
    server = up(MODEL, "--tenants", str(tmp_path / "tenants.toml"))
    try:
        kw = dict(model=MODEL, prompt="x", max_tokens=2, temperature=0)
        body = json.dumps(kw).encode()
        req = urllib.request.Request(server.http + "/v1/completions", data=body, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 401
        assert "missing API key" in json.loads(e.value.read())["error"]["message"]
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="stolen").completions.create(**kw)
        assert "invalid API key" in e.value.message
        small, big = server.client(api_key="small-key"), server.client(api_key="big-key")
        small.completions.create(**kw)
        small.completions.create(**kw)
        with pytest.raises(openai.RateLimitError) as e:
            small.completions.create(**kw)
        assert "small" in e.value.message and "requests per minute" in e.value.message
        # The other tenant is still served.
        assert big.completions.create(**kw).usage.completion_tokens == 2
        # A request reserves n × (prompt + max_tokens) up front: one that can never fit the
        # tenant's tokens per minute is refused by name, with what would fit.
        metered = server.client(api_key="metered-key")
        with pytest.raises(openai.BadRequestError) as e:
            metered.completions.create(model=MODEL, prompt="x", max_tokens=250, temperature=0)
        assert e.value.param == "max_tokens" and "limit is 200" in e.value.message
        assert metered.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0).usage.completion_tokens <= 20
        # /metrics names every tenant: only a tenant with `metrics = true` may read it.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.http + "/metrics")
        assert e.value.code == 401
        as_small = urllib.request.Request(server.http + "/metrics", headers={"authorization": "Bearer small-key"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(as_small)
        assert e.value.code == 403
        as_big = urllib.request.Request(server.http + "/metrics", headers={"authorization": "Bearer big-key"})
        text = urllib.request.urlopen(as_big).read().decode()
        assert 'switchyard:tenant_requests_total{tenant="small"} 2' in text
        assert 'switchyard:tenant_rejected_total{tenant="small"} 1' in text
        assert 'switchyard:tenant_requests_total{tenant="big"} 1' in text
    finally:
        server.stop()


def test_requests_wait_for_kv_cache_blocks_instead_of_failing():
    config = json.loads((FIXTURES / MODEL / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block = config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * 16 * head_dim * 4
    # Three blocks: one request of up to 48 positions at a time.
    server = up(MODEL, "--kv-cache-memory", str(3 * block))
    try:
        async def four():
            client = server.async_client()
            calls = [
                client.completions.create(model=MODEL, prompt=f"x{i}", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
                for i in range(4)
            ]
            return await asyncio.gather(*calls)

        for r in asyncio.run(four()):
            assert r.usage.completion_tokens == 30
        assert metric(server, "switchyard:kv_cache_usage_perc") == 0
        with pytest.raises(openai.BadRequestError) as e:
            server.client().completions.create(model=MODEL, prompt="x", max_tokens=100, temperature=0)
        assert "KV-cache blocks" in e.value.message
    finally:
        server.stop()


def test_one_request_is_one_trace_across_router_and_expert_nodes():
    import http.server
    import threading

    batches = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/traces"
            batches.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    server = up(MODEL, "--otlp-endpoint", endpoint)
    try:
        r = server.client().completions.create(model=MODEL, prompt="def f(", max_tokens=3, temperature=0)
    finally:
        server.stop()  # every process flushes its spans on the way out
    collector.shutdown()

    spans = []
    for batch in batches:
        for rs in batch["resourceSpans"]:
            service = next(a["value"]["stringValue"] for a in rs["resource"]["attributes"] if a["key"] == "service.name")
            for ss in rs["scopeSpans"]:
                spans += [dict(s, service=service) for s in ss["spans"]]
    request = next(s for s in spans if s["name"] == f"text_completion {MODEL}")
    attrs = {a["key"]: a["value"] for a in request["attributes"]}
    assert attrs["gen_ai.operation.name"]["stringValue"] == "text_completion"
    assert attrs["gen_ai.request.model"]["stringValue"] == MODEL
    assert attrs["gen_ai.usage.output_tokens"] == {"intValue": str(r.usage.completion_tokens)}
    assert attrs["gen_ai.response.id"]["stringValue"] == r.id
    trace = [s for s in spans if s["traceId"] == request["traceId"]]
    by_id = {s["spanId"]: s for s in trace}
    computes = [s for s in trace if s["name"] == "expert_compute"]
    assert computes and all(s["service"] == "switchyard-expert-node" for s in computes)
    # Each node-side span hangs under a router-side dispatch span of the same request.
    for c in computes:
        parent = by_id[c["parentSpanId"]]
        assert parent["name"] == "expert_dispatch" and parent["service"] == "switchyard-router"


def test_incremental_text_equals_decoding_all_tokens_at_once(qwen):
    c = qwen.client()
    for prompt in ["def f(", "héllo wörld ✓", expected(MODEL)["cases"][2]["prompt"]]:
        r = c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=64, temperature=0.8, seed=3, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        ids = ids_of(r.choices[0].logprobs.tokens)
        body = json.dumps({"model": MODEL, "tokens": ids}).encode()
        req = urllib.request.Request(qwen.http + "/detokenize", data=body, headers={"content-type": "application/json"})
        assert r.choices[0].text == json.loads(urllib.request.urlopen(req).read())["prompt"]


def test_fields_are_honoured_or_refused_by_name(qwen):
    c = qwen.client()
    # Fields that cannot change the answer, unimplemented ones at their neutral value, and
    # sampling controls at theirs.
    plain = c.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0)
    same = c.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=6, temperature=0, user="u1", presence_penalty=0,
        frequency_penalty=0, logit_bias={}, best_of=1, extra_body={"metadata": {"team": "a"}, "tools": []},
    )
    assert same.choices[0].text == plain.choices[0].text
    # Anything else is a 400 that names the field, never silently ignored.
    for kwargs, field in [
        ({"best_of": 3}, "best_of"),
        ({"suffix": "return x"}, "suffix"),
        ({"extra_body": {"temprature": 0.2}}, "temprature"),
        ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}}, "tools"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=1, **kwargs)
        assert f"`{field}`" in e.value.message, (field, e.value.message)
        assert e.value.param == field, (field, e.value.param)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
            response_format={"type": "yaml"},
        )
    assert "`response_format.type`" in e.value.message and e.value.param == "response_format"
