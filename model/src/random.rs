//! Random checkpoints of a chosen shape and storage format, written in Hugging Face layout
//! (config.json + safetensors shards + index), for benchmarks and tests that need realistic
//! sizes without a download. Shards are written one layer at a time, so a checkpoint larger
//! than memory can be written.

use std::collections::BTreeMap;
use std::path::Path;

use switchyard_kernels::DType;
use switchyard_kernels::quant::{MXFP4_BLOCK, MXFP4_BLOCK_BYTES, blocks_along};

use crate::checkpoint::{Tensor, write_safetensors};
use crate::error::{ModelError, Result};
use crate::sampling::Rng;

/// Which architecture's tensor names and config a random checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomLayout {
    /// Mixtral: per-expert `w1`/`w3`/`w2`, no biases.
    Mixtral,
    /// gpt-oss: fused, interleaved gate/up experts with biases, a router with a bias, attention
    /// biases and sinks, alternating sliding and full attention, YaRN RoPE.
    GptOss,
    /// DeepSeek-V3: multi-head latent attention with V3's own widths ([`V3_MLA`]; the heads
    /// and `head_dim` of the shape do not apply), the first layer dense, group-limited routing
    /// over 4 groups (2 kept) with a correction bias, one shared expert, YaRN RoPE.
    DeepseekV3,
}

/// DeepSeek-V3's MLA widths: `q_lora_rank`, `kv_lora_rank`, `qk_nope_head_dim`,
/// `qk_rope_head_dim`, `v_head_dim`.
pub const V3_MLA: [usize; 5] = [1536, 512, 128, 64, 128];

/// How a random checkpoint stores its linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomFormat {
    Bf16,
    /// FP8 e4m3 with 128 × 128 scale blocks on attention and expert projections (the gate,
    /// embeddings and head stay bf16), as DeepSeek-V3 ships.
    Fp8,
    /// MXFP4 experts, everything else bf16, as gpt-oss ships (gpt-oss layout only).
    Mxfp4,
}

/// FP8 scale blocks of random checkpoints.
pub const FP8_BLOCK: [usize; 2] = [128, 128];

/// The shape of a random checkpoint.
#[derive(Clone, Debug)]
pub struct RandomShape {
    pub layout: RandomLayout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    pub max_position_embeddings: usize,
}

impl RandomShape {
    /// The benchmark shape: hidden 1024, 8 layers, 32 experts top-4, expert width 512.
    pub fn bench() -> Self {
        RandomShape {
            layout: RandomLayout::Mixtral,
            vocab_size: 32000,
            hidden_size: 1024,
            num_layers: 8,
            num_heads: 16,
            num_kv_heads: 4,
            head_dim: 64,
            num_experts: 32,
            experts_per_token: 4,
            expert_intermediate_size: 512,
            max_position_embeddings: 4096,
        }
    }

    /// gpt-oss-20b's shapes in the Mixtral layout: 24 layers, hidden 2880, 32 experts top-4
    /// of width 2880, 64 query and 8 KV heads of 64, vocabulary 201088; 41.8 GB in bf16.
    pub fn gpt_oss_20b() -> Self {
        RandomShape {
            layout: RandomLayout::Mixtral,
            vocab_size: 201_088,
            hidden_size: 2880,
            num_layers: 24,
            num_heads: 64,
            num_kv_heads: 8,
            head_dim: 64,
            num_experts: 32,
            experts_per_token: 4,
            expert_intermediate_size: 2880,
            max_position_embeddings: 131_072,
        }
    }

    /// gpt-oss-20b exactly: its shapes in its own layout (with MXFP4 experts, 13.8 GB).
    pub fn gpt_oss_20b_native() -> Self {
        RandomShape { layout: RandomLayout::GptOss, ..Self::gpt_oss_20b() }
    }

    /// DeepSeek-V3 scaled to fit a small machine: its attention widths (latent 512 + rope 64,
    /// heads of 128 + 64 and 128) over 16 heads instead of 128, hidden 2048, 3 layers (the
    /// first dense), 16 experts top-4 of width 512; 0.5 GB in bf16.
    pub fn deepseek_v3_small() -> Self {
        RandomShape {
            layout: RandomLayout::DeepseekV3,
            vocab_size: 32000,
            hidden_size: 2048,
            num_layers: 3,
            num_heads: 16,
            num_kv_heads: 16,
            head_dim: V3_MLA[3],
            num_experts: 16,
            experts_per_token: 4,
            expert_intermediate_size: 512,
            max_position_embeddings: 16384,
        }
    }

