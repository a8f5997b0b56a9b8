//! DeepSeek's fields (`model_type: "deepseek_v3"`, the architecture of Kimi-K2 and others,
//! and `"deepseek_v2"`): multi-head latent attention, group-limited routing, shared experts
//! and the leading dense layers, with transformers' defaults where a field is absent. GLM-4.5
//! (`"glm4_moe"`) shares DeepSeek-V3's MoE layers over per-head attention.

use serde_json::Value;

use super::{Fields, GroupScoring, LayerMlp, Routing};
use crate::error::{ModelError, Result};

/// Multi-head latent attention: queries through an optional low-rank `q_lora_rank`; keys and
/// values through one `kv_lora_rank` latent per token (what the cache holds, with the
/// `qk_rope_head_dim` rotated key shared by every head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlaSpec {
    /// `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// RoPE over interleaved pairs (`x[2i]`, `x[2i+1]`) rather than halves.
    pub rope_interleave: bool,
    /// Multiplies `q · k`: `qk_head_dim^-½`, times YaRN's `mscale(factor, mscale_all_dim)²`.
    pub softmax_scale: f32,
}

impl MlaSpec {
    /// Values one cache row holds per layer: the latent and the rotated key.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The projections' widths over `heads` heads must stay within the bound every size has
    /// (what the load sizes by them is allocated before the tensors are read).
    pub(super) fn check_heads(&self, heads: usize) -> Result<()> {
        let widest = self.qk_head_dim().max(self.qk_nope_head_dim + self.v_head_dim);
        match heads.checked_mul(widest) {
            Some(w) if w <= super::MAX_COUNT => Ok(()),
            _ => Err(ModelError::Config {
                field: "num_attention_heads",
                problem: format!(
                    "times the widest head ({widest} values) must be at most {}, got {heads}",
                    super::MAX_COUNT
                ),
            }),
        }
    }
}

/// What a DeepSeek config adds to the common fields.
pub(super) struct DeepSeek {
    /// Latent attention (DeepSeek); `None`: per-head attention (GLM-4.5).
    pub mla: Option<MlaSpec>,
    pub num_experts: usize,
    pub expert_intermediate_size: usize,
    pub shared_width: Option<usize>,
    pub routing: Routing,
    pub layer_mlps: Vec<LayerMlp>,
    /// Multi-token-prediction layers the checkpoint carries after the model's own.
    pub mtp_layers: usize,
}

/// Which DeepSeek a config describes: their routers and their defaults differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Generation {
    /// `deepseek_v2` (V2, V2-Lite, V2.5): softmax routing, `greedy` or
    /// `group_limited_greedy`.
    V2,
    /// `deepseek_v3` (V3, R1, Kimi-K2): sigmoid `noaux_tc` routing.
    V3,
    /// `glm4_moe` (GLM-4.5, 4.6): V3's MoE layers, per-head attention.
    Glm4Moe,
}

/// transformers' defaults for what a config leaves out.
struct Defaults {
    model_type: &'static str,
    topk_method: &'static str,
    topk_methods: &'static [&'static str],
    scoring_func: &'static str,
    /// `n_group`, `topk_group`.
    groups: (usize, usize),
    norm_topk_prob: bool,
    experts: usize,
    expert_width: usize,
    shared_experts: usize,
    first_dense: usize,
    scale: f32,
}

impl Generation {
    fn defaults(self) -> Defaults {
        match self {
            Generation::V2 => Defaults {
                model_type: "deepseek_v2",
                topk_method: "greedy",
                topk_methods: &["greedy", "group_limited_greedy"],
                scoring_func: "softmax",
                groups: (1, 1),
                norm_topk_prob: false,
                experts: 64,
                expert_width: 1407,
                shared_experts: 2,
                first_dense: 0,
                scale: 1.0,
            },
            Generation::V3 => Defaults {
                model_type: "deepseek_v3",
                topk_method: "noaux_tc",
                topk_methods: &["noaux_tc"],
                scoring_func: "sigmoid",
                groups: (8, 4),
                norm_topk_prob: true,
                experts: 256,
                expert_width: 2048,
                shared_experts: 1,
                first_dense: 3,
                scale: 2.5,
            },
            Generation::Glm4Moe => Defaults {
                model_type: "glm4_moe",
                topk_method: "noaux_tc",
                topk_methods: &["noaux_tc"],
                scoring_func: "sigmoid",
                groups: (1, 1),
                norm_topk_prob: true,
                experts: 128,
                expert_width: 1408,
                shared_experts: 1,
                first_dense: 1,
                scale: 1.0,
            },
        }
    }
}

