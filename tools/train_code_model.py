"""Trains Switchyard's embedded default model: a small Mixtral-shaped MoE that writes Python.

The corpus is the Python source of the standard library that ships with the interpreter
running this script (tests excluded); 2% of the files are held out. The script trains a
byte-level BPE tokenizer on it, trains the model with transformers on the CPU for a fixed
wall-clock budget, and saves everything in Hugging Face layout (config.json,
model.safetensors in bf16, tokenizer.json, tokenizer_config.json, generation_config.json),
plus the loss curve (train_log.csv) and a summary with the held-out perplexity
(training.json) in tools/code-model/.

    tools/.venv/bin/python tools/train_code_model.py --out models/switchyard-code-moe --minutes 40
"""

import argparse
import csv
import json
import math
import pathlib
import random
import sysconfig
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def corpus(held_out_share: float, seed: int):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f
        for f in root.rglob("*.py")
        if not {"test", "tests", "idle_test", "site-packages", "lib2to3"} & set(f.parts)
    )
    random.Random(seed).shuffle(files)
    n_held = max(1, int(len(files) * held_out_share))
    read = lambda fs: [f.read_text(encoding="utf-8", errors="replace") for f in fs]
    return read(files[n_held:]), read(files[:n_held]), root


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok: Tokenizer, texts, bos: int, eos: int) -> torch.Tensor:
    ids = []
    for t in texts:
        ids += [bos] + tok.encode(t, add_special_tokens=False).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, seq: int, batches: int = 40) -> float:
    model.eval()
    losses = []
    step = max(1, (len(data) - seq - 1) // batches)
    for start in range(0, len(data) - seq - 1, step)[:batches]:
        x = data[start : start + seq].unsqueeze(0)
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/switchyard-code-moe")
    ap.add_argument("--log-dir", default="tools/code-model")
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out, log_dir = pathlib.Path(args.out), pathlib.Path(args.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)

    train_texts, held_texts, root = corpus(0.02, args.seed)
    tok = train_tokenizer(train_texts, args.vocab)
    bos, eos, pad = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    train, held = encode(tok, train_texts, bos, eos), encode(tok, held_texts, bos, eos)
    # Every training file starts with BOS: prompts get one too (add_special_tokens=True).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    print(f"corpus {root}: {len(train_texts)} files, {len(train)} train / {len(held)} held-out tokens", flush=True)

    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
    )
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    start = time.time()
    log = []
    step = 0
    g = torch.Generator().manual_seed(args.seed)
    while time.time() - start < budget:
        # Linear warm-up, then cosine decay over the wall-clock budget.
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train[i : i + args.seq] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            elapsed = time.time() - start
            log.append({"step": step, "seconds": round(elapsed, 1), "tokens": step * args.batch * args.seq, "loss": round(loss.item(), 4), "lr": lr})
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f} ({step * args.batch * args.seq / elapsed:.0f} tok/s)", flush=True)
    ppl = perplexity(model, held, args.seq)
    print(f"held-out perplexity {ppl:.2f}", flush=True)

    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    model.generation_config.save_pretrained(out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(out)
    with open(log_dir / "train_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "seconds", "tokens", "loss", "lr"])
        w.writeheader()
        w.writerows(log)
    summary = {
        "corpus": f"CPython {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library (tests excluded)",
        "train_tokens": len(train),
        "held_out_tokens": len(held),
        "parameters": n_params,
        "steps": step,
        "tokens_seen": step * args.batch * args.seq,
        "minutes": round((time.time() - start) / 60, 1),
        "final_train_loss": log[-1]["loss"] if log else None,
        "held_out_perplexity": round(ppl, 3),
        "torch": torch.__version__,
    }
    (log_dir / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
