//! DeepSeek's multi-head latent attention (MLA): its weights as the loader arranges them, and
//! one layer's attention over the latent KV cache.
//!
//! The cache holds, per token and layer, the normalised `kv_lora_rank` latent and the
//! rotated `qk_rope_head_dim` key shared by all heads — nothing per head. The backend's
//! `mla_attention` either folds each head's key up-projection into its query (decode: the
//! cache is never expanded) or expands the cached rows per head (a prompt's first chunk, and
//! later chunks long enough that expanding costs less).
//!
//! The checkpoint's projections are split at load into the parts the pass uses, by rows: the
//! queries' unrotated and rotated halves, the latent and the rotated key of
//! `kv_a_proj_with_mqa`, each head's key and value up-projections of `kv_b_proj`. Where the
//! checkpoint rotates interleaved pairs (`rope_interleave`), the rotated rows are taken evens
//! first, then odds: rotating halves of that order pairs the same values with the same
//! angles, and the scores (dot products of rotated queries and keys) come out the same.

use switchyard_kernels::backend::{KvBatch, Mla, MlaForm};
use switchyard_kernels::{Device, Format, Tensor, Weight};

use crate::config::{MlaSpec, ModelSpec};
use crate::error::{ModelError, Result};
use crate::layers::Exec;
use crate::loader::Names;

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers and DeepSeek's own code
/// build them with the norm's default, not the config's `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// How the queries are projected: `q_proj`, or `q_a_proj` → `q_a_layernorm` → `q_b_proj`;
/// the last projection split into its unrotated and rotated rows.
pub struct QueryProjection {
    /// `q_a_proj` and `q_a_layernorm` where the checkpoint has a `q_lora_rank`.
    pub down: Option<(Weight, Tensor)>,
    pub nope: Weight,
    pub rope: Weight,
}

/// One MLA layer's weights.
pub struct LatentAttention {
    pub q: QueryProjection,
    /// `kv_a_proj_with_mqa`'s latent rows and its rotated-key rows.
    pub kv_latent: Weight,
    pub kv_rope: Weight,
    pub kv_norm: Tensor,
    /// Per head, from `kv_b_proj`: the key up-projection `[nope, rank]`, the same transposed
    /// `[rank, nope]`, the value up-projection `[v, rank]`.
    pub uk: Vec<Weight>,
    pub uk_t: Vec<Weight>,
    pub uv: Vec<Weight>,
    pub o: Weight,
}

/// The order in which a head's `n` rotated rows are taken: as stored, or, for interleaved
/// pairs, evens then odds.
fn rope_rows(n: usize, interleaved: bool) -> Vec<usize> {
    if interleaved { (0..n).step_by(2).chain((1..n).step_by(2)).collect() } else { (0..n).collect() }
}

impl LatentAttention {
    /// Reads layer `l`'s attention through `names`.
    pub(crate) fn load(names: &Names<'_>, l: usize) -> Result<Self> {
        let s = names.spec;
        let m = s.mla.expect("an MLA model");
        let p = format!("model.layers.{l}.self_attn");
        let (h, heads) = (s.hidden_size, s.num_heads);
        let (dn, dr, dv, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank);
        let rope = rope_rows(dr, m.rope_interleave);
        let dq = dn + dr;
        let nope_rows: Vec<usize> = (0..heads).flat_map(|i| (0..dn).map(move |j| i * dq + j)).collect();
        let rope_rows: Vec<usize> = (0..heads).flat_map(|i| rope.iter().map(move |&j| i * dq + dn + j)).collect();
        let split = |w: &Weight| -> Result<(Weight, Weight)> {
            Ok((names.place(w.select_rows(&nope_rows)?)?, names.place(w.select_rows(&rope_rows)?)?))
        };
        let bias = s.o_bias;
        let q = match m.q_lora_rank {
            None => {
                let (nope, rope) = split(&names.host_linear(&format!("{p}.q_proj"), heads * dq, h, false)?)?;
                QueryProjection { down: None, nope, rope }
            }
            Some(q_rank) => {
                let (nope, rope) = split(&names.host_linear(&format!("{p}.q_b_proj"), heads * dq, q_rank, false)?)?;
                let a = names.linear(&format!("{p}.q_a_proj"), q_rank, h, bias)?;
                let norm = names.vector(&format!("{p}.q_a_layernorm.weight"), q_rank)?;
                QueryProjection { down: Some((a, norm)), nope, rope }
            }
        };
        let kv_a = names.host_linear(&format!("{p}.kv_a_proj_with_mqa"), r + dr, h, bias)?;
        let kv_latent = names.place(kv_a.select_rows(&(0..r).collect::<Vec<_>>())?)?;
        let kv_rope = names.place(kv_a.select_rows(&rope.iter().map(|&j| r + j).collect::<Vec<_>>())?)?;

        let kv_b = names.host_linear(&format!("{p}.kv_b_proj"), heads * (dn + dv), r, false)?;
        // The transposed key up-projections are made from the decoded values: in the
        // checkpoint's dense format (exact), or `f32` where it is quantized.
        let t_format = if kv_b.format().is_quantized() { Format::F32 } else { kv_b.format() };
        let (mut uk, mut uk_t, mut uv) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..heads {
            let base = i * (dn + dv);
            let k = kv_b.select_rows(&(base..base + dn).collect::<Vec<_>>())?;
            let values = k.view().expect("a host weight").to_f32_vec();
            let t: Vec<f32> = (0..r).flat_map(|c| values.iter().skip(c).step_by(r).copied()).collect();
            uk_t.push(names.place(Weight::from_f32(t_format, r, dn, &t, None)?)?);
            uk.push(names.place(k)?);
            uv.push(names.place(kv_b.select_rows(&(base + dn..base + dn + dv).collect::<Vec<_>>())?)?);
        }
        Ok(LatentAttention {
            q,
            kv_latent,
            kv_rope,
            kv_norm: names.vector(&format!("{p}.kv_a_layernorm.weight"), r)?,
            uk,
            uk_t,
            uv,
            o: names.linear(&format!("{p}.o_proj"), h, heads * dv, bias)?,
        })
    }

