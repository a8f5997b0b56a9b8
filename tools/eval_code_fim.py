"""Measures the embedded code model's fill-in-the-middle on held-out files, with transformers.

The held-out files are the 2% of the standard library `train_code_model.py` never trained on
(the same split). A case is a top-level function or class of one of them, short enough for
the model's training window, with one line of its body taken out: the prompt is
`<|fim_prefix|>` + the lines before + `<|fim_suffix|>` + the lines after + `<|fim_middle|>`,
and greedy decoding writes the middle until `<|eos|>`. Two rates per case:

* exact line: the middle written is the line taken out (trailing whitespace aside);
* parses: the function with the written middle in place parses with `ast`.

Writes the rates to tools/code-model/fim.json and the cases, with transformers' greedy
middles and their smallest top-1/top-2 log-probability margin, to
tests/fixtures/code-model-fim/cases.json for `tests/openai/test_fim.py`.

    tools/.venv/bin/python tools/eval_code_fim.py --model models/switchyard-code-moe
"""

import argparse
import ast
import json
import pathlib
import random

import torch
from transformers import AutoTokenizer, MixtralForCausalLM

from train_code_model import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, corpus


def cases_from(texts, rng: random.Random, max_chars: int):
    for text in texts:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            first, last = node.lineno - 1, node.end_lineno
            if node.decorator_list:
                first = node.decorator_list[0].lineno - 1
            block = lines[first:last]
            if len(block) < 4 or sum(map(len, block)) > max_chars:
                continue
            # A line of the body that holds code: not the header, not blank, not a lone bracket.
            candidates = [i for i in range(1, len(block)) if len(block[i].strip()) > 3]
            if not candidates:
                continue
            at = rng.choice(candidates)
            prefix, middle, suffix = "".join(block[:at]), block[at], "".join(block[at + 1 :])
            if not middle.endswith("\n"):
                middle += "\n"
            yield {"prefix": prefix, "suffix": suffix, "middle": middle}


def parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


@torch.no_grad()
def fill(model, tokenizer, case, max_new: int):
    prompt = FIM_PREFIX + case["prefix"] + FIM_SUFFIX + case["suffix"] + FIM_MIDDLE
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, do_sample=False, max_new_tokens=max_new, output_scores=True, return_dict_in_generate=True
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    margins = []
    for step in out.scores:
        top = torch.log_softmax(step[0].float(), -1).topk(2).values
        margins.append((top[0] - top[1]).item())
    finished = new and new[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text, new, bool(finished), min(margins) if margins else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/switchyard-code-moe")
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="which lines are taken out")
    ap.add_argument("--split-seed", type=int, default=0, help="the held-out split train_code_model.py used")
    ap.add_argument("--fixture", default="tests/fixtures/code-model-fim/cases.json")
    ap.add_argument("--fixture-cases", type=int, default=35)
    ap.add_argument("--summary", default="tools/code-model/fim.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    _, held_texts, root = corpus(0.02, args.split_seed)
    rng = random.Random(args.seed)
    cases = list(cases_from(held_texts, rng, args.max_chars))
    rng.shuffle(cases)
    cases = cases[: args.cases]
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    exact = parsed = finished = 0
    for n, case in enumerate(cases):
        text, ids, done, margin = fill(model, tokenizer, case, args.max_new)
        case.update(expected=text, expected_ids=ids, finished=done, min_margin=round(margin, 4))
        exact += text.rstrip() == case["middle"].rstrip()
        parsed += parses(case["prefix"] + text + case["suffix"])
        finished += done
        if (n + 1) % 20 == 0:
            print(f"{n + 1}/{len(cases)}: exact {exact}, parses {parsed}, ended {finished}", flush=True)
    # Every held-out case parses with its true middle: the rates measure the model alone.
    assert all(parses(c["prefix"] + c["middle"] + c["suffix"]) for c in cases)
    summary = {
        "held_out_files": len(held_texts),
        "cases": len(cases),
        "exact_line": exact,
        "exact_line_rate": round(exact / len(cases), 3),
        "parses": parsed,
        "parse_rate": round(parsed / len(cases), 3),
        "ended_with_eos": finished,
        "max_new_tokens": args.max_new,
        "corpus": str(root),
    }
    print(json.dumps(summary), flush=True)
    pathlib.Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    fixture = pathlib.Path(args.fixture)
    fixture.parent.mkdir(parents=True, exist_ok=True)
    kept = [{k: c[k] for k in ("prefix", "suffix", "middle", "expected", "expected_ids", "finished", "min_margin")} for c in cases[: args.fixture_cases]]
    fixture.write_text(json.dumps({"max_new_tokens": args.max_new, "cases": kept}, indent=1) + "\n")


if __name__ == "__main__":
    main()
