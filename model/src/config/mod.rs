//! `config.json` → [`ModelSpec`]: one description of the model that every component shares.
//!
//! Accepts both the transformers 4.x layout (`rope_theta`, `rope_scaling`, `torch_dtype`) and
//! the 5.x layout (`rope_parameters`, `dtype`), with each architecture's defaults where a
//! field is absent, as transformers fills them.
//!
//! # Layout
//! - this module: [`ModelSpec`] and the fields every architecture shares.
//! - [`deepseek`]: DeepSeek's latent attention, routing and layer plan (and GLM-4.5's).
//! - [`rope`]: the rotary embedding's variant, base and rotated width.

mod deepseek;
mod rope;

use std::path::Path;

use serde_json::{Map, Value};
use switchyard_kernels::DType;

use crate::error::{ModelError, Result};

pub use deepseek::MlaSpec;
pub use rope::{RopeScaling, RopeSpec};
use rope::{default_max_positions, rope_spec, rotary_dim};

/// The supported architectures (`model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    GptOss,
    DeepseekV2,
    DeepseekV3,
    Glm4Moe,
}

impl Arch {
    pub fn from_model_type(t: &str) -> Result<Self> {
        Ok(match t {
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "olmoe" => Arch::Olmoe,
            "gpt_oss" => Arch::GptOss,
            "deepseek_v2" => Arch::DeepseekV2,
            "deepseek_v3" => Arch::DeepseekV3,
            "glm4_moe" => Arch::Glm4Moe,
            other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
        })
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
            Arch::GptOss => "gpt_oss",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Glm4Moe => "glm4_moe",
        }
    }
}

/// How the gate turns logits into (expert, weight) pairs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, keep the top k, optionally renormalise them (Mixtral,
    /// Qwen-MoE, OLMoE).
    SoftmaxTopK { renormalize: bool },
    /// Top k logits, then softmax over those k (gpt-oss).
    TopKSoftmax,
    /// DeepSeek's: experts chosen among the `topk_group` best of `groups` equal groups, the
    /// scores and the groups' scores as `scoring` says; weighted by the scores, normalised
    /// where `renormalize`, times `scale` (`routed_scaling_factor`).
    GroupLimited { scoring: GroupScoring, groups: usize, topk_group: usize, renormalize: bool, scale: f32 },
}

/// How a group-limited router scores experts and their groups.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GroupScoring {
    /// DeepSeek-V3's `noaux_tc`: sigmoid scores; chosen by the scores plus the layer's
    /// `e_score_correction_bias`, a group by the sum of its two best; weighted unbiased.
    Sigmoid,
    /// DeepSeek-V2's `greedy` (one group) and `group_limited_greedy`: softmax scores over
    /// all experts; a group scores its best.
    Softmax,
}

impl Routing {
    /// The backends' gate kernel for this routing, where one runs it (the group-limited
    /// choice runs on the host).
    pub fn gate(self) -> Option<switchyard_kernels::backend::Gate> {
        use switchyard_kernels::backend::Gate;
        match self {
            Routing::SoftmaxTopK { renormalize } => Some(Gate::SoftmaxTopK { renormalize }),
            Routing::TopKSoftmax => Some(Gate::TopKSoftmax),
            Routing::GroupLimited { .. } => None,
        }
    }
}

/// The expert MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertActivation {
    /// `silu(gate) * up` with separate gate and up rows.
    SwiGlu,
    /// gpt-oss: interleaved gate/up, clamped at `limit`, `(up + 1) · g · σ(alpha · g)`.
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

/// Which feed-forward a layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerMlp {
    Moe,
    Dense,
}

