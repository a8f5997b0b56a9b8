"""Records how transformers runs the embedded code model, for Switchyard's parity test.

Writes expected.json into the model directory (the same shape as the test fixtures': greedy
tokens, float32 log-probabilities and top-5 alternatives per step) for a few Python prompts.

    tools/.venv/bin/python tools/record_code_model.py --model models/switchyard-code-moe
"""

import argparse
import json
import pathlib

from tokenizers import Tokenizer
from transformers import AutoTokenizer

import make_fixtures

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_files(path):", "class Stack:\n    def __init__(self):"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/switchyard-code-moe")
    args = ap.parse_args()
    ckpt = pathlib.Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    cases = []
    for prompt in PROMPTS:
        case, info = make_fixtures.record_case(ckpt, tokenizer, raw, prompt)
        print(repr(prompt), "->", repr(info["text"]), f"min margin {info['min_margin']:.4f}")
        cases.append(case)
    (ckpt / "expected.json").write_text(json.dumps({"model_type": "mixtral", "cases": cases}) + "\n")


if __name__ == "__main__":
    main()
