"""Records transformers' prompt log-probabilities, for Switchyard's tests of `echo` with
`logprobs` and `prompt_logprobs`.

For every fixture in tests/fixtures and every case of its expected.json, the prompt scored is
the case's prompt ids followed by its greedy continuation (a longer prompt, so that the tests
can cut its prefill into many chunks). One forward pass of transformers over it gives the
logits of every position; `log_softmax` of position i-1's logits scores prompt token i.
Models with dynamic NTK RoPE (qwen2_moe) are scored on their first `max_position_embeddings`
tokens only: past that, one transformers pass scales every position for the whole length,
which is not what a server that scores the prompt as it grows computes.

It writes prompt_logprobs.json next to expected.json:

    {"transformers_version", "cases": [{"prompt" (the case's text; its ids are the first
     "prompt_tokens" of "ids"), "prompt_tokens", "ids" (the scored prompt, BOS first),
     "logprobs" (of ids[1:]), "ranks" (1 + how many tokens are more likely), "rank_margins"
     (distance to the nearest other token's log-probability),
     "top_logprobs" ([[id, logprob] x5 per position, best first])}]}

    tools/.venv/bin/python tools/record_prompt_logprobs.py
    tools/.venv/bin/python tools/record_prompt_logprobs.py --arch deepseek_v3 --arch deepseek_v3_fp8   # some only
"""

import argparse
import json
import pathlib

import torch
import transformers

import make_fixtures

TOP = 5


@torch.no_grad()
def record(ckpt: pathlib.Path) -> dict:
    expected = json.loads((ckpt / "expected.json").read_text())
    cases = []
    for case in expected["cases"]:
        model = make_fixtures.load_model(ckpt)  # fresh per case, as make_fixtures does
        ids = case["prompt_ids"] + case["tokens"]
        if (model.config.rope_parameters or {}).get("rope_type") == "dynamic":
            ids = ids[: model.config.max_position_embeddings]
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[:-1]
        target = torch.tensor(ids[1:])
        chosen = lp.gather(1, target[:, None])[:, 0]
        ranks = 1 + (lp > chosen[:, None]).sum(-1)
        # How far the nearest other token is: a rank is only meaningful beyond float noise.
        gaps = (lp - chosen[:, None]).abs().scatter(1, target[:, None], float("inf")).min(-1).values
        top_v, top_i = lp.topk(TOP, dim=-1)
        cases.append(
            {
                "prompt": case["prompt"],
                "prompt_tokens": len(case["prompt_ids"]),
                "ids": ids,
                "logprobs": chosen.tolist(),
                "ranks": ranks.tolist(),
                "rank_margins": gaps.tolist(),
                "top_logprobs": [
                    [[int(i), float(v)] for i, v in zip(top_i[p].tolist(), top_v[p].tolist())] for p in range(len(lp))
                ],
            }
        )
    return {"transformers_version": transformers.__version__, "cases": cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", type=pathlib.Path, default=make_fixtures.REPO_ROOT / "tests" / "fixtures")
    ap.add_argument("--arch", action="append", help="fixture directory name (repeatable; default all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # bit-reproducible float32 results
    transformers.logging.set_verbosity_error()  # no load report for the MTP tensors DeepSeek-V3 fixtures carry
    transformers.utils.logging.disable_progress_bar()
    archs = args.arch or sorted(p.name for p in args.fixtures.iterdir() if (p / "expected.json").exists())
    for arch in archs:
        ckpt = args.fixtures / arch
        out = record(ckpt)
        (ckpt / "prompt_logprobs.json").write_text(json.dumps(out) + "\n")
        n = sum(len(c["logprobs"]) for c in out["cases"])
        print(f"{arch}: {len(out['cases'])} prompts, {n} scored tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
