//! Maps each architecture's Hugging Face tensor names onto [`Model`](crate::Model) weights,
//! placing each on the model's backend as it is read (on the CPU the weights stay views into
//! the memory-mapped files).
//!
//! Expert weights come in the layouts the Hub ships: one tensor per expert
//! (`mlp.experts.N.gate_proj`, Mixtral's `block_sparse_moe.experts.N.w1`) or fused 3-D
//! tensors (`mlp.experts.gate_up_proj` `[E, 2I, H]`; gpt-oss `[E, H, 2I]` interleaved,
//! stored input-major and transposed here once).
//!
//! The small tensors (norms, biases, gates, attention sinks, FP8 scales) are checked to be
//! finite as they are read, naming the first bad one; the large ones (embeddings, attention
//! projections, experts) would take too long to scan, and a forward pass names the layer
//! whose activations they break.

use switchyard_kernels::quant::{MXFP4_BLOCK, MXFP4_BLOCK_BYTES, blocks_along};
use switchyard_kernels::{Backend, CpuBackend, DType, Format, HostBytes, Tensor, Weight};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Arch, ExpertActivation, GroupScoring, LayerMlp, ModelSpec, QkNorm, Quantization, Routing};
use crate::error::{ModelError, Result};
use crate::layers::{AttentionWeights, Mlp};
use crate::mla::LatentAttention;
use crate::model::{Attention, FeedForward, Layer};
use crate::moe::{Expert, ExpertLayer, MoeBlock, SharedExpert};

/// Which experts a process loads: all of them (single process) or a placement's share.
pub type ExpertFilter<'a> = &'a dyn Fn(usize, usize) -> bool;

/// Experts without any dense weight, in host memory: what an expert node reads from the
/// checkpoint before placing them on its device. `layers[l][e]` is `None` where not kept;
/// dense layers have no entries.
pub struct ExpertWeights {
    pub spec: ModelSpec,
    pub layers: Vec<Vec<Option<Expert>>>,
}

impl ExpertWeights {
    /// Bytes of the experts held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(Expert::size_in_bytes).sum()
    }
}

/// Opens the checkpoint in `dir` and maps just the experts `keep(layer, expert)` accepts,
/// reporting `progress(layers_done, layers_total)`. Nothing else of the checkpoint is read:
/// the experts are views into the memory-mapped files until first touched.
pub fn load_experts(
    dir: &std::path::Path,
    keep: ExpertFilter<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExpertWeights> {
    if !dir.is_dir() {
        return Err(ModelError::NotACheckpoint { path: dir.to_path_buf(), reason: "no such directory".into() });
    }
    let spec = ModelSpec::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let names = Names { ckpt: &ckpt, spec: &spec, backend: &CpuBackend };
    let mut layers = Vec::with_capacity(spec.num_layers);
    for l in 0..spec.num_layers {
        layers.push(match spec.layer_mlps[l] {
            LayerMlp::Dense => Vec::new(),
            LayerMlp::Moe => names.experts(&names.moe_prefix(l), &|x| keep(l, x))?,
        });
        progress(l + 1, spec.num_layers);
    }
    Ok(ExpertWeights { spec, layers })
}

/// Checks that every expert of `dir`'s checkpoint is there with its shape and format, reading
/// headers only, and returns the bytes of one expert (0 for a model without MoE layers).
/// Layouts that store each expert in its own tensors are checked expert by expert; fused
/// layouts (`[E, ...]` tensors) are checked once per layer, which covers every expert.
pub fn check_experts(dir: &std::path::Path) -> Result<usize> {
    let spec = ModelSpec::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let names = Names { ckpt: &ckpt, spec: &spec, backend: &CpuBackend };
    let mut one = 0;
    for l in (0..spec.num_layers).filter(|&l| spec.layer_mlps[l] == LayerMlp::Moe) {
        let p = names.moe_prefix(l);
        let per_expert = ["gate_proj", "w1"].iter().any(|g| ckpt.contains(&format!("{p}.experts.0.{g}.weight")));
        let experts = if per_expert { spec.num_experts } else { 1 };
        for x in 0..experts {
            let size = names.expert(&p, x)?.size_in_bytes();
            if one == 0 {
                one = size;
            }
        }
    }
    Ok(one)
}

pub(crate) struct Names<'a> {
    pub ckpt: &'a Checkpoint,
    pub spec: &'a ModelSpec,
    /// Where the weights go as they are read.
    pub backend: &'a dyn Backend,
}

