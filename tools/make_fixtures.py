#!/usr/bin/env python3
"""Generate tiny random Mixture-of-Experts checkpoints plus reference greedy
continuations recorded with Hugging Face transformers.

For every architecture this writes one directory under --out containing

    config.json, generation_config.json      (transformers 5.x layout)
    model.safetensors  or  model-0000x-of-0000y.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json     (shared byte-level BPE, 512 ids)
    expected.json                             (greedy continuations + log-probs)

Weights are random but deliberately large so that greedy choices are never
near-ties (every recorded step has a top-1/top-2 log-prob margin >= 0.02);
a draw that violates that is thrown away and re-drawn with the next sub-seed.

Usage:
    tools/.venv/bin/python tools/make_fixtures.py                  # all archs, seed 0
    tools/.venv/bin/python tools/make_fixtures.py --seed 1 --out /tmp/heldout
    tools/.venv/bin/python tools/make_fixtures.py --arch gpt_oss --arch olmoe

DeepSeek-V3 fixtures are saved as the Hub ships DeepSeek-V3 instead (transformers 4.x
config.json layout, per-expert weights, a float32 `e_score_correction_bias`, and a
multi-token-prediction layer at `model.layers.<num_hidden_layers>.*` that transformers ignores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV3Config,
    GenerationConfig,
    Glm4MoeConfig,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
    "gpt_oss_mxfp4",
    "qwen3_moe_fp8",
    "deepseek_v3",
    "deepseek_v3_fp8",
    "deepseek_v2",
    "glm4_moe",
]
# Quantized fixtures: a base architecture saved as the Hub ships its quantized checkpoints.
QUANTIZED = {"gpt_oss_mxfp4": "gpt_oss", "qwen3_moe_fp8": "qwen3_moe", "deepseek_v3_fp8": "deepseek_v3"}
# Saved as the Hub ships DeepSeek-V3 (see deepseek_hub_layout).
DEEPSEEK = ("deepseek_v3", "deepseek_v3_fp8")
# Added to the seed so every arch draws different weights. Seeds are combined as
# seed * SEED_STRIDE + offset * REDRAW_STRIDE + redraw, so no (seed, redraw) pair
# of one --seed can ever collide with another --seed's weights.
ARCH_OFFSET = {
    "mixtral": 1,
    "qwen2_moe": 2,
    "qwen3_moe": 3,
    "olmoe": 4,
    "gpt_oss": 5,
    "gpt_oss_mxfp4": 6,
    "qwen3_moe_fp8": 7,
    "deepseek_v3": 8,
    "deepseek_v3_fp8": 9,
    "deepseek_v2": 10,
    "glm4_moe": 11,
}
SEED_STRIDE = 1_000_000
REDRAW_STRIDE = 10_000
MAX_REDRAWS = 500

# ---------------------------------------------------------------- tokenizer
VOCAB_SIZE = 512
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
# Training corpus: fixed list of stdlib sources of the running interpreter.
TOKENIZER_CORPUS = [
    "os.py",
    "functools.py",
    "collections/__init__.py",
    "argparse.py",
    "typing.py",
    "dataclasses.py",
    "json/encoder.py",
    "textwrap.py",
    "contextlib.py",
    "abc.py",
]

# ------------------------------------------------------------------ prompts
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
]
# qwen2_moe uses dynamic NTK RoPE with max_position_embeddings 24: every prompt
# (with BOS) must be shorter than 24 tokens, decoding must run past 24, and prompt +
# generation must stay within the stretched context of 24 x factor 2 = 48 positions.
QWEN2_DYNAMIC_MAX_POS = 24
SHORT_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def push",
]
MAX_NEW_TOKENS = 20
TOP_LOGPROBS = 5
MIN_MARGIN = 0.02

# ------------------------------------------------------------------- weights
WEIGHT_STD = 0.15  # every Linear / 3-D expert weight
EMBED_STD = 1.0
NORM_STD = 0.1  # norm weights are 1 + NORM_STD * randn
BIAS_STD = 0.1
SINK_STD = 1.0
# gpt_oss clamps the expert gate/up projections at +-swiglu_limit (7.0). With the
# common 0.15 std those activations are ~N(0, 1.2^2) and the clamp would never
# fire, so gpt_oss expert gate_up weights get a larger std to really exercise it.
GPT_OSS_GATE_UP_STD = 0.6
# DeepSeek-V3's `e_score_correction_bias` (added to the sigmoid scores, [0, 1], for choosing
# experts only): large enough to change some of the choices, as deepseek_checks counts.
SCORE_BIAS_STD = 0.08

# MXFP4 (gpt-oss experts): hidden and expert width 96, so every row is 3 blocks of 32.
MXFP4_HIDDEN = 96
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# FP8 (qwen3_moe, deepseek_v3): 24 x 24 scale blocks over 16- to 112-wide matrices, so there
# are several blocks a side and partial ones at the edges.
FP8_BLOCK = [24, 24]
FP8_MAX = 448.0


# DeepSeek-V3's YaRN, as its config.json's `rope_scaling` holds it (without `type`).
DEEPSEEK_YARN = {
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}


def common_kwargs(num_layers: int = 2, eps: float = 1e-6) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=num_layers,
        num_experts_per_tok=2,
        rms_norm_eps=eps,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def deepseek_kwargs() -> dict:
    """What the DeepSeek fixtures share: latent attention widths, 16 experts in 4 groups (2
    kept), 2 shared experts, a dense first layer, YaRN with mscale."""
    kwargs = common_kwargs(num_layers=3)
    del kwargs["head_dim"]  # DeepSeek's configs set it to qk_rope_head_dim
    kwargs.update(num_key_value_heads=4, num_experts_per_tok=4)
    return dict(
        **kwargs,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        moe_intermediate_size=16,
        intermediate_size=96,
        first_k_dense_replace=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **DEEPSEEK_YARN},
        max_position_embeddings=128,
        attention_bias=False,
    )


def make_config(arch: str):
    if arch == "mixtral":
        return MixtralConfig(
            **common_kwargs(),
            num_local_experts=8,
            intermediate_size=32,
            sliding_window=12,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            max_position_embeddings=256,
        )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **common_kwargs(num_layers=3),
            num_experts=8,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            intermediate_size=96,
            qkv_bias=True,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            decoder_sparse_step=1,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            max_position_embeddings=QWEN2_DYNAMIC_MAX_POS,
        )
    if arch in ("qwen3_moe", "qwen3_moe_fp8"):
        return Qwen3MoeConfig(
            **common_kwargs(num_layers=3),
            num_experts=8,
            moe_intermediate_size=32,
            intermediate_size=96,
            decoder_sparse_step=2,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            # Room for a chat with tools (the tool-calling tests render them into the prompt).
            max_position_embeddings=1024 if arch == "qwen3_moe" else 256,
        )
    if arch == "olmoe":
        return OlmoeConfig(
            **common_kwargs(),
            num_experts=8,
            intermediate_size=32,
            clip_qkv=1.0,
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=256,
        )
    if arch in ("gpt_oss", "gpt_oss_mxfp4"):
        kwargs = common_kwargs(eps=1e-5)
        if arch == "gpt_oss_mxfp4":
            kwargs["hidden_size"] = MXFP4_HIDDEN
        return GptOssConfig(
            **kwargs,
            num_local_experts=8,
            intermediate_size=MXFP4_HIDDEN if arch == "gpt_oss_mxfp4" else 32,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            attention_bias=True,
            swiglu_limit=7.0,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "original_max_position_embeddings": 64,
                "truncate": False,
                "rope_theta": 150000.0,
            },
            max_position_embeddings=256,
        )
    if arch in DEEPSEEK:
        return DeepseekV3Config(
            **deepseek_kwargs(),
            # Both query paths: low-rank q_a_proj / q_a_layernorm / q_b_proj, and a plain q_proj.
            q_lora_rank=48 if arch == "deepseek_v3" else None,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            moe_layer_freq=1,
            rope_interleave=True,
            num_nextn_predict_layers=1,
        )
    if arch == "deepseek_v2":
        # As DeepSeek-V2-Lite (a plain q_proj) but with V2's group-limited routing, saved as
        # transformers 5 writes it (fused experts, `rope_parameters`).
        return DeepseekV2Config(
            **deepseek_kwargs(),
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
        )
    if arch == "glm4_moe":
        # GLM-4.5's layout over DeepSeek-V3's routing: GQA with q/k/v biases, per-head q/k
        # norms and RoPE on half of each head; saved as transformers 5 writes it.
        kwargs = common_kwargs(num_layers=3)
        kwargs.update(num_experts_per_tok=4)
        return Glm4MoeConfig(
            **kwargs,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_shared_experts=1,
            moe_intermediate_size=16,
            intermediate_size=96,
            first_k_dense_replace=1,
            attention_bias=True,
            use_qk_norm=True,
            num_nextn_predict_layers=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            max_position_embeddings=256,
        )
    raise ValueError(f"unknown arch {arch!r}")


# ---------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / rel).read_text(encoding="utf-8") for rel in TOKENIZER_CORPUS]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for t, i in ((BOS, BOS_ID), (EOS, EOS_ID), (PAD, PAD_ID)):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


# ------------------------------------------------------------------- weights


@torch.no_grad()
def randomize(model: torch.nn.Module, arch: str, gen: torch.Generator) -> None:
    """Overwrite every parameter with large random values (deterministic order), then
    DeepSeek-V3's `e_score_correction_bias` buffers (none elsewhere)."""
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            val = EMBED_STD * noise
        elif "norm" in name and p.ndim == 1:
            val = 1.0 + NORM_STD * noise
        elif leaf == "sinks":
            val = SINK_STD * noise
        elif leaf.endswith("bias"):  # Linear biases, router bias, gpt_oss expert biases
            val = BIAS_STD * noise
        elif arch.startswith("gpt_oss") and leaf == "gate_up_proj":
            val = GPT_OSS_GATE_UP_STD * noise
        else:
            assert p.ndim >= 2, name
            val = WEIGHT_STD * noise
        p.copy_(val.to(p.dtype))
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("e_score_correction_bias"):
            b.copy_(SCORE_BIAS_STD * torch.randn(b.shape, generator=gen, dtype=torch.float32))