    /// The layer's attention over the rows of `h` (already normalised): writes their cache
    /// rows and returns the output projection's rows.
    pub fn forward(&self, exec: &Exec, spec: &ModelSpec, step: Step<'_, '_>, h: &Tensor) -> Result<Tensor> {
        let ops = exec.ops();
        let m: MlaSpec = spec.mla.expect("an MLA model");
        let (q_nope, mut q_rope) = match &self.q.down {
            None => (exec.linear(h, &self.q.nope)?, exec.linear(h, &self.q.rope)?),
            Some((a, norm)) => {
                let mut qa = exec.linear(h, a)?;
                ops.rms_norm_inplace(&mut qa, norm, LATENT_NORM_EPS)?;
                (exec.linear(&qa, &self.q.nope)?, exec.linear(&qa, &self.q.rope)?)
            }
        };
        let mut latent = exec.linear(h, &self.kv_latent)?;
        ops.rms_norm_inplace(&mut latent, &self.kv_norm, LATENT_NORM_EPS)?;
        let mut k_rope = exec.linear(h, &self.kv_rope)?;
        ops.rope(&mut q_rope, step.cos, step.sin, spec.num_heads)?;
        ops.rope(&mut k_rope, step.cos, step.sin, 1)?;
        ops.mla_write(step.arena, step.batch, step.layer, &latent, &k_rope)?;
        // The up-projections the pass reads: the absorbed form's unless it is told to expand
        // (`Auto` expands only prompt chunks, whose floor is not what the figures are for).
        let uk = if step.form == MlaForm::Expanded { &self.uk } else { &self.uk_t };
        exec.add([uk, &self.uv].iter().flat_map(|ws| ws.iter()).map(Weight::size_in_bytes).sum());
        let params = Mla {
            layer: step.layer,
            heads: spec.num_heads,
            rank: m.kv_lora_rank,
            rope: m.qk_rope_head_dim,
            nope: m.qk_nope_head_dim,
            v: m.v_head_dim,
            scale: m.softmax_scale,
            form: step.form,
            uk: &self.uk,
            uk_t: &self.uk_t,
            uv: &self.uv,
        };
        let o = ops.mla_attention(&q_nope, &q_rope, step.arena, step.batch, params)?;
        exec.linear(&o, &self.o)
    }

    pub fn size_in_bytes(&self) -> usize {
        let down = self.q.down.as_ref().map_or(0, |(a, _)| a.size_in_bytes());
        let q = down + self.q.nope.size_in_bytes() + self.q.rope.size_in_bytes();
        let per_head: usize =
            [&self.uk, &self.uk_t, &self.uv].iter().flat_map(|ws| ws.iter()).map(Weight::size_in_bytes).sum();
        q + self.kv_latent.size_in_bytes() + self.kv_rope.size_in_bytes() + per_head + self.o.size_in_bytes()
    }
}

/// What one forward pass hands each MLA layer.
pub struct Step<'a, 'b> {
    pub layer: usize,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub arena: &'a mut Tensor,
    pub batch: &'b KvBatch,
    pub form: MlaForm,
}

/// Refuses an MLA model on a device whose backend has no MLA attention.
pub fn check_device(spec: &ModelSpec, device: Device) -> Result<()> {
    if spec.mla.is_some() && device != Device::Cpu {
        return Err(ModelError::UnsupportedOnDevice {
            what: format!("{}'s multi-head latent attention", spec.arch.model_type()),
            device: device.to_string(),
        });
    }
    Ok(())
}
