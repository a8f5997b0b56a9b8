"""Trains Switchyard's embedded default model: a small Mixtral-shaped MoE that writes Python.

The corpus is the Python source of the standard library that ships with the interpreter
running this script (tests excluded); 2% of the files are held out. The script trains a
byte-level BPE tokenizer on it, trains the model with transformers on the CPU for a fixed
wall-clock budget, and saves everything in Hugging Face layout (config.json,
model.safetensors in bf16, tokenizer.json, tokenizer_config.json, generation_config.json),
plus the loss curve (train_log.csv) and a summary with the held-out perplexity
(training.json) in tools/code-model/.

Fill-in-the-middle: with --fim-rate, that share of the training sequences are FIM examples in
prefix-suffix-middle order, `<|bos|><|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>MIDDLE<|eos|>`
(the Qwen2.5-Coder token names), cut from a window of a training file: the middle is one whole
line, a few whole lines, or a span inside a line (what an editor asks for with the cursor
mid-line). --resume continues from a saved model, adding the three FIM tokens to its vocabulary.

    tools/.venv/bin/python tools/train_code_model.py --out models/switchyard-code-moe --minutes 40
    tools/.venv/bin/python tools/train_code_model.py --resume models/switchyard-code-moe \
        --out models/switchyard-code-moe --fim-rate 0.5 --lr 1e-3 --minutes 25
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
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"


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


def fim_split(text: str, rng: random.Random):
    """(prefix, middle, suffix) of a window of about 800 characters of `text`, cut at line
    boundaries; the middle is one line (half the time), up to four lines, or a span of one line."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 3:
        return None
    first = rng.randrange(len(lines))
    last, size = first, 0
    while last < len(lines) and size < 800:
        size += len(lines[last])
        last += 1
    window = lines[first:last]
    if len(window) < 3:
        return None
    kind = rng.random()
    at = rng.randrange(len(window))
    if kind < 0.5:
        n = 1
    elif kind < 0.75:
        n = rng.randint(1, 4)
    else:
        line = window[at]
        a, b = sorted(rng.randrange(len(line) + 1) for _ in range(2))
        before, after = "".join(window[:at]) + line[:a], line[b:] + "".join(window[at + 1 :])
        return before, line[a:b], after
    return "".join(window[:at]), "".join(window[at : at + n]), "".join(window[at + n :])


def fim_example(tok: Tokenizer, text: str, seq: int, rng: random.Random, ids):
    """One FIM training row of `seq + 1` ids (padded with `pad`) and its loss mask, or None."""
    bos, eos, pad, pre, suf, mid = ids
    split = fim_split(text, rng)
    if split is None:
        return None
    prefix, middle, suffix = (tok.encode(t, add_special_tokens=False).ids for t in split)
    room = seq + 1 - 5 - len(middle)
    if room < 16:
        return None
    # Keep the context nearest the middle: the end of the prefix and the start of the suffix.
    keep_suffix = min(len(suffix), room // 2)
    keep_prefix = min(len(prefix), room - keep_suffix)
    keep_suffix = min(len(suffix), room - keep_prefix)
    row = [bos, pre] + prefix[len(prefix) - keep_prefix :] + [suf] + suffix[:keep_suffix] + [mid] + middle + [eos]
    mask = [1] * len(row) + [0] * (seq + 1 - len(row))
    return row + [pad] * (seq + 1 - len(row)), mask


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
    ap.add_argument("--seed", type=int, default=0, help="weights and batches")
    ap.add_argument("--split-seed", type=int, default=0, help="which files are held out; keep it across continued runs")
    ap.add_argument("--resume", help="continue training the model saved in this directory")
    ap.add_argument("--fim-rate", type=float, default=0.0, help="share of fill-in-the-middle rows")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out, log_dir = pathlib.Path(args.out), pathlib.Path(args.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)

    train_texts, held_texts, root = corpus(0.02, args.split_seed)
    if args.resume:
        tok = Tokenizer.from_file(str(pathlib.Path(args.resume) / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_texts, args.vocab)
    if args.fim_rate > 0:
        tok.add_special_tokens([FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE])
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
    if args.resume:
        model = MixtralForCausalLM.from_pretrained(args.resume, dtype=torch.float32)
        model.config.output_router_logits = True
        if model.config.vocab_size != tok.get_vocab_size():
            model.resize_token_embeddings(tok.get_vocab_size(), mean_resizing=True)
    else:
        model = MixtralForCausalLM(config)
    config = model.config
    fim_ids = (bos, eos, pad, *(tok.token_to_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)))
    rng = random.Random(args.seed)
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
        n_fim = sum(rng.random() < args.fim_rate for _ in range(args.batch))
        idx = torch.randint(0, len(train) - args.seq - 1, (args.batch - n_fim,), generator=g)
        rows = [train[i : i + args.seq] for i in idx]
        labels = [r.clone() for r in rows]
        while len(rows) < args.batch:
            example = fim_example(tok, rng.choice(train_texts), args.seq - 1, rng, fim_ids)
            if example is None:
                continue
            row, mask = example
            row = torch.tensor(row, dtype=torch.long)
            rows.append(row)
            labels.append(torch.where(torch.tensor(mask, dtype=torch.bool), row, -100))
        x, y = torch.stack(rows), torch.stack(labels)
        loss = model(input_ids=x, labels=y).loss
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
    # A continued run keeps the first run's record beside its own.
    stem = "fim-" if args.resume else ""
    with open(log_dir / f"{stem}train_log.csv", "w", newline="") as f:
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
        "resumed_from": args.resume,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "fim_rate": args.fim_rate,
        "torch": torch.__version__,
    }
    (log_dir / f"{stem}training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