impl Names<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<checkpoint::Tensor> {
        self.ckpt.get(name)?.expect_shape(shape)
    }

    /// A small vector (a norm's weights, attention sinks), checked to be finite.
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let v = self.tensor(name, &[len])?.to_f32_vec()?;
        checkpoint::check_finite(name, &v)?;
        Ok(self.backend.upload(&v, 1, len)?)
    }

    fn weight(&self, w: &checkpoint::Tensor, bias: Option<&checkpoint::Tensor>) -> Result<Weight> {
        self.place(w.to_weight(bias)?)
    }

    /// A host weight on the model's backend.
    pub(crate) fn place(&self, w: Weight) -> Result<Weight> {
        Ok(self.backend.upload_weight(&w)?)
    }

    /// The linear layer `prefix` (`[out, in]`) on the model's backend: see
    /// [`Names::host_linear`].
    pub(crate) fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Weight> {
        self.place(self.host_linear(prefix, out, inp, bias)?)
    }

    /// The linear layer `prefix` (`[out, in]`) in host memory: dense, or FP8 with its
    /// `weight_scale_inv` where the checkpoint quantized it. Its bias and scales are checked
    /// to be finite.
    pub(crate) fn host_linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Weight> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out])?.expect_finite()?) } else { None };
        if w.dtype() != DType::F8E4M3 {
            return w.to_weight(b.as_ref());
        }
        let Some(Quantization::Fp8 { block }) = self.spec.quantization else {
            return Err(self.undeclared(w.name(), "fp8"));
        };
        let format = Format::Fp8 { block };
        let expected = [blocks_along(out, block[0]), blocks_along(inp, block[1])];
        let scales = self.quantized(&format!("{prefix}.weight_scale_inv"), &expected, DType::F32, format)?;
        let values = scales.to_f32_vec()?;
        checkpoint::check_finite(scales.name(), &values)?;
        let scales: Vec<u8> = values.iter().flat_map(|s| s.to_le_bytes()).collect();
        let bias = b.as_ref().map(checkpoint::Tensor::to_f32_vec).transpose()?;
        Ok(Weight::host_with_scales(format, out, inp, (w.host_bytes(), Some(HostBytes::copy_of(&scales))), bias)?)
    }

    /// A quantized checkpoint's data or scale tensor, checked against the shape and dtype
    /// `format` needs.
    fn quantized(&self, name: &str, shape: &[usize], dtype: DType, format: Format) -> Result<checkpoint::Tensor> {
        let t = self.ckpt.get(name)?;
        if t.shape() != shape || t.dtype() != dtype {
            let format = match format {
                Format::Fp8 { block } => format!("FP8 with {}x{} blocks", block[0], block[1]),
                f => f.name().to_string(),
            };
            return Err(ModelError::QuantizedShape {
                tensor: name.to_string(),
                expected: format!("shape {shape:?} of {} for {format}", dtype.name()),
                got: format!("shape {:?} of {}", t.shape(), t.dtype().name()),
            });
        }
        Ok(t)
    }

    fn undeclared(&self, tensor: &str, format: &'static str) -> ModelError {
        let declared = match &self.spec.quantization {
            None => "no quantization_config".to_string(),
            Some(Quantization::Mxfp4) => "quant_method mxfp4".to_string(),
            Some(Quantization::Fp8 { .. }) => "quant_method fp8".to_string(),
        };
        ModelError::UndeclaredQuantization { tensor: tensor.to_string(), format, declared }
    }

    /// Expert `x` of an MXFP4 projection `stem` (`{stem}_blocks` `[E, rows, cols/32, 16]`,
    /// `{stem}_scales` `[E, rows, cols/32]`, `{stem}_bias` `[E, rows]`), kept packed; `cols`
    /// is a multiple of 32 (checked by the caller, naming the projection).
    fn mxfp4(&self, stem: &str, x: usize, rows: usize, cols: usize) -> Result<Weight> {
        let blocks_name = format!("{stem}_blocks");
        if self.spec.quantization != Some(Quantization::Mxfp4) {
            return Err(self.undeclared(&blocks_name, "mxfp4"));
        }
        let (e, nb) = (self.spec.num_experts, cols / MXFP4_BLOCK);
        let blocks = self.quantized(&blocks_name, &[e, rows, nb, MXFP4_BLOCK_BYTES], DType::U8, Format::Mxfp4)?;
        let scales = self.quantized(&format!("{stem}_scales"), &[e, rows, nb], DType::U8, Format::Mxfp4)?;
        let bias = self.tensor(&format!("{stem}_bias"), &[e, rows])?.index(x).expect_finite()?.to_f32_vec()?;
        let parts = (blocks.index(x).host_bytes(), Some(scales.index(x).host_bytes()));
        Ok(self.backend.upload_weight(&Weight::host_with_scales(Format::Mxfp4, rows, cols, parts, Some(bias))?)?)
    }

    pub fn embed(&self) -> Result<Weight> {
        let t = self.tensor("model.embed_tokens.weight", &[self.spec.vocab_size, self.spec.hidden_size])?;
        self.weight(&t, None)
    }

    pub fn final_norm(&self) -> Result<Tensor> {
        self.vector("model.norm.weight", self.spec.hidden_size)
    }

    pub fn lm_head(&self) -> Result<Weight> {
        let s = self.spec;
        if s.tie_word_embeddings && !self.ckpt.contains("lm_head.weight") {
            return self.embed();
        }
        self.linear("lm_head", s.vocab_size, s.hidden_size, false)
    }

    pub fn layer(&self, l: usize, keep: ExpertFilter<'_>) -> Result<Layer> {
        let s = self.spec;
        let p = format!("model.layers.{l}");
        Ok(Layer {
            input_norm: self.vector(&format!("{p}.input_layernorm.weight"), s.hidden_size)?,
            attention: match s.mla {
                Some(_) => Attention::Latent(LatentAttention::load(self, l)?),
                None => Attention::PerHead(self.attention(l)?),
            },
            post_norm: self.vector(&format!("{p}.post_attention_layernorm.weight"), s.hidden_size)?,
            ffn: match s.layer_mlps[l] {
                LayerMlp::Dense => FeedForward::Dense(self.mlp(&format!("{p}.mlp"), s.dense_intermediate_size)?),
                LayerMlp::Moe => FeedForward::Moe(self.moe(l, keep)?),
            },
        })
    }

    fn attention(&self, l: usize) -> Result<AttentionWeights> {
        let s = self.spec;
        let p = format!("model.layers.{l}.self_attn");
        let (h, q_out, kv_out) = (s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        // Partial rotary embedding (GLM-4.5): each head's values are reordered in q and k alike
        // (which leaves every score q · k as it is) so that the rotated ones sit at the pairs
        // the RoPE tables rotate, and the others at pairs the tables leave alone.
        let order = (s.rotary_dim < s.head_dim).then(|| partial_rope_order(s.head_dim, s.rotary_dim));
        let per_head = |name: &str, heads: usize| -> Result<Weight> {
            let w = self.host_linear(&format!("{p}.{name}"), heads * s.head_dim, h, s.qkv_bias)?;
            match &order {
                Some(order) => {
                    let rows: Vec<usize> =
                        (0..heads).flat_map(|i| order.iter().map(move |&j| i * s.head_dim + j)).collect();
                    self.place(w.select_rows(&rows)?)
                }
                None => self.place(w),
            }
        };
        let head_norm = |name: &str| -> Result<Tensor> {
            let name = format!("{p}.{name}.weight");
            let v = self.tensor(&name, &[s.head_dim])?.to_f32_vec()?;
            checkpoint::check_finite(&name, &v)?;
            let v: Vec<f32> = match &order {
                Some(order) => order.iter().map(|&j| v[j]).collect(),
                None => v,
            };
            Ok(self.backend.upload(&v, 1, s.head_dim)?)
        };
        let (q_norm, k_norm) = match s.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(head_norm("q_norm")?), Some(head_norm("k_norm")?)),
            QkNorm::Full => (
                Some(self.vector(&format!("{p}.q_norm.weight"), q_out)?),
                Some(self.vector(&format!("{p}.k_norm.weight"), kv_out)?),
            ),
        };
        Ok(AttentionWeights {
            q: per_head("q_proj", s.num_heads)?,
            k: per_head("k_proj", s.num_kv_heads)?,
            v: self.linear(&format!("{p}.v_proj"), kv_out, h, s.qkv_bias)?,
            o: self.linear(&format!("{p}.o_proj"), h, q_out, s.o_bias)?,
            q_norm,
            k_norm,
            sinks: if s.attention_sinks { Some(self.vector(&format!("{p}.sinks"), s.num_heads)?) } else { None },
            sliding_window: s.sliding_windows[l],
        })
    }

    fn mlp(&self, p: &str, width: usize) -> Result<Mlp> {
        let h = self.spec.hidden_size;
        Ok(Mlp {
            gate: self.linear(&format!("{p}.gate_proj"), width, h, false)?,
            up: self.linear(&format!("{p}.up_proj"), width, h, false)?,
            down: self.linear(&format!("{p}.down_proj"), h, width, false)?,
        })
    }

    /// The MoE module's prefix: `mlp` (transformers 5 and Qwen/OLMoE/gpt-oss) or Mixtral's
    /// `block_sparse_moe`.
    fn moe_prefix(&self, l: usize) -> String {
        let legacy = format!("model.layers.{l}.block_sparse_moe");
        if self.ckpt.contains(&format!("{legacy}.gate.weight")) { legacy } else { format!("model.layers.{l}.mlp") }
    }

    fn moe(&self, l: usize, keep: ExpertFilter<'_>) -> Result<MoeBlock> {
        let s = self.spec;
        let p = self.moe_prefix(l);
        let e = s.num_experts;
        let gate = match s.arch {
            Arch::GptOss => self.gate(&format!("{p}.router"), e, s.router_bias)?,
            _ => self.gate(&format!("{p}.gate"), e, false)?,
        };
        // DeepSeek-V3: a per-expert bias added to the scores for the choice only.
        let choice_bias = match s.routing {
            Routing::GroupLimited { scoring: GroupScoring::Sigmoid, .. } => {
                let name = format!("{p}.gate.e_score_correction_bias");
                let v = self.tensor(&name, &[e])?.to_f32_vec()?;
                checkpoint::check_finite(&name, &v)?;
                Some(v)
            }
            _ => None,
        };
        let keep_layer = |x: usize| keep(l, x);
        let experts = self.experts(&p, &keep_layer)?;
        let shared = match s.shared_expert_intermediate_size {
            Some(width) if s.shared_expert_gated => Some(SharedExpert {
                mlp: self.mlp(&format!("{p}.shared_expert"), width)?,
                gate: Some(self.gate(&format!("{p}.shared_expert_gate"), 1, false)?),
            }),
            Some(width) => Some(SharedExpert { mlp: self.mlp(&format!("{p}.shared_experts"), width)?, gate: None }),
            None => None,
        };
        Ok(MoeBlock {
            gate,
            routing: s.routing,
            choice_bias,
            top_k: s.experts_per_token,
            experts: ExpertLayer::new(self.backend, s.activation, experts)?,
            shared,
        })
    }

    /// A gate (`[out, hidden]`: a router's, a shared expert's), small enough to check every
    /// weight is finite at load time.
    fn gate(&self, prefix: &str, out: usize, bias: bool) -> Result<Weight> {
        self.tensor(&format!("{prefix}.weight"), &[out, self.spec.hidden_size])?.expect_finite()?;
        self.linear(prefix, out, self.spec.hidden_size, bias)
    }

    /// The experts of the MoE layer at `p` that `keep(expert)` accepts.
    fn experts(&self, p: &str, keep: &dyn Fn(usize) -> bool) -> Result<Vec<Option<Expert>>> {
        (0..self.spec.num_experts).map(|x| if keep(x) { self.expert(p, x).map(Some) } else { Ok(None) }).collect()
    }

    fn expert(&self, p: &str, x: usize) -> Result<Expert> {
        let s = self.spec;
        let (h, i, e) = (s.hidden_size, s.expert_intermediate_size, s.num_experts);
        let fused = format!("{p}.experts.gate_up_proj");
        if self.ckpt.contains(&format!("{fused}_blocks")) {
            // gpt-oss as the Hub ships it: MXFP4 `[E, out, in/32, 16]`, rows output-major
            // (gate/up interleaved).
            let down = format!("{p}.experts.down_proj");
            for (stem, cols) in [(&fused, h), (&down, i)] {
                if !cols.is_multiple_of(MXFP4_BLOCK) {
                    return Err(ModelError::Config {
                        field: "hidden_size / intermediate_size",
                        problem: format!(
                            "MXFP4 rows of {cols} values in `{stem}_blocks` are not whole 32-value blocks"
                        ),
                    });
                }
            }
            return Ok(Expert::Interleaved {
                gate_up: self.mxfp4(&fused, x, 2 * i, h)?,
                down: self.mxfp4(&down, x, h, i)?,
            });
        }
        if let ExpertActivation::ClampedSwiGlu { .. } = s.activation {
            // gpt-oss: [E, H, 2I] and [E, I, H], input-major.
            let gate_up = self.tensor(&fused, &[e, h, 2 * i])?.index(x).transposed();
            let gate_up_bias = self.tensor(&format!("{fused}_bias"), &[e, 2 * i])?.index(x).expect_finite()?;
            let down_name = format!("{p}.experts.down_proj");
            let down = self.tensor(&down_name, &[e, i, h])?.index(x).transposed();
            let down_bias = self.tensor(&format!("{down_name}_bias"), &[e, h])?.index(x).expect_finite()?;
            return Ok(Expert::Interleaved {
                gate_up: self.weight(&gate_up, Some(&gate_up_bias))?,
                down: self.weight(&down, Some(&down_bias))?,
            });
        }
        for (g, u, d) in [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")] {
            let ep = format!("{p}.experts.{x}");
            if self.ckpt.contains(&format!("{ep}.{g}.weight")) {
                return Ok(Expert::SwiGlu {
                    gate: self.linear(&format!("{ep}.{g}"), i, h, false)?,
                    up: self.linear(&format!("{ep}.{u}"), i, h, false)?,
                    down: self.linear(&format!("{ep}.{d}"), h, i, false)?,
                });
            }
        }
        if self.ckpt.contains(&fused) {
            // transformers 5 fused layout: [E, 2I, H] (gate rows, then up rows) and [E, H, I].
            let gate_up = self.tensor(&fused, &[e, 2 * i, h])?.index(x);
            let down = self.tensor(&format!("{p}.experts.down_proj"), &[e, h, i])?.index(x);
            return Ok(Expert::SwiGlu {
                gate: self.weight(&gate_up.rows(0, i), None)?,
                up: self.weight(&gate_up.rows(i, 2 * i), None)?,
                down: self.weight(&down, None)?,
            });
        }
        Err(ModelError::MissingTensor(format!("{p}.experts.{x}.gate_proj.weight (or {fused})")))
    }
}