    pub fn config_json(&self, format: RandomFormat) -> serde_json::Value {
        // gpt-oss's special tokens, or the last ids of a smaller vocabulary.
        let special = |id: usize| id.min(self.vocab_size.saturating_sub(200_003 - id));
        let mut c = match self.layout {
            RandomLayout::Mixtral => serde_json::json!({
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                "rms_norm_eps": 1e-5,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }),
            RandomLayout::GptOss => serde_json::json!({
                "architectures": ["GptOssForCausalLM"],
                "model_type": "gpt_oss",
                "layer_types": (0..self.num_layers)
                    .map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" })
                    .collect::<Vec<_>>(),
                "sliding_window": 128,
                "attention_bias": true,
                "swiglu_limit": 7.0,
                "experts_per_token": self.experts_per_token,
                "rope_theta": 150000.0,
                "rope_scaling": {
                    "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                    "truncate": false, "original_max_position_embeddings": 4096
                },
                "rms_norm_eps": 1e-5,
                "bos_token_id": special(199_998),
                "eos_token_id": special(200_002),
                "pad_token_id": special(199_999),
            }),
            RandomLayout::DeepseekV3 => {
                let [q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim] = V3_MLA;
                serde_json::json!({
                    "architectures": ["DeepseekV3ForCausalLM"],
                    "model_type": "deepseek_v3",
                    "q_lora_rank": q_lora_rank,
                    "kv_lora_rank": kv_lora_rank,
                    "qk_nope_head_dim": qk_nope_head_dim,
                    "qk_rope_head_dim": qk_rope_head_dim,
                    "v_head_dim": v_head_dim,
                    "n_routed_experts": self.num_experts,
                    "moe_intermediate_size": self.expert_intermediate_size,
                    "n_shared_experts": 1,
                    "first_k_dense_replace": 1,
                    "topk_method": "noaux_tc",
                    "scoring_func": "sigmoid",
                    // Groups of at least 2 experts (a sigmoid router scores a group by its
                    // best two): 4 groups, half of them kept, where there are 16 experts or more.
                    "n_group": (self.num_experts / 4).clamp(1, 4),
                    "topk_group": ((self.num_experts / 4).clamp(1, 4) / 2).max(1),
                    "routed_scaling_factor": 2.5,
                    "rope_theta": 10000.0,
                    "rope_scaling": {
                        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0
                    },
                    "rms_norm_eps": 1e-6,
                    "bos_token_id": 0,
                    "eos_token_id": 1,
                })
            }
        };
        let fields = serde_json::json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.dense_intermediate_size(),
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": false,
        });
        let map = c.as_object_mut().expect("an object");
        map.extend(fields.as_object().expect("an object").clone());
        match format {
            RandomFormat::Bf16 => {}
            RandomFormat::Fp8 => {
                map.insert(
                    "quantization_config".into(),
                    serde_json::json!({
                        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                        "weight_block_size": FP8_BLOCK
                    }),
                );
            }
            RandomFormat::Mxfp4 => {
                map.insert(
                    "quantization_config".into(),
                    serde_json::json!({
                        "quant_method": "mxfp4",
                        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
                    }),
                );
            }
        }
        c
    }

    /// Width of the dense layers' MLP (DeepSeek's leading layers): four experts' worth.
    fn dense_intermediate_size(&self) -> usize {
        match self.layout {
            RandomLayout::DeepseekV3 => 4 * self.expert_intermediate_size,
            _ => self.expert_intermediate_size,
        }
    }
}

/// Random tensors, scaled like an initialised model (values about `1.7 / sqrt(in)`).
struct Draw {
    rng: Rng,
}

