"""Records what lm-evaluation-harness' loglikelihood requests must score, for
tests/openai/test_lm_eval.py.

The documents are contexts and continuations of Python code, and the fixture model's own
greedy continuations of its prompts (so that is-greedy is checked both ways). For each one it
writes transformers' log-likelihood of the continuation, tokenized as lm-eval's API models do
(`local-completions` with a Hugging Face tokenizer), whether it is the greedy continuation, and
its token count, to tests/fixtures/MODEL/lm_eval.json. The test then runs `lm_eval --model
local-completions` itself against a real `switchyard up` (it sends `echo: true, logprobs: 1,
max_tokens: 1` with token-id prompts) and compares every sample with these, within 1e-3 per
token.

    tools/.venv/bin/python tools/record_lm_eval.py --model qwen3_moe
"""

import argparse
import json
import pathlib

import torch
from transformers import AutoTokenizer

import make_fixtures

ROOT = make_fixtures.REPO_ROOT
DOCS = [
    ("def fibonacci(n):", "\n    return n"),
    ("import os\nimport sys\n", "import json\n"),
    ("class Stack:\n    def push(self, item):\n", "        self.items.append(item)\n"),
    ("for i in range(10):\n", "    print(i)\n"),
    ("x = [1, 2, 3]\n", "y = len(x)\n"),
]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3_moe", help="fixture directory name")
    args = ap.parse_args()
    ckpt = ROOT / "tests" / "fixtures" / args.model
    out = []
    for context, continuation in DOCS + greedy_docs(ckpt):
        ll, greedy, n = reference(ckpt, context, continuation)
        out.append({"context": context, "continuation": continuation, "loglikelihood": ll, "greedy": greedy, "tokens": n})
        print(f"{context!r} + {continuation!r}: {ll:.5f} greedy={greedy} ({n} tokens)")
    if not any(d["greedy"] for d in out):
        raise SystemExit("no document has a greedy continuation: is-greedy would go unchecked")
    import transformers

    record = {"transformers_version": transformers.__version__, "docs": out}
    (ckpt / "lm_eval.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