pub(super) fn read(f: &Fields<'_>, num_layers: usize, generation: Generation) -> Result<DeepSeek> {
    let d = generation.defaults();
    let method = f.get("topk_method").and_then(Value::as_str).unwrap_or(d.topk_method);
    if !d.topk_methods.contains(&method) {
        return Err(ModelError::Config {
            field: "topk_method",
            problem: format!("`{method}` is not supported for {} (only {})", d.model_type, d.topk_methods.join(", ")),
        });
    }
    let scoring = f.get("scoring_func").and_then(Value::as_str).unwrap_or(d.scoring_func);
    if scoring != d.scoring_func {
        return Err(ModelError::Config {
            field: "scoring_func",
            problem: format!("`{scoring}` is not supported for {} (only {})", d.model_type, d.scoring_func),
        });
    }
    let num_experts = match f.opt_count("n_routed_experts")? {
        Some(n) => n,
        None => f.opt_count("num_local_experts")?.unwrap_or(d.experts),
    };
    let (groups, topk_group) = match (generation, method) {
        // `greedy`: the top k of all experts, as one group.
        (Generation::V2, "greedy") => (1, 1),
        (Generation::V2, _) => (f.count("n_group")?, f.count("topk_group")?),
        _ => (f.opt_count("n_group")?.unwrap_or(d.groups.0), f.opt_count("topk_group")?.unwrap_or(d.groups.1)),
    };
    if !num_experts.is_multiple_of(groups) {
        return Err(ModelError::Config {
            field: "n_group",
            problem: format!("must divide n_routed_experts ({num_experts}), got {groups}"),
        });
    }
    // A sigmoid router scores a group by its two best experts.
    if d.scoring_func == "sigmoid" && num_experts / groups < 2 {
        return Err(ModelError::Config {
            field: "n_group",
            problem: format!("must leave at least 2 experts per group ({num_experts} experts), got {groups}"),
        });
    }
    if topk_group > groups {
        return Err(ModelError::Config {
            field: "topk_group",
            problem: format!("must be at most n_group ({groups}), got {topk_group}"),
        });
    }
    let scale = f.opt_positive_f32("routed_scaling_factor")?.unwrap_or(d.scale);
    let (scoring, renormalize) = match generation {
        Generation::V3 | Generation::Glm4Moe => (GroupScoring::Sigmoid, f.bool_or("norm_topk_prob", d.norm_topk_prob)?),
        // transformers' DeepseekV2 never normalises the chosen weights (the Hub's V2 configs
        // all say `false`); a config that asks for it is refused rather than ignored.
        Generation::V2 if f.bool_or("norm_topk_prob", false)? => {
            return Err(ModelError::Config {
                field: "norm_topk_prob",
                problem: "`true` is not supported for deepseek_v2 (its router does not normalise)".into(),
            });
        }
        Generation::V2 => (GroupScoring::Softmax, false),
    };

    let expert_intermediate_size = f.opt_count("moe_intermediate_size")?.unwrap_or(d.expert_width);
    let shared = f.opt_usize("n_shared_experts")?.unwrap_or(d.shared_experts);
    // The shared experts run as one MLP of their summed width.
    let shared_width = match shared.checked_mul(expert_intermediate_size) {
        Some(0) => None,
        Some(w) if w <= super::MAX_COUNT => Some(w),
        _ => {
            return Err(ModelError::Config {
                field: "n_shared_experts",
                problem: format!(
                    "times moe_intermediate_size ({expert_intermediate_size}) must be at most {}, got {shared}",
                    super::MAX_COUNT
                ),
            });
        }
    };
    let first_dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(d.first_dense);
    let freq = f.opt_count("moe_layer_freq")?.unwrap_or(1);
    if generation == Generation::Glm4Moe && freq != 1 {
        return Err(ModelError::Config {
            field: "moe_layer_freq",
            problem: format!("{freq} is not supported for glm4_moe (every layer from first_k_dense_replace is MoE)"),
        });
    }
    // DeepSeek-V2's dense MLPs and shared experts take `mlp_bias`; no checkpoint sets it.
    if f.bool_or("mlp_bias", false)? {
        return Err(ModelError::Config {
            field: "mlp_bias",
            problem: format!("`true` is not supported for {}", d.model_type),
        });
    }
    let layer_mlps = (0..num_layers)
        .map(|l| if l >= first_dense && l % freq == 0 { LayerMlp::Moe } else { LayerMlp::Dense })
        .collect();

    Ok(DeepSeek {
        mla: if generation == Generation::Glm4Moe { None } else { Some(read_mla(f, generation)?) },
        num_experts,
        expert_intermediate_size,
        shared_width,
        routing: Routing::GroupLimited { scoring, groups, topk_group, renormalize, scale },
        layer_mlps,
        mtp_layers: match f.opt_usize("num_nextn_predict_layers")? {
            Some(n) => n,
            None => f.opt_usize("num_mtp_layers")?.unwrap_or(0),
        },
    })
}