impl Draw {
    fn bf16(&mut self, name: &str, shape: Vec<usize>, fan_in: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let scale = 1.7 / (fan_in as f64).sqrt();
        let mut bytes = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let v = (self.rng.next_f64() * 2.0 - 1.0) * scale;
            bytes.extend(half::bf16::from_f64(v).to_le_bytes());
        }
        Tensor::from_bytes(name, DType::BF16, shape, &bytes)
    }

    fn ones(&mut self, name: &str, n: usize) -> Tensor {
        Tensor::from_f32(name, DType::BF16, vec![n], &vec![1.0; n])
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend(self.rng.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// An FP8 `[rows, cols]` weight and its 128 × 128 block scales: e4m3 values of magnitude
    /// 1/32 to 8 with random signs, scaled so the decoded values are as large as `bf16`'s.
    fn fp8(&mut self, name: &str, rows: usize, cols: usize) -> [Tensor; 2] {
        let values: Vec<u8> =
            self.bytes(rows * cols).iter().map(|&b| (b & 0x80) | (((b >> 3) % 8 + 2) << 3) | (b & 7)).collect();
        let scale = (1.7 / (cols as f32).sqrt()) / 2.0;
        let (br, bc) = (blocks_along(rows, FP8_BLOCK[0]), blocks_along(cols, FP8_BLOCK[1]));
        let stem = name.strip_suffix("weight").expect("a weight");
        [
            Tensor::from_bytes(name, DType::F8E4M3, vec![rows, cols], &values),
            Tensor::from_f32(&format!("{stem}weight_scale_inv"), DType::F32, vec![br, bc], &vec![scale; br * bc]),
        ]
    }

    /// MXFP4 `[experts, rows, cols]` as gpt-oss stores it: `{stem}_blocks`, `{stem}_scales`
    /// (random nibbles, scales bringing them to `bf16`'s size) and a bf16 `{stem}_bias`.
    fn mxfp4(&mut self, stem: &str, experts: usize, rows: usize, cols: usize) -> [Tensor; 3] {
        let nb = cols / MXFP4_BLOCK;
        // Random E2M1 values average 2.6 in magnitude.
        let target = 1.7 / (cols as f64).sqrt() / 2.6;
        let s = (127.0 + target.log2().round()) as u8;
        let blocks = self.bytes(experts * rows * nb * MXFP4_BLOCK_BYTES);
        [
            Tensor::from_bytes(
                &format!("{stem}_blocks"),
                DType::U8,
                vec![experts, rows, nb, MXFP4_BLOCK_BYTES],
                &blocks,
            ),
            Tensor::from_bytes(
                &format!("{stem}_scales"),
                DType::U8,
                vec![experts, rows, nb],
                &vec![s; experts * rows * nb],
            ),
            self.bf16(&format!("{stem}_bias"), vec![experts, rows], 100),
        ]
    }
}

/// Writes a random checkpoint of `shape` stored as `format` into `dir` (created if needed),
/// one shard a layer plus one for the embeddings and head, reporting
/// `progress(layers_done, layers_total)`.
pub fn write_random_checkpoint(
    dir: &Path,
    shape: &RandomShape,
    format: RandomFormat,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if (format == RandomFormat::Mxfp4) != (shape.layout == RandomLayout::GptOss) {
        return Err(ModelError::InvalidRequest(
            "random checkpoints come in MXFP4 in the gpt-oss layout, and only there".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let mut draw = Draw { rng: Rng::new(seed) };
    let s = shape;
    let (h, hd, e, i) = (s.hidden_size, s.head_dim, s.num_experts, s.expert_intermediate_size);
    let shards = s.num_layers + 1;
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    let mut write = |k: usize, tensors: Vec<Tensor>| -> Result<()> {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        for t in &tensors {
            weight_map.insert(t.name().to_string(), file.clone());
            total += t.size_in_bytes();
        }
        write_safetensors(&dir.join(&file), &tensors)
    };
    // A linear layer: bf16 (with a bias where asked), or FP8 with its scales.
    let linear = |draw: &mut Draw, name: &str, rows: usize, cols: usize, bias: bool| -> Vec<Tensor> {
        let mut out = match format {
            RandomFormat::Fp8 => draw.fp8(&format!("{name}.weight"), rows, cols).into(),
            _ => vec![draw.bf16(&format!("{name}.weight"), vec![rows, cols], cols)],
        };
        if bias {
            out.push(draw.bf16(&format!("{name}.bias"), vec![rows], 100));
        }
        out
    };
    let gpt_oss = s.layout == RandomLayout::GptOss;
    for l in 0..s.num_layers {
        let p = format!("model.layers.{l}");
        let mut t = vec![draw.ones(&format!("{p}.input_layernorm.weight"), h)];
        t.push(draw.ones(&format!("{p}.post_attention_layernorm.weight"), h));
        if s.layout == RandomLayout::DeepseekV3 {
            let [q_rank, r, dn, dr, dv] = V3_MLA;
            let (heads, a) = (s.num_heads, format!("{p}.self_attn"));
            t.extend(linear(&mut draw, &format!("{a}.q_a_proj"), q_rank, h, false));
            t.push(draw.ones(&format!("{a}.q_a_layernorm.weight"), q_rank));
            t.extend(linear(&mut draw, &format!("{a}.q_b_proj"), heads * (dn + dr), q_rank, false));
            t.extend(linear(&mut draw, &format!("{a}.kv_a_proj_with_mqa"), r + dr, h, false));
            t.push(draw.ones(&format!("{a}.kv_a_layernorm.weight"), r));
            t.extend(linear(&mut draw, &format!("{a}.kv_b_proj"), heads * (dn + dv), r, false));
            t.extend(linear(&mut draw, &format!("{a}.o_proj"), h, heads * dv, false));
            let mlp = |draw: &mut Draw, p: &str, width: usize| -> Vec<Tensor> {
                let mut t = linear(draw, &format!("{p}.gate_proj"), width, h, false);
                t.extend(linear(draw, &format!("{p}.up_proj"), width, h, false));
                t.extend(linear(draw, &format!("{p}.down_proj"), h, width, false));
                t
            };
            if l == 0 {
                t.extend(mlp(&mut draw, &format!("{p}.mlp"), s.dense_intermediate_size()));
            } else {
                t.push(draw.bf16(&format!("{p}.mlp.gate.weight"), vec![e, h], h));
                let bias: Vec<f32> = (0..e).map(|_| (draw.rng.next_f64() as f32 - 0.5) * 0.02).collect();
                t.push(Tensor::from_f32(&format!("{p}.mlp.gate.e_score_correction_bias"), DType::F32, vec![e], &bias));
                for x in 0..e {
                    t.extend(mlp(&mut draw, &format!("{p}.mlp.experts.{x}"), i));
                }
                t.extend(mlp(&mut draw, &format!("{p}.mlp.shared_experts"), i));
            }
            write(l, t)?;
            progress(l + 1, s.num_layers);
            continue;
        }
        let (q, kv) = (s.num_heads * hd, s.num_kv_heads * hd);
        t.extend(linear(&mut draw, &format!("{p}.self_attn.q_proj"), q, h, gpt_oss));
        t.extend(linear(&mut draw, &format!("{p}.self_attn.k_proj"), kv, h, gpt_oss));
        t.extend(linear(&mut draw, &format!("{p}.self_attn.v_proj"), kv, h, gpt_oss));
        t.extend(linear(&mut draw, &format!("{p}.self_attn.o_proj"), h, q, gpt_oss));
        if gpt_oss {
            t.push(draw.bf16(&format!("{p}.self_attn.sinks"), vec![s.num_heads], 1));
            t.push(draw.bf16(&format!("{p}.mlp.router.weight"), vec![e, h], h));
            t.push(draw.bf16(&format!("{p}.mlp.router.bias"), vec![e], 100));
            t.extend(draw.mxfp4(&format!("{p}.mlp.experts.gate_up_proj"), e, 2 * i, h));
            t.extend(draw.mxfp4(&format!("{p}.mlp.experts.down_proj"), e, h, i));
        } else {
            t.push(draw.bf16(&format!("{p}.block_sparse_moe.gate.weight"), vec![e, h], h));
            for x in 0..e {
                let ep = format!("{p}.block_sparse_moe.experts.{x}");
                t.extend(linear(&mut draw, &format!("{ep}.w1"), i, h, false));
                t.extend(linear(&mut draw, &format!("{ep}.w3"), i, h, false));
                t.extend(linear(&mut draw, &format!("{ep}.w2"), h, i, false));
            }
        }
        write(l, t)?;
        progress(l + 1, s.num_layers);
    }
    let last = vec![
        draw.bf16("model.embed_tokens.weight", vec![s.vocab_size, h], h),
        draw.ones("model.norm.weight", h),
        draw.bf16("lm_head.weight", vec![s.vocab_size, h], h),
    ];
    write(s.num_layers, last)?;
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let write_json = |name: &str, v: &serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v).expect("json"))
            .map_err(|source| ModelError::Io { path, source })
    };
    write_json("model.safetensors.index.json", &index)?;
    let config = shape.config_json(format);
    write_json("config.json", &config)?;
    write_random_tokenizer(dir, &config)
}

/// Writes a byte-level BPE `tokenizer.json` for the random checkpoint whose `config.json` is
/// `config`: the 256 bytes, then every pair and triple of printable ASCII characters (space
/// included) until the vocabulary is full, and the config's BOS and EOS as special tokens.
/// Text prompts, structured output and converters that need a tokenizer then work on it.
pub fn write_random_tokenizer(dir: &Path, config: &serde_json::Value) -> Result<()> {
    let vocab_size = config["vocab_size"].as_u64().unwrap_or(0) as usize;
    let special: Vec<(usize, &str)> = [("bos_token_id", "<|bos|>"), ("eos_token_id", "<|eos|>")]
        .iter()
        .filter_map(|(key, name)| Some((config[*key].as_u64()? as usize, *name)))
        .filter(|(id, _)| *id < vocab_size)
        .collect();
    // GPT-2's map from bytes to printable characters.
    let mut byte_char = Vec::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        byte_char.push(if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below the surrogates")
        });
    }
    let letters: Vec<String> = (b' '..=b'~').map(|b| byte_char[b as usize].to_string()).collect();
    let mut vocab = serde_json::Map::new();
    let mut merges = Vec::new();
    let mut id = 0usize;
    let mut add = |token: String, merge: Option<(String, String)>| -> bool {
        while special.iter().any(|(s, _)| *s == id) {
            id += 1;
        }
        if id >= vocab_size {
            return false;
        }
        vocab.insert(token, serde_json::json!(id));
        if let Some((a, b)) = merge {
            merges.push(serde_json::json!([a, b]));
        }
        id += 1;
        true
    };
    let full = 'fill: {
        for c in &byte_char {
            if !add(c.to_string(), None) {
                break 'fill true;
            }
        }
        for a in &letters {
            for b in &letters {
                if !add(format!("{a}{b}"), Some((a.clone(), b.clone()))) {
                    break 'fill true;
                }
            }
        }
        for a in &letters {
            for b in &letters {
                for c in &letters {
                    if !add(format!("{a}{b}{c}"), Some((format!("{a}{b}"), c.clone()))) {
                        break 'fill true;
                    }
                }
            }
        }
        false
    };
    if !full {
        return Err(ModelError::InvalidRequest(format!(
            "a random tokenizer holds at most ~860k tokens, not {vocab_size}"
        )));
    }
    let added: Vec<serde_json::Value> = special
        .iter()
        .map(|(id, name)| {
            serde_json::json!({"id": id, "content": name, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).map_err(|source| ModelError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokenizers_round_trip_text_and_fill_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"vocab_size": 20_000, "bos_token_id": 0, "eos_token_id": 19_999});
        write_random_tokenizer(dir.path(), &config).unwrap();
        let tk = crate::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tk.vocab_size(), 20_000);
        let text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # ünï";
        let ids = tk.encode_raw(text).unwrap();
        assert!(ids.len() < text.len() * 2 / 3, "pairs merge: {} ids", ids.len());
        assert!(ids.iter().all(|&i| i < 20_000 && i != 0 && i != 19_999));
        assert_eq!(tk.decode(&ids).unwrap(), text);
        assert_eq!(tk.token_id("<|eos|>"), Some(19_999));
    }

    #[test]
    fn random_checkpoints_load_in_every_format() {
        let small = |layout| RandomShape {
            layout,
            vocab_size: 64,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            num_experts: 4,
            experts_per_token: 2,
            expert_intermediate_size: 96,
            max_position_embeddings: 256,
        };
        for (layout, format) in [
            (RandomLayout::Mixtral, RandomFormat::Bf16),
            (RandomLayout::Mixtral, RandomFormat::Fp8),
            (RandomLayout::GptOss, RandomFormat::Mxfp4),
            (RandomLayout::DeepseekV3, RandomFormat::Bf16),
            (RandomLayout::DeepseekV3, RandomFormat::Fp8),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_random_checkpoint(dir.path(), &small(layout), format, 3, &mut |_, _| {}).unwrap();
            let model = crate::Model::load(dir.path()).unwrap();
            let pool = model.kv_pool(1).unwrap();
            let mut cache = crate::SeqCache::reserve(&pool, 4).unwrap();
            let logits = model.logits(&mut [crate::Chunk { tokens: &[1, 2, 3], cache: &mut cache }], None).unwrap();
            assert!(logits[0].iter().all(|v| v.is_finite()), "{format:?}: non-finite logits");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(
            write_random_checkpoint(dir.path(), &small(RandomLayout::Mixtral), RandomFormat::Mxfp4, 0, &mut |_, _| {})
                .is_err()
        );
    }
}