@torch.no_grad()
def make_mtp_layer(config, arch: str, gen: torch.Generator) -> torch.nn.Module:
    """DeepSeek-V3's multi-token-prediction layer as the Hub stores it under
    `model.layers.<num_hidden_layers>.`: a full MoE decoder layer plus `embed_tokens`, `enorm`,
    `hnorm`, `eh_proj` [hidden, 2 hidden] and `shared_head.{norm,head}`; random like the rest.
    transformers builds no such layer and ignores these tensors."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    h, v = config.hidden_size, config.vocab_size
    layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
    assert hasattr(layer.mlp, "experts"), "the MTP layer is an MoE layer"
    layer.embed_tokens = torch.nn.Embedding(v, h)
    layer.enorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
    layer.hnorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
    layer.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
    layer.shared_head.head = torch.nn.Linear(h, v, bias=False)
    randomize(layer, arch, gen)
    return layer


def split_experts(prefix: str, experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers' fused experts as the Hub stores them, one Linear weight per expert:
    `gate_up_proj` [E, 2I, H] holds gate rows then up rows (its forward takes
    `linear(x, gate_up_proj[e]).chunk(2, -1)`); `down_proj` [E, H, I] is already [out, in]."""
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    inter = gate_up.shape[1] // 2
    out = {}
    for e in range(gate_up.shape[0]):
        out[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :inter].clone()
        out[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, inter:].clone()
        out[f"{prefix}.{e}.down_proj.weight"] = down[e].clone()
    return out