/// The latent attention's widths and softmax scale.
fn read_mla(f: &Fields<'_>, generation: Generation) -> Result<MlaSpec> {
    // Absent: transformers' 1536; `null`: a plain `q_proj`.
    let q_lora_rank = match f.0.get("q_lora_rank") {
        None => Some(1536),
        Some(_) => f.opt_count("q_lora_rank")?,
    };
    let kv_lora_rank = f.opt_count("kv_lora_rank")?.unwrap_or(512);
    let qk_nope_head_dim = f.opt_count("qk_nope_head_dim")?.unwrap_or(128);
    let qk_rope_head_dim = f.opt_count("qk_rope_head_dim")?.unwrap_or(64);
    let v_head_dim = f.opt_count("v_head_dim")?.unwrap_or(128);
    if !qk_rope_head_dim.is_multiple_of(2) {
        return Err(ModelError::Config {
            field: "qk_rope_head_dim",
            problem: format!("must be even (RoPE rotates pairs of values), got {qk_rope_head_dim}"),
        });
    }
    let mut softmax_scale = 1.0 / ((qk_nope_head_dim + qk_rope_head_dim) as f32).sqrt();
    // transformers: any scaled RoPE with a non-zero `mscale_all_dim` multiplies the scale by
    // YaRN's mscale twice.
    let rope = f.get("rope_parameters").or_else(|| f.get("rope_scaling")).and_then(Value::as_object);
    if let Some(rope) = rope.map(Fields) {
        let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
        let all_dim = rope.opt_finite_f32("mscale_all_dim")?.unwrap_or(0.0);
        if kind != "default" && all_dim != 0.0 {
            let factor = rope.opt_positive_f32("factor")?.unwrap_or(1.0);
            let m = if factor <= 1.0 { 1.0 } else { 0.1 * all_dim * factor.ln() + 1.0 };
            softmax_scale *= m * m;
        }
    }
    // V2 always rotates interleaved pairs (as complex numbers).
    let rope_interleave = f.bool_or("rope_interleave", true)?;
    if generation == Generation::V2 && !rope_interleave {
        return Err(ModelError::Config {
            field: "rope_interleave",
            problem: "`false` is not supported for deepseek_v2 (it rotates interleaved pairs)".into(),
        });
    }
    Ok(MlaSpec {
        q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim,
        qk_rope_head_dim,
        v_head_dim,
        rope_interleave,
        softmax_scale,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{GroupScoring, LayerMlp, ModelSpec, Quantization, Routing};

    /// DeepSeek-V3's `config.json` as the Hub ships it (4.x layout), trimmed of fields that
    /// do not matter here.
    const V3: &str = r#"{"architectures":["DeepseekV3ForCausalLM"],"model_type":"deepseek_v3",
        "vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,
        "num_hidden_layers":61,"num_nextn_predict_layers":1,"num_attention_heads":128,"num_key_value_heads":128,
        "n_shared_experts":1,"n_routed_experts":256,"routed_scaling_factor":2.5,"kv_lora_rank":512,
        "q_lora_rank":1536,"qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,
        "topk_method":"noaux_tc","n_group":8,"topk_group":4,"num_experts_per_tok":8,"moe_layer_freq":1,
        "first_k_dense_replace":3,"norm_topk_prob":true,"scoring_func":"sigmoid","hidden_act":"silu",
        "max_position_embeddings":163840,"rms_norm_eps":1e-6,"rope_theta":10000,
        "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":1.0,"mscale_all_dim":1.0,
          "original_max_position_embeddings":4096,"type":"yarn"},
        "quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8",
          "weight_block_size":[128,128]},
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","bos_token_id":0,"eos_token_id":1}"#;

    #[test]
    fn reads_deepseek_v3_as_the_hub_ships_it() {
        let s = ModelSpec::from_json(V3).unwrap();
        let m = s.mla.unwrap();
        assert_eq!((m.q_lora_rank, m.kv_lora_rank, m.cache_width()), (Some(1536), 512, 576));
        assert_eq!((m.qk_nope_head_dim, m.v_head_dim, s.head_dim), (128, 128, 64));
        assert!(m.rope_interleave);
        // 192^-1/2 times (0.1 ln 40 + 1)^2.
        let want = (0.1 * 40f32.ln() + 1.0).powi(2) / 192f32.sqrt();
        assert!((m.softmax_scale - want).abs() < 1e-6, "{}", m.softmax_scale);
        let routing = Routing::GroupLimited {
            scoring: GroupScoring::Sigmoid,
            groups: 8,
            topk_group: 4,
            renormalize: true,
            scale: 2.5,
        };
        assert_eq!(s.routing, routing);
        assert_eq!((s.num_experts, s.experts_per_token, s.expert_intermediate_size), (256, 8, 2048));
        assert_eq!(s.dense_intermediate_size, 18432);
        assert_eq!((s.shared_expert_intermediate_size, s.shared_expert_gated), (Some(2048), false));
        assert_eq!(&s.layer_mlps[..4], &[LayerMlp::Dense, LayerMlp::Dense, LayerMlp::Dense, LayerMlp::Moe]);
        assert_eq!(s.moe_layers().count(), 58);
        assert_eq!(s.mtp_layers, 1);
        assert_eq!(s.quantization, Some(Quantization::Fp8 { block: [128, 128] }));
        // The latent cache: 576 values per token and layer, against 128 heads x (192 + 128).
        assert_eq!(crate::kv_cache::KvPool::layout_for(&s).floats_per_token(), 61 * 576);
    }

    #[test]
    fn unknown_routing_methods_are_refused_by_name() {
        let e = ModelSpec::from_json(&V3.replace("noaux_tc", "group_limited_greedy")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config.json: `topk_method` `group_limited_greedy` is not supported for deepseek_v3 (only noaux_tc)"
        );
        let e = ModelSpec::from_json(&V3.replace(r#""scoring_func":"sigmoid""#, r#""scoring_func":"softmax""#))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config.json: `scoring_func` `softmax` is not supported for deepseek_v3 (only sigmoid)"
        );
        let e = ModelSpec::from_json(&V3.replace(r#""n_group":8"#, r#""n_group":7"#)).unwrap_err();
        assert!(e.to_string().contains("`n_group` must divide n_routed_experts (256), got 7"), "{e}");
        let e = ModelSpec::from_json(&V3.replace(r#""num_experts_per_tok":8"#, r#""num_experts_per_tok":200"#))
            .unwrap_err();
        assert!(e.to_string().contains("must be at most the experts of the topk_group (4) groups kept, 128"), "{e}");
    }

    #[test]
    fn moe_layer_freq_and_plain_query_projection() {
        let j = V3
            .replace(r#""moe_layer_freq":1"#, r#""moe_layer_freq":2"#)
            .replace(r#""q_lora_rank":1536"#, r#""q_lora_rank":null"#);
        let s = ModelSpec::from_json(&j).unwrap();
        assert_eq!(s.mla.unwrap().q_lora_rank, None);
        assert_eq!(&s.layer_mlps[2..6], &[LayerMlp::Dense, LayerMlp::Dense, LayerMlp::Moe, LayerMlp::Dense]);
    }

    /// DeepSeek-V2-Lite's config.json as the Hub ships it.
    const V2_LITE: &str = r#"{"architectures":["DeepseekV2ForCausalLM"],"model_type":"deepseek_v2",
        "vocab_size":102400,"hidden_size":2048,"intermediate_size":10944,"moe_intermediate_size":1408,
        "num_hidden_layers":27,"num_attention_heads":16,"num_key_value_heads":16,"n_shared_experts":2,
        "n_routed_experts":64,"routed_scaling_factor":1.0,"kv_lora_rank":512,"q_lora_rank":null,
        "qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,"topk_method":"greedy",
        "n_group":1,"topk_group":1,"num_experts_per_tok":6,"moe_layer_freq":1,"first_k_dense_replace":1,
        "norm_topk_prob":false,"scoring_func":"softmax","aux_loss_alpha":0.001,"seq_aux":true,
        "hidden_act":"silu","max_position_embeddings":163840,"rms_norm_eps":1e-6,"rope_theta":10000,
        "rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":40,"mscale":0.707,"mscale_all_dim":0.707,
          "original_max_position_embeddings":4096,"type":"yarn"},
        "attention_bias":false,"tie_word_embeddings":false,"torch_dtype":"bfloat16",
        "bos_token_id":100000,"eos_token_id":100001}"#;

    #[test]
    fn reads_deepseek_v2_lite_as_the_hub_ships_it() {
        let s = ModelSpec::from_json(V2_LITE).unwrap();
        let m = s.mla.unwrap();
        assert_eq!((m.q_lora_rank, m.cache_width()), (None, 576));
        assert!(m.rope_interleave);
        let want = (0.1 * 0.707 * 40f32.ln() + 1.0).powi(2) / 192f32.sqrt();
        assert!((m.softmax_scale - want).abs() < 1e-6, "{}", m.softmax_scale);
        // `greedy`: one group, every expert eligible.
        let routing = Routing::GroupLimited {
            scoring: GroupScoring::Softmax,
            groups: 1,
            topk_group: 1,
            renormalize: false,
            scale: 1.0,
        };
        assert_eq!(s.routing, routing);
        assert_eq!((s.num_experts, s.experts_per_token, s.expert_intermediate_size), (64, 6, 1408));
        assert_eq!((s.shared_expert_intermediate_size, s.mtp_layers), (Some(2816), 0));
        assert_eq!(&s.layer_mlps[..2], &[LayerMlp::Dense, LayerMlp::Moe]);

        let grouped = V2_LITE
            .replace(r#""topk_method":"greedy""#, r#""topk_method":"group_limited_greedy""#)
            .replace(r#""n_group":1,"topk_group":1"#, r#""n_group":8,"topk_group":3"#);
        let s = ModelSpec::from_json(&grouped).unwrap();
        assert!(matches!(
            s.routing,
            Routing::GroupLimited { scoring: GroupScoring::Softmax, groups: 8, topk_group: 3, .. }
        ));
    }

    #[test]
    fn deepseek_v2_refuses_what_its_router_does_not_do() {
        let refusal = |from: &str, to: &str| ModelSpec::from_json(&V2_LITE.replace(from, to)).unwrap_err().to_string();
        assert_eq!(
            refusal(r#""topk_method":"greedy""#, r#""topk_method":"noaux_tc""#),
            "config.json: `topk_method` `noaux_tc` is not supported for deepseek_v2 (only greedy, group_limited_greedy)"
        );
        assert_eq!(
            refusal(r#""scoring_func":"softmax""#, r#""scoring_func":"sigmoid""#),
            "config.json: `scoring_func` `sigmoid` is not supported for deepseek_v2 (only softmax)"
        );
        assert_eq!(
            refusal(r#""norm_topk_prob":false"#, r#""norm_topk_prob":true"#),
            "config.json: `norm_topk_prob` `true` is not supported for deepseek_v2 (its router does not normalise)"
        );
        let grouped_without_groups = V2_LITE
            .replace(r#""topk_method":"greedy""#, r#""topk_method":"group_limited_greedy""#)
            .replace(r#""n_group":1,"topk_group":1,"#, "");
        let e = ModelSpec::from_json(&grouped_without_groups).unwrap_err().to_string();
        assert_eq!(e, "config.json: `n_group` is missing");
        assert_eq!(
            refusal(r#""attention_bias":false"#, r#""attention_bias":false,"mlp_bias":true"#),
            "config.json: `mlp_bias` `true` is not supported for deepseek_v2"
        );
    }

    /// GLM-4.5-Air's config.json as the Hub ships it (transformers 4.x layout).
    const GLM_45_AIR: &str = r#"{"architectures":["Glm4MoeForCausalLM"],"model_type":"glm4_moe",
        "attention_bias":true,"head_dim":128,"hidden_act":"silu","hidden_size":4096,
        "partial_rotary_factor":0.5,"intermediate_size":10944,"max_position_embeddings":131072,
        "moe_intermediate_size":1408,"norm_topk_prob":true,"num_attention_heads":96,"n_group":1,
        "topk_group":1,"n_routed_experts":128,"n_shared_experts":1,"routed_scaling_factor":1.0,
        "num_experts_per_tok":8,"first_k_dense_replace":1,"num_hidden_layers":46,
        "num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":1000000,"num_nextn_predict_layers":1,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","use_qk_norm":false,"vocab_size":151552,
        "pad_token_id":151329,"eos_token_id":[151329,151336,151338]}"#;

    #[test]
    fn reads_glm_4_5_air_as_the_hub_ships_it() {
        let s = ModelSpec::from_json(GLM_45_AIR).unwrap();
        assert_eq!((s.mla, s.head_dim, s.rotary_dim, s.num_kv_heads), (None, 128, 64, 8));
        assert_eq!((s.qkv_bias, s.o_bias, s.qk_norm), (true, false, crate::config::QkNorm::None));
        assert_eq!(s.rope.theta, 1e6);
        let routing = Routing::GroupLimited {
            scoring: GroupScoring::Sigmoid,
            groups: 1,
            topk_group: 1,
            renormalize: true,
            scale: 1.0,
        };
        assert_eq!(s.routing, routing);
        assert_eq!((s.num_experts, s.experts_per_token, s.expert_intermediate_size), (128, 8, 1408));
        assert_eq!((s.shared_expert_intermediate_size, s.shared_expert_gated, s.mtp_layers), (Some(1408), false, 1));
        assert_eq!(&s.layer_mlps[..2], &[LayerMlp::Dense, LayerMlp::Moe]);
        // The per-head cache, as any GQA model's.
        assert_eq!(crate::kv_cache::KvPool::layout_for(&s).floats_per_token(), 46 * 2 * 8 * 128);

        let e = ModelSpec::from_json(
            &GLM_45_AIR.replace(r#""partial_rotary_factor":0.5"#, r#""partial_rotary_factor":1.5"#),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config.json: `partial_rotary_factor` must rotate an even number of at most head_dim (128) values, got 1.5 (192 values)"
        );
        let refusal =
            |from: &str, to: &str| ModelSpec::from_json(&GLM_45_AIR.replace(from, to)).unwrap_err().to_string();
        assert_eq!(
            refusal(r#""first_k_dense_replace":1"#, r#""first_k_dense_replace":1,"moe_layer_freq":2"#),
            "config.json: `moe_layer_freq` 2 is not supported for glm4_moe (every layer from first_k_dense_replace is MoE)"
        );
        assert_eq!(
            refusal(r#""n_group":1"#, r#""n_group":128"#),
            "config.json: `n_group` must leave at least 2 experts per group (128 experts), got 128"
        );
        // Another architecture's partial rotary factor would go unread.
        let mixtral = r#"{"model_type":"mixtral","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":4,"num_local_experts":2,"num_experts_per_tok":1,
            "partial_rotary_factor":0.5}"#;
        assert_eq!(
            ModelSpec::from_json(mixtral).unwrap_err().to_string(),
            "config.json: `partial_rotary_factor` 0.5 is not supported for mixtral (it rotates whole heads)"
        );
    }
}