/// The model's shape and behaviour, read from `config.json`.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Values of each head RoPE rotates, the first ones: `head_dim` but for GLM-4.5's
    /// partial rotary embedding.
    pub rotary_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    /// Longest sequence served: `max_position_embeddings`, times the factor of dynamic NTK
    /// RoPE, which stretches the trained length (as vLLM derives its `max_model_len`).
    pub max_context: usize,
    pub tie_word_embeddings: bool,
    pub rope: RopeSpec,
    /// Per layer: the attention's sliding window, if any.
    pub sliding_windows: Vec<Option<usize>>,
    /// Per layer: MoE block or dense MLP.
    pub layer_mlps: Vec<LayerMlp>,
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub expert_intermediate_size: usize,
    /// Width of the dense MLP on non-MoE layers.
    pub dense_intermediate_size: usize,
    /// Width of the shared expert every token also goes through, if any (Qwen2-MoE's one;
    /// DeepSeek's `n_shared_experts` as one MLP).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Whether the shared expert's output is scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_expert_gated: bool,
    /// DeepSeek's multi-head latent attention, where the model uses it (instead of keys and
    /// values per KV head).
    pub mla: Option<MlaSpec>,
    /// Multi-token-prediction layers the checkpoint holds after `num_layers` (skipped).
    pub mtp_layers: usize,
    pub routing: Routing,
    pub activation: ExpertActivation,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub clip_qkv: Option<f32>,
    pub attention_sinks: bool,
    pub router_bias: bool,
    pub expert_bias: bool,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub dtype: Option<DType>,
    /// How the checkpoint's weights are quantized (`quantization_config`), if they are.
    pub quantization: Option<Quantization>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// How a checkpoint stores quantized weights (`quantization_config`), as the Hub ships them.
/// Which tensors are quantized is read from the checkpoint itself (their dtypes and
/// `*_blocks` / `*_scales` names); `modules_to_not_convert` lists the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quantization {
    /// gpt-oss: the experts' projections in MXFP4 (`*_blocks`, `*_scales`).
    Mxfp4,
    /// `float8_e4m3fn` weights with one `weight_scale_inv` per `block` (`weight_block_size`).
    Fp8 { block: [usize; 2] },
}

/// The `quant_method`s Switchyard reads.
pub const QUANT_METHODS: &str = "mxfp4 (gpt-oss experts) and fp8 (e4m3 with weight_block_size scales)";

fn quantization(f: &Fields<'_>) -> Result<Option<Quantization>> {
    let Some(q) = f.get("quantization_config") else { return Ok(None) };
    let field = "quantization_config";
    let q = Fields(q.as_object().ok_or(ModelError::Config { field, problem: "must be an object".into() })?);
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("(none)");
    match method {
        "mxfp4" => Ok(Some(Quantization::Mxfp4)),
        "fp8" => {
            if let Some(fmt) = q.get("fmt").and_then(Value::as_str).filter(|&f| f != "e4m3") {
                return Err(ModelError::Config {
                    field: "quantization_config.fmt",
                    problem: format!("`{fmt}` is not supported (only e4m3)"),
                });
            }
            if let Some(scheme) = q.get("activation_scheme").and_then(Value::as_str).filter(|&s| s != "dynamic") {
                return Err(ModelError::Config {
                    field: "quantization_config.activation_scheme",
                    problem: format!("`{scheme}` is not supported (only dynamic: activations stay in f32)"),
                });
            }
            let field = "quantization_config.weight_block_size";
            let block = match q.get("weight_block_size").and_then(Value::as_array).map(Vec::as_slice) {
                Some([a, b]) => match (a.as_u64(), b.as_u64()) {
                    (Some(a), Some(b)) if a > 0 && b > 0 => [a as usize, b as usize],
                    _ => return Err(ModelError::Config { field, problem: "must be two positive integers".into() }),
                },
                Some(_) => return Err(ModelError::Config { field, problem: "must be two positive integers".into() }),
                None => {
                    return Err(ModelError::Config {
                        field,
                        problem:
                            "is missing: per-tensor and per-channel FP8 scales are not supported, only block scales"
                                .into(),
                    });
                }
            };
            Ok(Some(Quantization::Fp8 { block }))
        }
        other => Err(ModelError::UnsupportedQuantization(other.to_string())),
    }
}