/// A head's values in the order partial rotary embedding reads them: RoPE rotates the first
/// `rotary_dim` values as halves (`x[i]` with `x[i + rotary_dim / 2]`), the tables rotate
/// `x[i]` with `x[i + head_dim / 2]` for the first `rotary_dim / 2` pairs only. Position `n` of
/// the result is the checkpoint's value `order[n]`: the rotated halves at the rotated pairs,
/// the unrotated values at the rest.
fn partial_rope_order(head_dim: usize, rotary_dim: usize) -> Vec<usize> {
    let (half, r) = (head_dim / 2, rotary_dim / 2);
    (0..r)
        .chain(rotary_dim..rotary_dim + half - r)
        .chain(r..rotary_dim)
        .chain(rotary_dim + half - r..head_dim)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_rope_order_puts_each_rotated_pair_where_the_tables_rotate() {
        // head_dim 16, rotary 8: the checkpoint rotates (i, i + 4) for i < 4; the tables rotate
        // (n, n + 8) for n < 4 and leave n in 4..8 (and n + 8) alone.
        let order = partial_rope_order(16, 8);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "a permutation");
        for i in 0..4 {
            assert_eq!((order[i], order[i + 8]), (i, i + 4), "rotated pair {i}");
        }
        assert!(order[4..8].iter().chain(&order[12..]).all(|&j| j >= 8), "only unrotated values at unrotated pairs");
        assert_eq!(partial_rope_order(16, 16), (0..16).collect::<Vec<_>>());
    }
}
