#!/usr/bin/env python3
"""The measurements of `switchyard bench --device cuda:N`, made with transformers (PyTorch,
eager attention) on the same checkpoint and GPU: prefill tokens/s of one prompt, and greedy
decode tokens/s per batch size from random contexts. Prints one JSON object per line;
`switchyard bench --transformers PYTHON` runs this and puts the figures beside its own.

    python tools/bench_transformers.py --model DIR --device cuda:0 \
        --prefill-tokens 512 --batch 1,16,64,256 --context 64 --steps 32
"""

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)

    print(f"transformers: loading {args.model} on {device}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="eager")
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def sync() -> None:
        torch.cuda.synchronize(device)

    def random_ids(batch: int, n: int) -> torch.Tensor:
        return torch.randint(vocab, (batch, n), generator=gen).to(device)

    with torch.inference_mode():
        prompt = random_ids(1, args.prefill_tokens)
        for timed in (False, True):
            sync()
            start = time.perf_counter()
            model(prompt, use_cache=True, logits_to_keep=1)
            sync()
            seconds = time.perf_counter() - start
        emit("prefill", args.prefill_tokens, args.prefill_tokens / seconds)

        for batch in (int(b) for b in args.batch.split(",")):
            out = model(random_ids(batch, args.context), use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)

            def step(nxt: torch.Tensor, past):
                out = model(nxt, past_key_values=past, use_cache=True)
                return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

            nxt, past = step(nxt, past)  # warm-up
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                nxt, past = step(nxt, past)
            sync()
            seconds = time.perf_counter() - start
            emit("decode", batch, batch * args.steps / seconds)
            del past, out
            torch.cuda.empty_cache()


def emit(phase: str, batch: int, tokens_per_s: float) -> None:
    print(json.dumps({"phase": phase, "batch": batch, "tokens_per_s": tokens_per_s}), flush=True)


if __name__ == "__main__":
    main()