/// Normalisation of queries and keys before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (Qwen3-MoE), weight `[head_dim]`.
    PerHead,
    /// RMSNorm over the whole projection (OLMoE), weights `[heads * head_dim]`.
    Full,
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &'static str) -> Result<usize> {
        self.opt_usize(key)?.ok_or(ModelError::Config { field: key, problem: "is missing".into() })
    }

    fn opt_usize(&self, key: &'static str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or(ModelError::Config { field: key, problem: format!("must be a non-negative integer, got {v}") }),
        }
    }

    /// `key`, which must be at least 1 where present.
    fn opt_count(&self, key: &'static str) -> Result<Option<usize>> {
        self.opt_count_at_most(key, MAX_COUNT)
    }

    /// `key`, which must be between 1 and `most` where present. The bounds sit far above any
    /// real model and low enough that what is sized by them (per-layer tables, per-expert
    /// lists) cannot exhaust memory before the checkpoint is even opened.
    fn opt_count_at_most(&self, key: &'static str, most: usize) -> Result<Option<usize>> {
        match self.opt_usize(key)? {
            Some(0) => Err(ModelError::Config { field: key, problem: "must be at least 1, got 0".into() }),
            Some(n) if n > most => {
                Err(ModelError::Config { field: key, problem: format!("must be at most {most}, got {n}") })
            }
            n => Ok(n),
        }
    }

    /// `key`, which must be present and at least 1.
    fn count(&self, key: &'static str) -> Result<usize> {
        self.opt_count(key)?.ok_or(ModelError::Config { field: key, problem: "is missing".into() })
    }

    /// `key`, which must be a finite number > 0 (as an `f32`) where present.
    fn opt_positive_f32(&self, key: &'static str) -> Result<Option<f32>> {
        match self.opt_f32(key)? {
            Some(n) if !(n.is_finite() && n > 0.0) => Err(positive(key, self.get(key))),
            n => Ok(n),
        }
    }

    /// `key`, which must be a finite number > 0 where present, in full precision.
    fn opt_positive_f64(&self, key: &'static str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) if n.is_finite() && n > 0.0 => Ok(Some(n)),
                _ => Err(positive(key, Some(v))),
            },
        }
    }

    /// `key`, which must be a finite number where present.
    fn opt_finite_f32(&self, key: &'static str) -> Result<Option<f32>> {
        match self.opt_f32(key)? {
            Some(n) if !n.is_finite() => Err(ModelError::Config {
                field: key,
                problem: format!("must be a finite number, got {}", self.get(key).expect("present")),
            }),
            n => Ok(n),
        }
    }

    fn opt_f32(&self, key: &'static str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|n| Some(n as f32))
                .ok_or(ModelError::Config { field: key, problem: format!("must be a number, got {v}") }),
        }
    }

    fn bool_or(&self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_bool().ok_or(ModelError::Config { field: key, problem: format!("must be a boolean, got {v}") })
            }
        }
    }

    /// `key`: one token id or a list of them, each below `vocab_size`.
    fn token_ids(&self, key: &'static str, vocab_size: usize) -> Result<Vec<u32>> {
        let ids: Vec<&Value> = match self.get(key) {
            None => return Ok(vec![]),
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
        };
        ids.into_iter()
            .map(|v| match v.as_u64() {
                Some(id) if (id as usize) < vocab_size => Ok(id as u32),
                Some(id) => Err(ModelError::Config {
                    field: key,
                    problem: format!("must be below vocab_size ({vocab_size}), got {id}"),
                }),
                None => Err(ModelError::Config {
                    field: key,
                    problem: format!("must be a token id or a list of token ids, got {v}"),
                }),
            })
            .collect()
    }
}

/// Most layers a config may declare.
const MAX_LAYERS: usize = 4096;
/// Most of any other count (widths, heads, experts, vocabulary) a config may declare.
const MAX_COUNT: usize = 1 << 24;

fn positive(key: &'static str, v: Option<&Value>) -> ModelError {
    let got = v.map_or_else(|| "nothing".to_string(), Value::to_string);
    ModelError::Config { field: key, problem: format!("must be a finite number > 0, got {got}") }
}

