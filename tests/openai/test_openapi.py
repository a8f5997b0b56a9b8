"""The OpenAPI document at /openapi.json (generated from the server's request and response
types) describes the API the server answers: schemathesis sends a bounded number of generated
requests, valid and invalid, to every operation in it, and every response must be documented,
match its schema, and none be a server error."""

import json
import os
import pathlib
import subprocess
import sys
import urllib.request


# Generated requests per operation: enough to reach every field, bounded for the suite's time.
MAX_EXAMPLES = 30
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def document(server):
    with urllib.request.urlopen(server.http + "/openapi.json") as r:
        assert r.headers["content-type"] == "application/json"
        return json.load(r)


def test_the_document_names_every_route_and_the_served_model(qwen):
    doc = document(qwen)
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{id}", "/tokenize",
                 "/detokenize", "/health", "/ready", "/live", "/version", "/metrics", "/openapi.json"):
        assert path in paths, path
    # Every path it documents is served (no 404 from the router's fallback).
    for path in paths - {"/v1/models/{id}"}:
        method = next(iter(doc["paths"][path]))
        req = urllib.request.Request(qwen.http + path, method=method.upper(), data=b"{}" if method == "post" else None,
                                     headers={"content-type": "application/json"})
        try:
            urllib.request.urlopen(req).close()
        except urllib.error.HTTPError as e:
            assert "no route" not in e.read().decode(), path
    model = qwen.client().models.list().data[0].id
    assert doc["components"]["schemas"]["Sampling"]["properties"]["model"]["enum"] == [model]
    # The request fields are those the server reads, each described.
    fields = doc["components"]["schemas"]["Sampling"]["properties"]
    for name in ("temperature", "top_p", "logit_bias", "repetition_penalty", "min_p", "stop", "seed", "bad_words"):
        assert name in fields, name


def finished(server):
    """Requests the server has finished generating, by the metrics."""
    with urllib.request.urlopen(server.http + "/metrics") as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("switchyard:request_success_total"))


def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(qwen, tmp_path):
    before = finished(qwen)
    env = {**os.environ, "NO_COLOR": "1"}
    run = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "schemathesis"), "run", qwen.http + "/openapi.json",
         "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--no-shrink",
         "--report", "junit", "--report-dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # The generated requests reached generation, not only the refusals.
    generated = finished(qwen) - before
    assert generated >= 10, f"only {generated} generated requests succeeded"
