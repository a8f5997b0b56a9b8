//! Random checkpoints of a chosen shape, written in Hugging Face layout (config.json +
//! model.safetensors), for benchmarks and tests that need realistic sizes without a download.

use std::path::Path;

use switchyard_kernels::DType;

use crate::checkpoint::{Tensor, write_safetensors};
use crate::error::{ModelError, Result};
use crate::sampling::Rng;

/// The shape of a Mixtral-style random checkpoint.
#[derive(Clone, Debug)]
pub struct RandomShape {
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

    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.expert_intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "dtype": "bfloat16",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }
}

/// Writes a random bf16 checkpoint of `shape` into `dir` (created if needed), reporting
/// `progress(layers_done, layers_total)`.
pub fn write_random_checkpoint(
    dir: &Path,
    shape: &RandomShape,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let mut rng = Rng::new(seed);
    let s = shape;
    let head_dim = s.head_dim;
    let mut tensors = Vec::new();
    let mat = |name: String, rows: usize, cols: usize, rng: &mut Rng| {
        let scale = 1.0 / (cols as f32).sqrt();
        let values: Vec<f32> = (0..rows * cols).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale * 1.7).collect();
        Tensor::from_f32(&name, DType::BF16, vec![rows, cols], &values)
    };
    tensors.push(mat("model.embed_tokens.weight".into(), s.vocab_size, s.hidden_size, &mut rng));
    for l in 0..s.num_layers {
        let p = format!("model.layers.{l}");
        let ones = vec![1.0f32; s.hidden_size];
        tensors.push(Tensor::from_f32(&format!("{p}.input_layernorm.weight"), DType::BF16, vec![s.hidden_size], &ones));
        tensors.push(Tensor::from_f32(
            &format!("{p}.post_attention_layernorm.weight"),
            DType::BF16,
            vec![s.hidden_size],
            &ones,
        ));
        let (q, kv) = (s.num_heads * head_dim, s.num_kv_heads * head_dim);
        tensors.push(mat(format!("{p}.self_attn.q_proj.weight"), q, s.hidden_size, &mut rng));
        tensors.push(mat(format!("{p}.self_attn.k_proj.weight"), kv, s.hidden_size, &mut rng));
        tensors.push(mat(format!("{p}.self_attn.v_proj.weight"), kv, s.hidden_size, &mut rng));
        tensors.push(mat(format!("{p}.self_attn.o_proj.weight"), s.hidden_size, q, &mut rng));
        tensors.push(mat(format!("{p}.block_sparse_moe.gate.weight"), s.num_experts, s.hidden_size, &mut rng));
        for e in 0..s.num_experts {
            let ep = format!("{p}.block_sparse_moe.experts.{e}");
            tensors.push(mat(format!("{ep}.w1.weight"), s.expert_intermediate_size, s.hidden_size, &mut rng));
            tensors.push(mat(format!("{ep}.w3.weight"), s.expert_intermediate_size, s.hidden_size, &mut rng));
            tensors.push(mat(format!("{ep}.w2.weight"), s.hidden_size, s.expert_intermediate_size, &mut rng));
        }
        progress(l + 1, s.num_layers);
    }
    tensors.push(Tensor::from_f32("model.norm.weight", DType::BF16, vec![s.hidden_size], &vec![1.0; s.hidden_size]));
    tensors.push(mat("lm_head.weight".into(), s.vocab_size, s.hidden_size, &mut rng));
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let config = serde_json::to_string_pretty(&shape.config_json()).expect("json");
    let path = dir.join("config.json");
    std::fs::write(&path, config).map_err(|source| ModelError::Io { path, source })
}
