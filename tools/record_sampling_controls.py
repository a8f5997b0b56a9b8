"""Records transformers' greedy continuations under sampling controls, for Switchyard's tests.

For every fixture in tests/fixtures (default: the five unquantized ones) and every prompt of
its expected.json, this runs transformers' greedy `generate` with one logits processor per
rule, applied in vLLM's order:

* `bad_words` (token-id sequences): `NoBadWordsLogitsProcessor`;
* `min_tokens`: `MinNewTokensLengthLogitsProcessor` (end-of-sequence held back);
* `logit_bias`: `SequenceBiasLogitsProcessor` with one-token sequences;
* `repetition_penalty`: `RepetitionPenaltyLogitsProcessor` (prompt and generated tokens);
* `frequency_penalty` + `presence_penalty`: `OpenAIPenalties` below (OpenAI's formula over
  the generated tokens; transformers has no processor for it).

It writes controls_expected.json next to expected.json:

    {"transformers_version", "cases": [{"prompt", "prompt_ids", "controls" (vLLM field
     names; logit_bias keys are token ids as strings, bad_words token-id lists), "tokens",
     "max_tokens", "logprobs" (log_softmax of the raw logits, as vLLM reports them),
     "finish_reason", "min_margin" (top-1 minus top-2 of the processed logits, the least over
     the recorded steps)}]}

Every recorded step has a processed top-1 minus top-2 margin of at least MIN_MARGIN, so the
greedy choice is never a near-tie: a continuation is cut (`max_tokens`) before its first
near-tie, and a rule's candidate values are tried in order: the first that keeps at least
MIN_STEPS tokens and changes the plain greedy continuation is recorded (else the first that
keeps MIN_STEPS tokens). Every rule set changes the continuation of at least one prompt of every
fixture (so a test that ignored the rule would fail).

    tools/.venv/bin/python tools/record_sampling_controls.py
"""

import argparse
import json
import os
import pathlib

import torch
import transformers
from transformers import (
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

import make_fixtures

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
MAX_NEW_TOKENS = 20
# A continuation is recorded up to its first step whose processed top-1 minus top-2 is below
# MIN_MARGIN, and only if that leaves at least MIN_STEPS tokens.
MIN_STEPS = 10
# Logit units: five times the log-probability tolerance of Switchyard's parity tests, and far
# above the ~1e-5 by which its float32 logits differ from torch's.
MIN_MARGIN = 0.005


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: each generated token's logit loses
    `frequency` per time it was generated and `presence` once."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len = prompt_len
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def processors(controls: dict, prompt_len: int) -> LogitsProcessorList:
    out = []
    if "bad_words" in controls:
        out.append(NoBadWordsLogitsProcessor(controls["bad_words"], eos_token_id=make_fixtures.EOS_ID))
    if "min_tokens" in controls:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, controls["min_tokens"], make_fixtures.EOS_ID))
    if "logit_bias" in controls:
        bias = [[[int(k)], float(v)] for k, v in controls["logit_bias"].items()]
        out.append(SequenceBiasLogitsProcessor(sequence_bias=bias))
    if "repetition_penalty" in controls:
        out.append(RepetitionPenaltyLogitsProcessor(controls["repetition_penalty"]))
    if "frequency_penalty" in controls or "presence_penalty" in controls:
        out.append(
            OpenAIPenalties(prompt_len, controls.get("frequency_penalty", 0.0), controls.get("presence_penalty", 0.0))
        )
    return LogitsProcessorList(out)


@torch.no_grad()
def run(ckpt: pathlib.Path, tokenizer, prompt: str, controls: dict) -> dict:
    # A fresh model per run: dynamic-NTK RoPE keeps state between calls.
    model = make_fixtures.load_model(ckpt)
    enc = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=make_fixtures.EOS_ID,
        pad_token_id=make_fixtures.PAD_ID,
        logits_processor=processors(controls, len(prompt_ids)),
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    raw = torch.log_softmax(torch.stack([l[0] for l in out.logits]).float(), -1)
    scores = torch.stack([s[0] for s in out.scores]).float()
    top = scores.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == tokens, "generated tokens are not the processed argmax"
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    # Steps up to the first near-tie are recorded (later ones depend on how it is broken).
    kept = next((i for i, m in enumerate(margins) if m < MIN_MARGIN), len(tokens))
    tokens = tokens[:kept]
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "controls": controls,
        "max_tokens": kept if kept < len(margins) else MAX_NEW_TOKENS,
        "tokens": tokens,
        "logprobs": [raw[i, t].item() for i, t in enumerate(tokens)],
        "finish_reason": "stop" if tokens and tokens[-1] == make_fixtures.EOS_ID else "length",
        "min_margin": min(margins[:kept], default=0.0),
    }