def save_checkpoint(model, tokenizer, out_dir: Path, arch: str, mtp: torch.nn.Module | None = None) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    kwargs = {}
    if arch in QUANTIZED or arch in DEEPSEEK:
        kwargs["max_shard_size"] = "100MB"  # one file, rewritten (quantized / Hub layout)
    if arch == "qwen3_moe":
        kwargs["max_shard_size"] = "150KB"  # force >= 2 shards + index.json
    # DeepSeek-V3 ships its routing bias in float32: keep it before the bf16 cast.
    fp32 = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model.to(torch.bfloat16).save_pretrained(out_dir, **kwargs)
    if arch == "gpt_oss_mxfp4":
        quantize_mxfp4_experts(out_dir)
    if arch in DEEPSEEK:
        deepseek_hub_layout(out_dir, model, fp32, mtp)
    if arch == "qwen3_moe_fp8":
        quantize_fp8_linears(out_dir)
    if arch == "deepseek_v3_fp8":
        # As DeepSeek-V3: the attention and MLP projections only (not the MTP's eh_proj), and
        # no `modules_to_not_convert`.
        quantize_fp8_linears(out_dir, only=(".self_attn.", ".mlp."), modules_to_not_convert=None)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for f in out_dir.iterdir():  # save_pretrained writes safetensors as 0600
        f.chmod(0o644)


# ------------------------------------------------------- DeepSeek-V3 layout