impl ModelSpec {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::InvalidJson { message, .. } => ModelError::InvalidJson { file: path, message },
            e => e,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::InvalidJson { file: "config.json".into(), message: e.to_string() })?;
        let map = value.as_object().ok_or_else(|| ModelError::InvalidJson {
            file: "config.json".into(),
            message: "not a JSON object".into(),
        })?;
        Self::from_fields(&Fields(map))
    }

    fn from_fields(f: &Fields<'_>) -> Result<Self> {
        let model_type = f
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or(ModelError::Config { field: "model_type", problem: "is missing".into() })?;
        let arch = Arch::from_model_type(model_type)?;
        let vocab_size = f.count("vocab_size")?;
        let hidden_size = f.count("hidden_size")?;
        let num_layers = f
            .opt_count_at_most("num_hidden_layers", MAX_LAYERS)?
            .ok_or(ModelError::Config { field: "num_hidden_layers", problem: "is missing".into() })?;
        let num_heads = f.count("num_attention_heads")?;
        let deepseek = match arch {
            Arch::DeepseekV2 => Some(deepseek::read(f, num_layers, deepseek::Generation::V2)?),
            Arch::DeepseekV3 => Some(deepseek::read(f, num_layers, deepseek::Generation::V3)?),
            Arch::Glm4Moe => Some(deepseek::read(f, num_layers, deepseek::Generation::Glm4Moe)?),
            _ => None,
        };
        let mla = deepseek.as_ref().and_then(|d| d.mla);
        if let Some(m) = &mla {
            m.check_heads(num_heads)?;
        }
        // MLA's heads all read one latent row; RoPE rotates `qk_rope_head_dim` values of each.
        let num_kv_heads = match &mla {
            Some(_) => num_heads,
            None => f.opt_count("num_key_value_heads")?.unwrap_or(if arch == Arch::Glm4Moe { 8 } else { num_heads }),
        };
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::Config {
                field: "num_key_value_heads",
                problem: format!("must divide num_attention_heads ({num_heads}), got {num_kv_heads}"),
            });
        }
        let head_dim = match (&mla, f.opt_count("head_dim")?) {
            (Some(m), _) => m.qk_rope_head_dim,
            (None, Some(d)) => d,
            (None, None) if hidden_size / num_heads == 0 => {
                return Err(ModelError::Config {
                    field: "num_attention_heads",
                    problem: format!(
                        "must be at most hidden_size ({hidden_size}) when head_dim is absent, got {num_heads}"
                    ),
                });
            }
            (None, None) => hidden_size / num_heads,
        };
        // Every architecture rotates head_dim / 2 pairs of each head.
        if !head_dim.is_multiple_of(2) {
            return Err(ModelError::Config {
                field: "head_dim",
                problem: format!("must be even (RoPE rotates pairs of values), got {head_dim}"),
            });
        }
        let rotary_dim = rotary_dim(arch, f, head_dim)?;
        let max_position_embeddings = f.opt_count("max_position_embeddings")?.unwrap_or(default_max_positions(arch));
        // transformers 5 writes `num_local_experts` for every family; 4.x Qwen/OLMoE `num_experts`.
        let num_experts = match (&deepseek, f.opt_count("num_local_experts")?) {
            (Some(d), _) => d.num_experts,
            (None, Some(n)) => n,
            (None, None) => f.count("num_experts")?,
        };
        let experts_per_token = match f.opt_usize("num_experts_per_tok")? {
            Some(k) => k,
            None => f.usize("experts_per_token")?,
        };
        if experts_per_token == 0 || experts_per_token > num_experts {
            return Err(ModelError::Config {
                field: "num_experts_per_tok",
                problem: format!(
                    "must be between 1 and the number of experts ({num_experts}), got {experts_per_token}"
                ),
            });
        }
        let intermediate_size = f.opt_count("intermediate_size")?;
        let expert_intermediate_size = match arch {
            Arch::Qwen2Moe | Arch::Qwen3Moe => f.count("moe_intermediate_size")?,
            Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => {
                deepseek.as_ref().map_or(0, |d| d.expert_intermediate_size)
            }
            _ => f.count("intermediate_size")?,
        };

        let sliding_windows = sliding_windows(arch, f, num_layers)?;
        let layer_mlps = match &deepseek {
            Some(d) => d.layer_mlps.clone(),
            None => layer_mlps(arch, f, num_layers)?,
        };
        let norm_topk = match arch {
            Arch::Mixtral => true,
            Arch::Qwen3Moe => f.bool_or("norm_topk_prob", true)?,
            _ => f.bool_or("norm_topk_prob", false)?,
        };
        let routing = match (arch, &deepseek) {
            (_, Some(d)) => d.routing,
            (Arch::GptOss, _) => Routing::TopKSoftmax,
            _ => Routing::SoftmaxTopK { renormalize: norm_topk },
        };
        if let Routing::GroupLimited { groups, topk_group, .. } = routing
            && experts_per_token > topk_group * (num_experts / groups)
        {
            return Err(ModelError::Config {
                field: "num_experts_per_tok",
                problem: format!(
                    "must be at most the experts of the topk_group ({topk_group}) groups kept, {}, got {experts_per_token}",
                    topk_group * (num_experts / groups)
                ),
            });
        }
        let activation = match arch {
            Arch::GptOss => ExpertActivation::ClampedSwiGlu {
                alpha: f.opt_finite_f32("swiglu_alpha")?.unwrap_or(1.702),
                limit: f.opt_positive_f32("swiglu_limit")?.unwrap_or(7.0),
            },
            _ => ExpertActivation::SwiGlu,
        };
        let attention_bias = f.bool_or("attention_bias", arch == Arch::GptOss)?;
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false),
            // GLM-4.5's `attention_bias` is on q, k and v, never on o_proj.
            Arch::Glm4Moe => (attention_bias, false),
            _ => (attention_bias, attention_bias),
        };
        let hidden_act = f.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
        if arch != Arch::GptOss && hidden_act != "silu" {
            return Err(ModelError::Config {
                field: "hidden_act",
                problem: format!("`{hidden_act}` is not supported (only silu)"),
            });
        }
        let dtype = match f.get("dtype").or_else(|| f.get("torch_dtype")).and_then(Value::as_str) {
            Some("bfloat16") => Some(DType::BF16),
            Some("float16") => Some(DType::F16),
            Some("float32") => Some(DType::F32),
            _ => None,
        };
        let rope = rope_spec(arch, f)?;
        // Dynamic NTK grows its base by a power of d / (d - 2).
        if matches!(rope.scaling, RopeScaling::Dynamic { .. }) && rotary_dim <= 2 {
            return Err(ModelError::Config {
                field: "rope_scaling",
                problem: format!("dynamic RoPE needs more than 2 rotated values per head, got {rotary_dim}"),
            });
        }
        let quantization = quantization(f)?;
        if quantization == Some(Quantization::Mxfp4) && arch != Arch::GptOss {
            return Err(ModelError::Config {
                field: "quantization_config.quant_method",
                problem: format!("mxfp4 is read for gpt_oss experts only, not {}", arch.model_type()),
            });
        }
        let max_context = match rope.scaling {
            RopeScaling::Dynamic { factor } if factor > 1.0 => (max_position_embeddings as f32 * factor) as usize,
            _ => max_position_embeddings,
        };
        let mut eos_token_ids = f.token_ids("eos_token_id", vocab_size)?;
        eos_token_ids.dedup();
        Ok(ModelSpec {
            arch,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps: f.opt_positive_f32("rms_norm_eps")?.unwrap_or(if arch == Arch::Glm4Moe {
                1e-5
            } else {
                1e-6
            }),
            max_position_embeddings,
            max_context,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            rope,
            sliding_windows,
            layer_mlps,
            num_experts,
            experts_per_token,
            expert_intermediate_size,
            dense_intermediate_size: intermediate_size.unwrap_or(expert_intermediate_size),
            shared_expert_intermediate_size: match (arch, &deepseek) {
                (Arch::Qwen2Moe, _) => f.opt_usize("shared_expert_intermediate_size")?.filter(|&n| n > 0),
                (_, Some(d)) => d.shared_width,
                _ => None,
            },
            shared_expert_gated: arch == Arch::Qwen2Moe,
            mla,
            mtp_layers: deepseek.as_ref().map_or(0, |d| d.mtp_layers),
            routing,
            activation,
            qkv_bias,
            o_bias,
            qk_norm: match arch {
                Arch::Qwen3Moe => QkNorm::PerHead,
                Arch::Glm4Moe if f.bool_or("use_qk_norm", false)? => QkNorm::PerHead,
                Arch::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            },
            clip_qkv: if arch == Arch::Olmoe { f.opt_positive_f32("clip_qkv")? } else { None },
            attention_sinks: arch == Arch::GptOss,
            router_bias: arch == Arch::GptOss,
            expert_bias: arch == Arch::GptOss,
            dtype,
            quantization,
            bos_token_id: f.token_ids("bos_token_id", vocab_size)?.first().copied(),
            eos_token_ids,
        })
    }

    /// Layers whose feed-forward is a MoE block.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.layer_mlps[l] == LayerMlp::Moe)
    }
}

