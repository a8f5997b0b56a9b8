"""Runs lm-evaluation-harness' loglikelihood requests against a real `switchyard up` and checks
every answer against transformers.

It starts `switchyard up` on a fixture checkpoint, writes a small local loglikelihood task
(contexts and continuations of Python code, and the model's own greedy continuations of the
fixture's prompts), runs `lm_eval --model local-completions` on it
(which sends `echo: true, logprobs: 1, max_tokens: 1` with token-id prompts), and compares each
logged sample's (log-likelihood, is-greedy) with what transformers computes on the same token
ids: log-likelihoods within 1e-3 per token, is-greedy equal.

Needs lm-eval besides tools/requirements.txt (e.g. `pip install lm-eval==0.4.13` in a venv
that also sees tools/.venv's packages) and a built binary:

    SWITCHYARD_BIN=target/debug/switchyard PYTHON_WITH_LM_EVAL=... python tools/check_lm_eval.py
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading

import torch
from transformers import AutoTokenizer

import make_fixtures

ROOT = make_fixtures.REPO_ROOT
TOLERANCE = 1e-3
DOCS = [
    ("def fibonacci(n):", "\n    return n"),
    ("import os\nimport sys\n", "import json\n"),
    ("class Stack:\n    def push(self, item):\n", "        self.items.append(item)\n"),
    ("for i in range(10):\n", "    print(i)\n"),
    ("x = [1, 2, 3]\n", "y = len(x)\n"),
]
TASK = """task: switchyard_code_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@torch.no_grad()
def greedy_docs(ckpt: pathlib.Path) -> list[tuple[str, str]]:
    """Documents whose continuation is the model's own greedy one after a context of the
    fixture's prompts (encoded without special tokens, as lm-eval sends it), where the text
    tokenizes back to the same tokens: lm-eval must call them greedy."""
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = make_fixtures.load_model(ckpt)
    docs = []
    for case in json.loads((ckpt / "expected.json").read_text())["cases"]:
        context = case["prompt"].rstrip()
        ids = tok.encode(context, add_special_tokens=False)
        for n in range(1, 4):
            tokens = []
            for _ in range(n):
                tokens.append(model(torch.tensor([ids + tokens])).logits[0, -1].argmax().item())
            continuation = tok.decode(tokens)
            if tok.encode(context + continuation, add_special_tokens=False)[len(ids) :] == tokens:
                docs.append((context, continuation))
    return docs


def start_up(binary: str, model: pathlib.Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [binary, "up", "--model", str(model), "--expert-nodes", "2", "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    ready, words = threading.Event(), []

    def read():
        for line in proc.stdout:
            if line.startswith("ready: "):
                words.extend(line.split()[1:])
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        raise SystemExit("switchyard up did not get ready")
    return proc, words[words.index("http") + 1]


@torch.no_grad()
def reference(ckpt: pathlib.Path, context: str, continuation: str) -> tuple[float, bool, int]:
    """transformers' log-likelihood of `continuation` after `context`, tokenized as lm-eval's
    API models do (trailing whitespace of the context moved to the continuation, the pair
    encoded together, no special tokens), and whether it is the greedy one."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = AutoTokenizer.from_pretrained(ckpt)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_ctx = len(tok.encode(context, add_special_tokens=False))
    model = make_fixtures.load_model(ckpt)
    lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    cont = whole[n_ctx:]
    rows = lp[n_ctx - 1 : len(whole) - 1]
    ll = sum(rows[i, t].item() for i, t in enumerate(cont))
    greedy = all(rows[i].argmax().item() == t for i, t in enumerate(cont))
    return ll, greedy, len(cont)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3_moe", help="fixture directory name")
    ap.add_argument("--lm-eval-python", default=os.environ.get("PYTHON_WITH_LM_EVAL", sys.executable))
    args = ap.parse_args()
    ckpt = ROOT / "tests" / "fixtures" / args.model
    binary = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "debug" / "switchyard"))
    docs = DOCS + greedy_docs(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = tmp / "docs.jsonl"
        data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in docs))
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "switchyard.yaml").write_text(TASK.format(data=data))
        proc, http = start_up(binary, ckpt)
        try:
            model_args = (
                f"model={args.model},base_url=http://{http}/v1/completions,tokenizer={ckpt},"
                "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1"
            )
            cmd = [
                args.lm_eval_python, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                "--tasks", "switchyard_code_loglikelihood", "--include_path", str(tmp / "tasks"),
                "--log_samples", "--output_path", str(tmp / "out"),
            ]
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            subprocess.run(cmd, check=True, env=env)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        samples = [json.loads(line) for f in (tmp / "out").rglob("samples_*.jsonl") for line in f.read_text().splitlines()]
    if len(samples) != len(docs):
        raise SystemExit(f"lm-eval logged {len(samples)} samples for {len(docs)} documents")
    bad, greedy_seen = 0, 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        context, continuation = docs[s["doc_id"]]
        ll, greedy = s["resps"][0][0]
        greedy = greedy in (True, "True")  # logged as text by some versions
        want_ll, want_greedy, n = reference(ckpt, context, continuation)
        ok = abs(float(ll) - want_ll) <= TOLERANCE * n and bool(greedy) == want_greedy
        bad += not ok
        greedy_seen += want_greedy
        print(f"doc {s['doc_id']}: lm-eval {float(ll):.5f} {greedy}, transformers {want_ll:.5f} {want_greedy}"
              f" ({n} tokens) {'ok' if ok else 'MISMATCH'}")
    if not greedy_seen:
        raise SystemExit("no document has a greedy continuation: is-greedy went unchecked")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