def deepseek_hub_layout(out_dir: Path, model, fp32: dict[str, torch.Tensor], mtp: torch.nn.Module) -> None:
    """Rewrites a saved DeepSeek-V3 checkpoint as the Hub ships DeepSeek-V3:

    * config.json in the transformers 4.x layout: `rope_theta` + `rope_scaling` {"type": "yarn",
      ...} instead of `rope_parameters`, `torch_dtype` instead of `dtype`, and without the
      `head_dim` / `qk_head_dim` that transformers 5 derives;
    * `mlp.gate.e_score_correction_bias` in float32;
    * the MTP layer's tensors under `model.layers.<num_hidden_layers>.` (bf16, the bias float32).

    Routed experts are already per expert (`mlp.experts.N.{gate,up,down}_proj.weight`):
    transformers 5 saves its fused experts that way; `split_experts` must agree with it."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    n = model.config.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            prefix = f"model.layers.{i}.mlp.experts"
            for name, t in split_experts(prefix, layer.mlp.experts).items():
                assert torch.equal(tensors[name], t), f"transformers saved {name} differently from split_experts"
            fused = [k for k in tensors if k.startswith(prefix) and not k.startswith(prefix + ".")]
            assert not fused, fused
    for name, b in fp32.items():
        assert tensors[name].shape == b.shape, name
        tensors[name] = b.float()
    assert not any(k.startswith(f"model.layers.{n}.") for k in tensors)
    mtp_state = {}
    for name, t in mtp.state_dict().items():
        if name.startswith("mlp.experts."):
            continue
        mtp_state[name] = t.float() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    mtp_state.update({k: t.to(torch.bfloat16) for k, t in split_experts("mlp.experts", mtp.mlp.experts).items()})
    tensors.update({f"model.layers.{n}.{k}": t.contiguous() for k, t in mtp_state.items()})
    save_file({k: tensors[k] for k in sorted(tensors)}, path, metadata={"format": "pt"})

    cfg = json.loads((out_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "yarn" and {k: rope[k] for k in DEEPSEEK_YARN} == DEEPSEEK_YARN, rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "yarn", **DEEPSEEK_YARN}
    cfg["torch_dtype"] = cfg.pop("dtype")
    for derived in ("head_dim", "qk_head_dim"):
        cfg.pop(derived, None)
    for field in (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
        "num_experts_per_tok", "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob",
        "routed_scaling_factor", "n_shared_experts", "moe_intermediate_size", "intermediate_size",
        "first_k_dense_replace", "moe_layer_freq", "rope_interleave", "num_nextn_predict_layers",
    ):  # fmt: skip
        assert field in cfg, f"config.json lacks {field}"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3", cfg
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------- quantizing


def _rewrite(out_dir: Path, transform, quantization_config: dict) -> None:
    """Applies `transform(name, tensor) -> {name: tensor}` to every tensor of the single
    safetensors file, and declares `quantization_config` in config.json."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    out = {}
    for name in sorted(tensors):
        out.update(transform(name, tensors[name]))
    save_file(out, path, metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of `w` [..., rows, cols] along its rows, as gpt-oss stores it: blocks
    [..., rows, cols/32, 16] (E2M1 nibbles, the low one first) and E8M0 scales
    [..., rows, cols/32]. Each block's scale is the smallest power of two that brings its
    largest magnitude within 6; each value rounds to the nearest E2M1 value."""
    *lead, cols = w.shape
    blocks = w.float().reshape(*lead, cols // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-126, 127)
    q = blocks / torch.exp2(exp)
    lut = torch.tensor(FP4_VALUES)
    nibbles = (q.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()


def quantize_mxfp4_experts(out_dir: Path) -> None:
    """gpt-oss's experts in MXFP4, as the Hub ships gpt-oss: `gate_up_proj` [E, H, 2I] and
    `down_proj` [E, I, H] become `*_blocks` / `*_scales` over their output rows (the
    [E, out, in] transpose); biases, attention, router, embeddings and head stay bf16."""

    def transform(name: str, t: torch.Tensor) -> dict:
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            blocks, scales = mxfp4_pack(t.transpose(1, 2))
            return {f"{name}_blocks": blocks, f"{name}_scales": scales}
        return {name: t}

    _rewrite(
        out_dir,
        transform,
        {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
        },
    )


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """FP8 `q` [rows, cols] times its per-block scales, blocks of `block` from the top left
    with partial ones at the edges (DeepSeek-V3's `weight_dequant`)."""
    rows, cols = q.shape
    s = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * s


def check_fp8_semantics() -> None:
    """Where blocks divide a matrix evenly, transformers' own dequantizer gives what
    `fp8_dequantize` gives: value × weight_scale_inv, block by block."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(48, 72, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, generator=gen) + 0.5
    theirs = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)
    assert torch.equal(theirs, fp8_dequantize(q, scale, FP8_BLOCK)), "FP8 block semantics differ from transformers'"


FP8_NOT_CONVERTED = ["model.embed_tokens", "lm_head", "model.layers.*.mlp.gate"]


def quantize_fp8_linears(
    out_dir: Path, only: tuple[str, ...] | None = None, modules_to_not_convert: list[str] | None = FP8_NOT_CONVERTED
) -> None:
    """Every linear layer's weight in float8_e4m3fn with one float32 `weight_scale_inv` per
    24 x 24 block (each block's largest magnitude maps to 448), as DeepSeek-V3 and the
    Qwen3 FP8 checkpoints store them; the routers, norms, embeddings and head stay bf16.
    `only`: quantize just the `*_proj.weight`s whose names contain one of these strings.
    `modules_to_not_convert`: declared in the quantization_config unless None."""

    def transform(name: str, t: torch.Tensor) -> dict:
        # DeepSeek-V3's kv_a_proj_with_mqa is quantized like every other projection.
        quantized = t.ndim == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))
        if only is not None:
            quantized = quantized and any(part in name for part in only)
        if not quantized:
            return {name: t}
        w = t.float()
        rows, cols = w.shape
        br, bc = -(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1])
        scale = torch.ones(br, bc)
        for i in range(br):
            for j in range(bc):
                blk = w[i * FP8_BLOCK[0] : (i + 1) * FP8_BLOCK[0], j * FP8_BLOCK[1] : (j + 1) * FP8_BLOCK[1]]
                amax = blk.abs().max()
                if amax > 0:
                    scale[i, j] = amax / FP8_MAX
        full = scale.repeat_interleave(FP8_BLOCK[0], 0)[:rows].repeat_interleave(FP8_BLOCK[1], 1)[:, :cols]
        q = (w / full).to(torch.float8_e4m3fn)
        return {name: q, name.removesuffix("weight") + "weight_scale_inv": scale}

    quantization_config = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": FP8_BLOCK,
    }
    if modules_to_not_convert is not None:
        quantization_config["modules_to_not_convert"] = modules_to_not_convert
    _rewrite(out_dir, transform, quantization_config)


def fp8_dequantized(ckpt: Path) -> Path:
    """A float32 copy of an FP8 checkpoint (same tensor names, no quantization_config), in a
    directory beside it, made once."""
    from safetensors.torch import load_file, save_file

    import tempfile

    out = Path(tempfile.gettempdir()) / "switchyard-fixtures" / f"{ckpt.name}-dequantized-{os.getpid()}"
    out.parent.mkdir(exist_ok=True)
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    if (out / "stamp").exists() and (out / "stamp").read_text() == str(stamp):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(ckpt / "model.safetensors")
    state = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = tensors.get(name.removesuffix("weight") + "weight_scale_inv")
        state[name] = fp8_dequantize(t, scale, block) if scale is not None else t.float()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "stamp").write_text(str(stamp))
    return out


# ------------------------------------------------------------------ decoding


def load_model(ckpt: Path):
    """The checkpoint in float32 as transformers runs it. MXFP4 experts are dequantized by
    transformers itself (Mxfp4Config(dequantize=True)). FP8 is dequantized here, block by
    block as `weight_block_size` defines it, and loaded into the same transformers model:
    transformers' own CPU dequantizer derives the block from the scale grid
    (`rows // scale_rows`) and so cannot read partial edge blocks."""
    cfg = json.loads((ckpt / "config.json").read_text())
    method = cfg.get("quantization_config", {}).get("quant_method")
    if method == "mxfp4":
        from transformers import Mxfp4Config

        model = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
        )
    elif method == "fp8":
        check_fp8_semantics()
        model = AutoModelForCausalLM.from_pretrained(fp8_dequantized(ckpt), dtype=torch.float32, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def record_case(ckpt: Path, tokenizer, raw_tok: Tokenizer, prompt: str) -> tuple[dict, dict]:
    # A fresh model per case: dynamic-NTK RoPE keeps state between calls, and
    # every case should be an independent request.
    model = load_model(ckpt)
    enc = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    raw_ids = raw_tok.encode(prompt, add_special_tokens=True).ids
    assert prompt_ids == raw_ids, (prompt_ids, raw_ids)
    assert prompt_ids[0] == BOS_ID

    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logits = torch.stack([l[0] for l in out.logits]).float()
    assert logits.shape[0] == len(tokens), (logits.shape, len(tokens))
    logprobs = torch.log_softmax(logits, -1)
    top_v, top_i = logprobs.topk(TOP_LOGPROBS, dim=-1)
    assert top_i[:, 0].tolist() == tokens, "generated tokens are not the raw-logit argmax"
    margins = (top_v[:, 0] - top_v[:, 1]).tolist()

    case = {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "tokens": tokens,
        "logprobs": [logprobs[i, t].item() for i, t in enumerate(tokens)],
        "top_logprobs": [
            [[int(i), float(v)] for i, v in zip(top_i[s].tolist(), top_v[s].tolist())] for s in range(len(tokens))
        ],
        "finish_reason": "stop" if tokens and tokens[-1] == EOS_ID else "length",
    }

    # Prefill-consistency sanity check: one full forward over prompt + generated.
    model = load_model(ckpt)
    full = torch.tensor([prompt_ids + tokens])
    full_lp = torch.log_softmax(model(full).logits[0].float(), -1)
    n = len(prompt_ids)
    full_lp = full_lp[n - 1 : n - 1 + len(tokens)]
    info = {
        "min_margin": min(margins),
        "prefill_argmax_match": full_lp.argmax(-1).tolist() == tokens,
        "prefill_max_abs_diff": (full_lp - logprobs).abs().max().item(),
        "text": tokenizer.decode(tokens),
    }
    dyn = model.config.rope_parameters.get("rope_type") == "dynamic"
    if dyn:
        # Dynamic NTK: HF's cached decoding rotates each new token with the
        # frequencies for seq_len = its position + 1 while older cached keys keep
        # theirs, so a full forward (one scaling for all positions) legitimately
        # differs once positions reach max_position_embeddings. Check the part
        # before that: a fresh full forward over the first max_pos tokens.
        max_pos = model.config.max_position_embeddings
        model = load_model(ckpt)
        head = (prompt_ids + tokens)[:max_pos]
        head_lp = torch.log_softmax(model(torch.tensor([head])).logits[0].float(), -1)[n - 1 :]
        k = min(len(head_lp), len(tokens))
        info["unscaled_steps"] = k
        info["unscaled_argmax_match"] = head_lp[:k].argmax(-1).tolist() == tokens[:k]
        info["unscaled_max_abs_diff"] = (head_lp[:k] - logprobs[:k]).abs().max().item()
    return case, info


@torch.no_grad()
def clip_fractions(ckpt: Path, tokenizer, prompts: list[str], clip: float) -> dict[str, float]:
    """Fraction of OLMoE q/k/v activations beyond +-clip_qkv (checked before the clamp)."""
    model = load_model(ckpt)
    counts = {"q": [0, 0], "k": [0, 0], "v": [0, 0]}
    hooks = []
    for layer in model.model.layers:
        attn = layer.self_attn
        for key, mod in (("q", attn.q_norm), ("k", attn.k_norm), ("v", attn.v_proj)):
            def hook(_m, _i, o, key=key):
                counts[key][0] += int((o.abs() > clip).sum())
                counts[key][1] += o.numel()
            hooks.append(mod.register_forward_hook(hook))
    for p in prompts:
        model(**tokenizer(p, return_tensors="pt"))
    for h in hooks:
        h.remove()
    return {k: c / t for k, (c, t) in counts.items()}


@torch.no_grad()
def swiglu_clamp_fraction(ckpt: Path, tokenizer, prompts: list[str]) -> float:
    """Fraction of gpt_oss expert gate/up pre-activations beyond the swiglu clamp."""
    model = load_model(ckpt)
    stats = [0, 0]
    experts_cls = type(model.model.layers[0].mlp.experts)
    orig = experts_cls._apply_gate

    def patched(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        stats[0] += int((gate > self.limit).sum() + (up.abs() > self.limit).sum())
        stats[1] += gate_up.numel()
        return orig(self, gate_up)

    experts_cls._apply_gate = patched
    try:
        for p in prompts:
            model(**tokenizer(p, return_tensors="pt"))
    finally:
        experts_cls._apply_gate = orig
    return stats[0] / max(stats[1], 1)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def noaux_tc_choice(scores: torch.Tensor, bias: torch.Tensor, groups: int, topk_group: int, top_k: int, limit=True):
    """DeepSeek-V3's expert choice (transformers' DeepseekV3TopkRouter): the groups whose two
    best biased scores sum highest, then the top-k biased scores within them (`limit=False`:
    over all experts)."""
    s = scores + bias
    t, e = s.shape
    if limit:
        group_scores = s.view(t, groups, e // groups).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1).bool()
        s = s.masked_fill(~keep[:, :, None].expand(t, groups, e // groups).reshape(t, e), float("-inf"))
    return s.topk(top_k, dim=-1)[1].sort(-1).values


@torch.no_grad()
def deepseek_checks(ckpt: Path, cases: list[dict]) -> None:
    """What the reloaded DeepSeek-V3 checkpoint really runs: YaRN with mscale / mscale_all_dim,
    interleaved RoPE, the MTP tensors left out, and routing that the random
    `e_score_correction_bias` changes (choices with the bias against without it)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    load_dir = fp8_dequantized(ckpt) if "quantization_config" in cfg else ckpt
    model, info = AutoModelForCausalLM.from_pretrained(
        load_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    c = model.config
    n = c.num_hidden_layers
    unexpected = sorted(info["unexpected_keys"])
    assert unexpected and all(k.startswith(f"model.layers.{n}.") for k in unexpected), unexpected
    assert not info["missing_keys"], info["missing_keys"]
    print(f"  MTP: transformers ignored {len(unexpected)} model.layers.{n}.* tensors (its unexpected keys)")

    rope = c.rope_parameters
    factor = rope["factor"]
    attn_factor = yarn_mscale(factor, rope["mscale"]) / yarn_mscale(factor, rope["mscale_all_dim"])
    softmax_scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5 * yarn_mscale(factor, rope["mscale_all_dim"]) ** 2
    rot = model.model.rotary_emb
    scalings = {layer.self_attn.scaling for layer in model.model.layers}
    print(
        f"  rope: type={rot.rope_type} theta={rope['rope_theta']} factor={factor} "
        f"original_max_pos={rope['original_max_position_embeddings']} interleave={c.rope_interleave} "
        f"inv_freq={[round(f, 6) for f in rot.inv_freq.tolist()]}"
    )
    print(
        f"  rotary_emb.attention_scaling={rot.attention_scaling!r} (mscale(factor, mscale) / mscale(factor, "
        f"mscale_all_dim) = {attn_factor!r}); self_attn.scaling={sorted(scalings)} (qk_head_dim^-0.5 * "
        f"mscale(factor, mscale_all_dim)^2 = {softmax_scale!r}; without YaRN {(c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5!r})"
    )
    assert rot.rope_type == "yarn" and c.rope_interleave is True
    assert math.isclose(rot.attention_scaling, attn_factor, rel_tol=1e-12), rot.attention_scaling
    assert len(scalings) == 1 and math.isclose(scalings.pop(), softmax_scale, rel_tol=1e-12)

    gates = [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    stats = {"tokens": 0, "bias_changed": 0, "group_limited": 0, "group_gap": math.inf, "expert_gap": math.inf}

    def hook(gate, args, out):
        hs = args[0].reshape(-1, gate.hidden_dim).float()
        scores = torch.nn.functional.linear(hs, gate.weight.float()).sigmoid()
        k, g, tg = gate.top_k, gate.num_group, gate.topk_group
        biased = noaux_tc_choice(scores, gate.e_score_correction_bias, g, tg, k)
        assert torch.equal(biased, out[2].sort(-1).values), "routing replica differs from transformers'"
        unbiased = noaux_tc_choice(scores, torch.zeros_like(gate.e_score_correction_bias), g, tg, k)
        plain = noaux_tc_choice(scores, gate.e_score_correction_bias, g, tg, k, limit=False)
        stats["tokens"] += scores.shape[0]
        stats["bias_changed"] += int((biased != unbiased).any(-1).sum())
        stats["group_limited"] += int((biased != plain).any(-1).sum())
        # How close the choices are to ties (the last group / expert in against the first out).
        s = scores + gate.e_score_correction_bias
        t, e = s.shape
        gs = s.view(t, g, e // g).topk(2, dim=-1)[0].sum(-1).sort(-1, descending=True).values
        stats["group_gap"] = min(stats["group_gap"], (gs[:, tg - 1] - gs[:, tg]).min().item())
        keep = torch.zeros(t, e, dtype=torch.bool).scatter_(1, biased, True)
        inside = s.view(t, g, e // g).topk(2, dim=-1)[0].sum(-1) >= gs[:, tg - 1 : tg]
        eligible = s.masked_fill(~inside[:, :, None].expand(t, g, e // g).reshape(t, e), float("-inf"))
        chosen_min = s.masked_fill(~keep, float("inf")).min(-1).values
        best_out = eligible.masked_fill(keep, float("-inf")).max(-1).values
        stats["expert_gap"] = min(stats["expert_gap"], (chosen_min - best_out).min().item())

    hooks = [gate.register_forward_hook(hook) for _, gate in gates]
    for case in cases:
        model(torch.tensor([case["prompt_ids"] + case["tokens"]]))
    for h in hooks:
        h.remove()
    print(
        f"  routing over {stats['tokens']} token x MoE-layer choices (layers {[i for i, _ in gates]}): "
        f"e_score_correction_bias changes {stats['bias_changed']}, group limit changes {stats['group_limited']}; "
        f"bias std {SCORE_BIAS_STD}, max |bias| "
        f"{max(g.e_score_correction_bias.abs().max().item() for _, g in gates):.3f}; "
        f"smallest gap: group choice {stats['group_gap']:.2e}, expert choice {stats['expert_gap']:.2e}"
    )
    assert stats["bias_changed"] > 0 and stats["group_limited"] > 0, stats


def build_arch(arch: str, seed: int, tokenizer, out_root: Path) -> dict:
    ckpt = out_root / arch
    prompts = SHORT_PROMPTS if arch == "qwen2_moe" else PROMPTS
    for redraw in range(MAX_REDRAWS):
        sub_seed = seed * SEED_STRIDE + ARCH_OFFSET[arch] * REDRAW_STRIDE + redraw
        torch.manual_seed(sub_seed)
        gen = torch.Generator().manual_seed(sub_seed)
        config = make_config(arch)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, arch, gen)
        mtp = None
        if arch in DEEPSEEK:
            mtp = make_mtp_layer(config, arch, gen)
            # What the saved checkpoint holds (bf16 weights, float32 routing bias), to check
            # that the reload, with its 4.x config.json, computes the same logits.
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
                probe = torch.tensor([list(range(3, 3 + 40))])
                before = torch.log_softmax(model(probe).logits[0].float(), -1)
        save_checkpoint(model, tokenizer, ckpt, arch, mtp)
        del model
        if arch in DEEPSEEK:
            with torch.no_grad():
                after = torch.log_softmax(load_model(ckpt)(probe).logits[0].float(), -1)
            reload_diff = (after - before).abs().max().item()
            # bf16: the very same weights (fp8: their FP8 quantization error, printed only).
            assert arch != "deepseek_v3" or reload_diff < 1e-4, reload_diff

        saved_tok = AutoTokenizer.from_pretrained(ckpt)
        raw_tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        cases, infos, ok = [], [], True
        for prompt in prompts:
            case, info = record_case(ckpt, saved_tok, raw_tok, prompt)
            cases.append(case)
            infos.append(info)
            if info["min_margin"] < MIN_MARGIN:
                ok = False
            if arch == "qwen2_moe":
                n = len(case["prompt_ids"])
                assert n < QWEN2_DYNAMIC_MAX_POS, f"qwen2_moe prompt too long ({n} tokens): {prompt!r}"
                # The last token fed to the model sits at position n + len(tokens) - 2;
                # dynamic NTK rescales once some position >= max_position_embeddings.
                if n + len(case["tokens"]) - 2 < QWEN2_DYNAMIC_MAX_POS:
                    ok = False
            if not ok:
                break
        if ok:
            break
    else:
        raise RuntimeError(f"{arch}: no draw with margin >= {MIN_MARGIN} in {MAX_REDRAWS} tries")

    cfg = json.loads((ckpt / "config.json").read_text())
    expected = {
        "model_type": cfg["model_type"],
        "transformers_version": transformers.__version__,
        "seed": seed,
        "cases": cases,
    }
    (ckpt / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    print(f"[{arch}] seed={seed} redraws={redraw} sub_seed={sub_seed}")
    if arch in DEEPSEEK:
        print(f"  saved -> reloaded max |log-prob diff| over 40 positions (in-memory bf16 model vs checkpoint): {reload_diff:.2e}")
    for case, info in zip(cases, infos):
        print(
            f"  prompt_len={len(case['prompt_ids']):2d} gen={len(case['tokens']):2d} "
            f"finish={case['finish_reason']:6s} min_margin={info['min_margin']:.4f} "
            f"prefill_argmax_match={info['prefill_argmax_match']} "
            f"prefill_max_abs_diff={info['prefill_max_abs_diff']:.2e} text={info['text']!r}"
        )
        if "unscaled_steps" in info:
            print(
                f"    dynamic NTK: first {info['unscaled_steps']} steps (positions < max_pos) vs unscaled full forward: "
                f"argmax_match={info['unscaled_argmax_match']} max_abs_diff={info['unscaled_max_abs_diff']:.2e}"
            )
            assert info["unscaled_argmax_match"] and info["unscaled_max_abs_diff"] < 1e-3, info
        if not info["prefill_argmax_match"] and arch != "qwen2_moe":
            # qwen2_moe's dynamic NTK makes cached decoding differ from a full
            # forward by design; every other arch must agree.
            raise RuntimeError(f"{arch}: full-forward argmax differs from cached greedy decoding")
    if arch == "olmoe":
        fr = clip_fractions(ckpt, saved_tok, prompts, cfg["clip_qkv"])
        print(f"  clip_qkv={cfg['clip_qkv']} clipped fractions: " + ", ".join(f"{k}={v:.3f}" for k, v in fr.items()))
        assert all(0.0 < v < 1.0 for v in fr.values()), fr
    if arch in DEEPSEEK:
        deepseek_checks(ckpt, cases)
    if arch == "deepseek_v2":
        deepseek_v2_checks(ckpt, cases)
    if arch.startswith("gpt_oss"):
        frac = swiglu_clamp_fraction(ckpt, saved_tok, prompts)
        print(f"  swiglu_limit={cfg['swiglu_limit']} clamped gate/up fraction: {frac:.3f}")
        assert 0.0 < frac < 0.5, frac
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"  files: {sorted(f.name for f in ckpt.iterdir())} ({size / 1024:.0f} KiB)")
    return {"arch": arch, "redraws": redraw, "bytes": size}


@torch.no_grad()
def deepseek_v2_checks(ckpt: Path, cases: list[dict]) -> None:
    """DeepSeek-V2's `group_limited_greedy` really limits the choice: over the fixture's tokens,
    the experts picked among the `topk_group` groups with the best single score differ from
    the plain top-k of the softmax scores for some tokens."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    stats = {"tokens": 0, "group_limited": 0}

    def hook(gate, args, out):
        hs = args[0].reshape(-1, gate.hidden_dim).float()
        scores = torch.nn.functional.linear(hs, gate.weight.float()).softmax(-1)
        plain = scores.topk(gate.top_k, dim=-1)[1].sort(-1).values
        stats["tokens"] += scores.shape[0]
        stats["group_limited"] += int((out[2].sort(-1).values != plain).any(-1).sum())

    hooks = [gate.register_forward_hook(hook) for gate in gates]
    for case in cases:
        model(torch.tensor([case["prompt_ids"] + case["tokens"]]))
    for h in hooks:
        h.remove()
    print(f"  routing: the group limit changes {stats['group_limited']} of {stats['tokens']} token x layer choices")
    assert stats["group_limited"] > 0, stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "tests" / "fixtures", help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (other seeds give held-out fixtures)")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="arch to build (repeatable; default all)")
    args = ap.parse_args()
    if args.seed < 0:
        ap.error("--seed must be >= 0")

    torch.set_num_threads(1)  # bit-reproducible float32 results
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    archs = args.arch or ARCHS
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    results = [build_arch(arch, args.seed, tokenizer, args.out) for arch in archs]
    total = sum(r["bytes"] for r in results)
    print("summary: " + ", ".join(f"{r['arch']}: {r['redraws']} re-draws" for r in results))
    print(f"total size: {total / 1024:.0f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