fn layer_types(f: &Fields<'_>, num_layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(v) = f.get("layer_types") else { return Ok(None) };
    let bad =
        || ModelError::Config { field: "layer_types", problem: format!("must list {num_layers} attention types") };
    let list = v.as_array().ok_or_else(bad)?;
    if list.len() != num_layers {
        return Err(bad());
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(ModelError::Config { field: "layer_types", problem: format!("unknown attention type {t}") }),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn sliding_windows(arch: Arch, f: &Fields<'_>, num_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = f.opt_usize("sliding_window")?.filter(|&w| w > 0);
    let sliding: Vec<bool> = match arch {
        Arch::Mixtral => vec![window.is_some(); num_layers],
        Arch::GptOss => layer_types(f, num_layers)?.unwrap_or_else(|| (0..num_layers).map(|i| i % 2 == 0).collect()),
        Arch::Qwen2Moe | Arch::Qwen3Moe => match layer_types(f, num_layers)? {
            Some(types) if f.bool_or("use_sliding_window", false)? => types,
            _ if f.bool_or("use_sliding_window", false)? => {
                let max_window_layers = f.opt_usize("max_window_layers")?.unwrap_or(num_layers);
                (0..num_layers).map(|i| i % 2 == 0 && i < max_window_layers).collect()
            }
            _ => vec![false; num_layers],
        },
        Arch::Olmoe | Arch::DeepseekV2 | Arch::DeepseekV3 | Arch::Glm4Moe => vec![false; num_layers],
    };
    if sliding.iter().any(|&s| s) && window.is_none() {
        return Err(ModelError::Config {
            field: "sliding_window",
            problem: "is missing but layers use sliding attention".into(),
        });
    }
    Ok(sliding.into_iter().map(|s| if s { window } else { None }).collect())
}

fn layer_mlps(arch: Arch, f: &Fields<'_>, num_layers: usize) -> Result<Vec<LayerMlp>> {
    Ok(match arch {
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
            let dense: Vec<usize> = match f.get("mlp_only_layers") {
                None => vec![],
                Some(v) => v
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).map(|n| n as usize).collect())
                    .ok_or(ModelError::Config {
                        field: "mlp_only_layers",
                        problem: "must be a list of layer indices".into(),
                    })?,
            };
            (0..num_layers)
                .map(|l| if !dense.contains(&l) && (l + 1) % step == 0 { LayerMlp::Moe } else { LayerMlp::Dense })
                .collect()
        }
        _ => vec![LayerMlp::Moe; num_layers],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL_4X: &str = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,"num_hidden_layers":32,
        "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,"num_local_experts":8,
        "num_experts_per_tok":2,"rope_theta":1000000.0,"rope_scaling":{"type":"linear","factor":2.0},
        "torch_dtype":"bfloat16","sliding_window":null,"max_position_embeddings":32768,"rms_norm_eps":1e-5,
        "bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn reads_4x_layout() {
        let s = ModelSpec::from_json(MIXTRAL_4X).unwrap();
        assert_eq!(s.arch, Arch::Mixtral);
        assert_eq!(s.head_dim, 128);
        assert_eq!(s.rope, RopeSpec { theta: 1e6, scaling: RopeScaling::Linear { factor: 2.0 } });
        assert_eq!(s.dtype, Some(DType::BF16));
        assert_eq!(s.sliding_windows, vec![None; 32]);
        assert_eq!(s.eos_token_ids, vec![2]);
        assert_eq!(s.routing, Routing::SoftmaxTopK { renormalize: true });
    }

    #[test]
    fn reads_5x_layout() {
        let j = r#"{"model_type":"gpt_oss","vocab_size":201088,"hidden_size":2880,"num_hidden_layers":2,
            "num_attention_heads":64,"num_key_value_heads":8,"head_dim":64,"intermediate_size":2880,
            "num_local_experts":32,"num_experts_per_tok":4,"sliding_window":128,
            "layer_types":["sliding_attention","full_attention"],"dtype":"bfloat16",
            "rope_parameters":{"rope_type":"yarn","factor":32.0,"beta_fast":32.0,"beta_slow":1.0,
              "original_max_position_embeddings":4096,"truncate":false,"rope_theta":150000.0}}"#;
        let s = ModelSpec::from_json(j).unwrap();
        assert_eq!(s.sliding_windows, vec![Some(128), None]);
        assert_eq!(s.rope.theta, 150000.0);
        assert!(matches!(
            s.rope.scaling,
            RopeScaling::Yarn { factor: 32.0, original_max_position_embeddings: 4096, truncate: false, .. }
        ));
        assert_eq!(s.routing, Routing::TopKSoftmax);
        assert!(s.attention_sinks && s.qkv_bias && s.o_bias);
    }

    #[test]
    fn qwen_dense_layers_and_errors() {
        let j = r#"{"model_type":"qwen3_moe","vocab_size":10,"hidden_size":8,"num_hidden_layers":4,
            "num_attention_heads":2,"num_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":4,
            "intermediate_size":16,"decoder_sparse_step":2,"mlp_only_layers":[3]}"#;
        let s = ModelSpec::from_json(j).unwrap();
        assert_eq!(s.layer_mlps, vec![LayerMlp::Dense, LayerMlp::Moe, LayerMlp::Dense, LayerMlp::Dense]);
        let e = ModelSpec::from_json(&j.replace("qwen3_moe", "llama")).unwrap_err();
        assert!(e.to_string().contains("unsupported model_type `llama`"), "{e}");
        let e = ModelSpec::from_json(&j.replace(r#""hidden_size":8,"#, "")).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let base: Map<String, Value> = serde_json::from_str(MIXTRAL_4X).unwrap();
        let err = |field: &str, v: Value| {
            let mut c = base.clone();
            c.insert(field.to_string(), v);
            ModelSpec::from_json(&Value::Object(c).to_string()).unwrap_err().to_string()
        };
        let cases = [
            ("rms_norm_eps", serde_json::json!(-1), "config.json: `rms_norm_eps` must be a finite number > 0, got -1"),
            ("rms_norm_eps", serde_json::json!(0.0), "`rms_norm_eps` must be a finite number > 0, got 0.0"),
            // Positive, but 0 as an f32.
            ("rms_norm_eps", serde_json::json!(1e-50), "`rms_norm_eps` must be a finite number > 0, got "),
            ("max_position_embeddings", serde_json::json!(0), "`max_position_embeddings` must be at least 1, got 0"),
            ("eos_token_id", serde_json::json!(99999), "`eos_token_id` must be below vocab_size (32000), got 99999"),
            (
                "eos_token_id",
                serde_json::json!([2, 32000]),
                "`eos_token_id` must be below vocab_size (32000), got 32000",
            ),
            ("eos_token_id", serde_json::json!([2, -1]), "`eos_token_id` must be a token id or a list of token ids"),
            ("bos_token_id", serde_json::json!(40000), "`bos_token_id` must be below vocab_size (32000), got 40000"),
            ("vocab_size", serde_json::json!(0), "`vocab_size` must be at least 1, got 0"),
            ("hidden_size", serde_json::json!(0), "`hidden_size` must be at least 1, got 0"),
            ("num_hidden_layers", serde_json::json!(0), "`num_hidden_layers` must be at least 1, got 0"),
            ("num_hidden_layers", serde_json::json!(4294967295u64), "`num_hidden_layers` must be at most 4096"),
            ("vocab_size", serde_json::json!(1u64 << 40), "`vocab_size` must be at most 16777216"),
            ("num_attention_heads", serde_json::json!(0), "`num_attention_heads` must be at least 1, got 0"),
            (
                "num_attention_heads",
                serde_json::json!(8192),
                "`num_attention_heads` must be at most hidden_size (4096)",
            ),
            ("num_key_value_heads", serde_json::json!(0), "`num_key_value_heads` must be at least 1, got 0"),
            ("num_key_value_heads", serde_json::json!(5), "`num_key_value_heads` must divide num_attention_heads (32)"),
            ("head_dim", serde_json::json!(0), "`head_dim` must be at least 1, got 0"),
            ("head_dim", serde_json::json!(127), "`head_dim` must be even (RoPE rotates pairs of values), got 127"),
            ("num_local_experts", serde_json::json!(0), "`num_local_experts` must be at least 1, got 0"),
            ("num_experts_per_tok", serde_json::json!(0), "`num_experts_per_tok` must be between 1 and the number"),
            ("num_experts_per_tok", serde_json::json!(9), "`num_experts_per_tok` must be between 1 and the number"),
            ("intermediate_size", serde_json::json!(0), "`intermediate_size` must be at least 1, got 0"),
            ("rope_theta", serde_json::json!(-10000.0), "`rope_theta` must be a finite number > 0, got -10000"),
            ("rope_theta", serde_json::json!(0), "`rope_theta` must be a finite number > 0, got 0"),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear", "factor": 0}),
                "`factor` must be a finite number > 0",
            ),
        ];
        for (field, value, want) in cases {
            let e = err(field, value);
            assert!(e.contains(want), "{field}: {e}");
        }
    }
}