def rule_sets(prompt_ids: list[int], plain: list[int], finish_reason: str) -> list[list[dict]]:
    """Candidate controls per rule, tried in order for a prompt whose plain greedy
    continuation is `plain`: the first without a near-tie is recorded. (transformers matches
    a bad word's leading tokens against the prompt too, vLLM only against generated tokens:
    the two-token word's first token is never the prompt's last.)"""
    two = [plain[0], plain[3]] if prompt_ids[-1] != plain[0] else [plain[4], plain[3]]
    sets = [
        [{"frequency_penalty": f, "presence_penalty": p} for f, p in [(0.9, 0.6), (1.3, 0.4), (0.7, 1.1), (1.7, 0.2), (0.4, 0.3), (2.0, 1.5), (-0.5, 0.8), (1.1, -0.6), (-1.0, -1.0), (0.15, 0.1), (-2.0, 0.5), (0.05, 0.05)]],
        [{"repetition_penalty": r} for r in [1.6, 1.35, 1.9, 1.2, 2.5, 1.1, 0.8, 3.0, 0.5, 1.05]],
        [
            {"logit_bias": {str(plain[0]): -100.0, str(plain[2]): b, "300": 4.0}}
            for b in [3.0, -2.0, 1.5, 5.0, -7.0, 0.5, 8.0, -0.5]
        ],
        [{"bad_words": [[plain[1]], two]}, {"bad_words": [[plain[2]]]}, {"bad_words": [[plain[1]]]}]
        + [{"bad_words": [[plain[i]], two]} for i in range(4, 10)],
    ]
    if finish_reason == "stop":
        sets.append([{"min_tokens": MAX_NEW_TOKENS}, {"min_tokens": len(plain) + 2}])
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=pathlib.Path, default=make_fixtures.REPO_ROOT / "tests" / "fixtures")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="fixture to record (repeatable; default all)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # bit-reproducible float32 results
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    for arch in args.arch or ARCHS:
        ckpt = args.fixtures / arch
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        expected = json.loads((ckpt / "expected.json").read_text())
        cases = []
        changed = {}
        for case in expected["cases"]:
            plain = case["tokens"]
            for rule, candidates in enumerate(rule_sets(case["prompt_ids"], plain, case["finish_reason"])):
                # The first candidate without an early near-tie that changes the continuation,
                # else the first without an early near-tie.
                got = None
                for controls in candidates:
                    run_ = run(ckpt, tokenizer, case["prompt"], controls)
                    if len(run_["tokens"]) < MIN_STEPS and run_["finish_reason"] != "stop":
                        print(f"{arch} {json.dumps(controls)}: near-tie at step {len(run_['tokens'])}, next candidate")
                        continue
                    got = got or run_
                    if run_["tokens"] != plain[: len(run_["tokens"])]:
                        got = run_
                        break
                if got is None:
                    raise SystemExit(f"{arch} {case['prompt']!r}: every candidate of rule {rule} has a near-tie")
                changed[rule] = changed.get(rule, False) or got["tokens"] != plain[: len(got["tokens"])]
                print(f"{arch} {json.dumps(controls)}: {len(got['tokens'])} tokens, "
                      f"{'changed' if got['tokens'] != plain[: len(got['tokens'])] else 'same'}, "
                      f"margin {got['min_margin']:.3f}, {got['finish_reason']}")
                cases.append(got)
        unchanged = [r for r, c in changed.items() if not c]
        assert not unchanged, f"{arch}: rule sets {unchanged} change no continuation"
        out = {"transformers_version": transformers.__version__, "cases": cases}
        (ckpt / "controls_expected.json").write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
