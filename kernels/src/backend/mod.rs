//! [`Backend`]: the operations one forward pass needs, implemented once per device. The model
//! is written against this trait alone; [`open`] returns the backend of a [`Device`].
//!
//! - [`CpuBackend`]: host memory, the kernels of [`crate::cpu`] (always built).
//! - [`CudaBackend`]: one CUDA device (feature `cuda`). Without the feature it is a stub that
//!   cannot be opened and whose every operation returns [`KernelError::NotCompiledWithCuda`].
//!
//! Every operation checks its arguments' shapes, element types and devices at its boundary
//! and returns an error naming the argument that is wrong; none can write outside a buffer.
//! Index arguments (token ids, routed rows, KV-cache blocks) are checked on the host before a
//! device reads them.
//!
//! # Layout
//! - this module: the trait and the plain data its operations take.
//! - [`cpu`]: the [`CpuBackend`] type.
//! - `cuda` (feature `cuda`) or `stub`: [`CudaBackend`].

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod stub;

use std::sync::Arc;

pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
#[cfg(not(feature = "cuda"))]
pub use stub::CudaBackend;

use crate::cpu::Precision;
use crate::error::{KernelError, Result};
use crate::{Device, Tensor, Weight};

/// Opens the backend of `device`: the CPU, or a CUDA device (which must exist, and this build
/// must have the `cuda` feature).
pub fn open(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend)),
        Device::Cuda(n) => Ok(Arc::new(CudaBackend::open(n)?)),
    }
}

/// How a MoE gate turns logits into each token's experts and weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Softmax over all experts, keep the top k, optionally renormalise them (Mixtral,
    /// Qwen-MoE, OLMoE).
    SoftmaxTopK { renormalize: bool },
    /// Top k logits, then softmax over those k (gpt-oss).
    TopKSoftmax,
}

/// The gate's choice for `tokens` rows: `k` experts each, best first, and their weights,
/// token-major (`ids[t * k + j]`).
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One projection of a MoE layer's experts, addressed by slot (`None`: an expert not held),
/// as [`Backend::grouped_linear`] takes it. It keeps its weights alive.
pub struct Grouped {
    pub(crate) slots: Vec<Option<Weight>>,
    /// The device's table of the slots' addresses, where the backend needs one.
    #[cfg(feature = "cuda")]
    pub(crate) table: Option<crate::cuda::GroupedWeights>,
}

impl Grouped {
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Output and input features of every held slot's matrix.
    pub fn shape(&self) -> Option<(usize, usize)> {
        self.slots.iter().flatten().next().map(|w| (w.rows(), w.cols()))
    }

    pub fn is_held(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(Option::is_some)
    }

    /// The weight of `slot`, if held.
    pub fn weight(&self, slot: usize) -> Option<&Weight> {
        self.slots.get(slot).and_then(Option::as_ref)
    }
}

/// How [`Backend::combine_rows`] sums expert outputs back into token rows: token `t`'s
/// output is `Σ weight[j] · y[src[j]]` over `j` in `start[t] .. start[t + 1]`, in that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Combine {
    pub start: Vec<u32>,
    pub src: Vec<u32>,
    pub weight: Vec<f32>,
}

impl Combine {
    /// Token rows of the output.
    pub fn tokens(&self) -> usize {
        self.start.len().saturating_sub(1)
    }

    /// Checks the lists against `y_rows` rows of expert outputs.
    pub(crate) fn check(&self, op: &'static str, y_rows: usize) -> Result<()> {
        let bad = |message: String| Err(KernelError::OutOfRange { op, message });
        if self.start.first() != Some(&0) || self.start.windows(2).any(|w| w[0] > w[1]) {
            return bad("`start` must begin at 0 and never decrease".into());
        }
        let entries = *self.start.last().unwrap_or(&0) as usize;
        if entries != self.src.len() || entries != self.weight.len() {
            return bad(format!(
                "`start` ends at {entries} but there are {} sources and {} weights",
                self.src.len(),
                self.weight.len()
            ));
        }
        if let Some(&r) = self.src.iter().find(|&&r| r as usize >= y_rows) {
            return bad(format!("source row {r} of {y_rows} expert output rows"));
        }
        Ok(())
    }
}

/// Positions one KV-cache block holds.
pub const BLOCK_TOKENS: usize = 16;

/// The shape of a paged KV cache. Its arena is a tensor of one row per block; a block holds
/// [`BLOCK_TOKENS`] positions of every layer's cache rows, `[layer][kv_head][plane][position][head_dim]`:
/// keys and values (two planes) per KV head, or MLA's one latent row per position
/// ([`KvLayout::latent`]: one "head", one plane, read as keys and, its first columns, values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// 2 (keys and values) or 1 (MLA's latent).
    pub planes: usize,
}

impl KvLayout {
    /// Keys and values of `kv_heads` heads of `head_dim` per layer.
    pub const fn per_head(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        KvLayout { layers, kv_heads, head_dim, planes: 2 }
    }

    /// MLA: one row of `width` values per layer and position (the compressed latent and the
    /// shared rotary key), whatever the number of heads.
    pub const fn latent(layers: usize, width: usize) -> Self {
        KvLayout { layers, kv_heads: 1, head_dim: width, planes: 1 }
    }

    pub fn is_latent(&self) -> bool {
        self.planes == 1
    }

    /// Values of one block.
    pub fn block_floats(&self) -> usize {
        self.layers * self.kv_heads * self.planes * BLOCK_TOKENS * self.head_dim
    }

    /// Values one position takes in every layer.
    pub fn floats_per_token(&self) -> usize {
        self.block_floats() / BLOCK_TOKENS
    }

    /// Offset in a block of `layer`, KV head `g`, keys (`kv = 0`) or values (`1`).
    pub(crate) fn offset(&self, layer: usize, g: usize, kv: usize) -> usize {
        ((layer * self.kv_heads + g) * self.planes + kv) * BLOCK_TOKENS * self.head_dim
    }
}

/// One sequence's new tokens in a forward pass: `tokens` rows at positions
/// `first_pos ..`, cached in `blocks` (in position order).
#[derive(Clone, Copy, Debug)]
pub struct SeqSpan<'a> {
    pub tokens: usize,
    pub first_pos: usize,
    pub blocks: &'a [u32],
}

/// A forward pass's sequences in the KV cache, checked against the arena once and prepared
/// for every layer ([`Backend::kv_batch`]).
pub struct KvBatch {
    pub(crate) layout: KvLayout,
    pub(crate) arena_blocks: usize,
    /// Per sequence: first row, rows, first position, blocks.
    pub(crate) seqs: Vec<(usize, usize, usize, Vec<u32>)>,
    pub(crate) tokens: usize,
    /// The device's copies of the per-token positions and block tables.
    #[cfg(feature = "cuda")]
    pub(crate) tables: Option<crate::cuda::DeviceTables>,
}

impl std::fmt::Debug for KvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvBatch({} sequences, {} tokens)", self.seqs.len(), self.tokens)
    }
}

impl KvBatch {
    /// Checks `spans` against an arena of `arena_blocks` blocks of `layout`.
    pub(crate) fn new(layout: KvLayout, arena: &Tensor, spans: &[SeqSpan<'_>]) -> Result<Self> {
        let op = "kv_batch";
        arena.expect(op, "arena", arena.rows(), layout.block_floats())?;
        let mut seqs = Vec::with_capacity(spans.len());
        let mut row = 0;
        for s in spans {
            let end = s.first_pos + s.tokens;
            if s.blocks.len() * BLOCK_TOKENS < end {
                return Err(KernelError::OutOfRange {
                    op,
                    message: format!(
                        "positions up to {end} need {} blocks, {} given",
                        end.div_ceil(BLOCK_TOKENS),
                        s.blocks.len()
                    ),
                });
            }
            if let Some(&b) = s.blocks.iter().find(|&&b| b as usize >= arena.rows()) {
                return Err(KernelError::OutOfRange {
                    op,
                    message: format!("block {b} of an arena of {}", arena.rows()),
                });
            }
            seqs.push((row, s.tokens, s.first_pos, s.blocks[..end.div_ceil(BLOCK_TOKENS)].to_vec()));
            row += s.tokens;
        }
        Ok(KvBatch {
            layout,
            arena_blocks: arena.rows(),
            seqs,
            tokens: row,
            #[cfg(feature = "cuda")]
            tables: None,
        })
    }

    /// New tokens of all sequences.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Checks `arena` is the arena this batch was checked against.
    pub(crate) fn check_arena(&self, op: &'static str, arena: &Tensor) -> Result<()> {
        arena.expect(op, "arena", self.arena_blocks, self.layout.block_floats())
    }
}

/// Attention options of one layer.
#[derive(Clone, Copy, Debug)]
pub struct Attention<'a> {
    pub layer: usize,
    pub heads: usize,
    pub scale: f32,
    /// Positions a query sees: `pos - window + 1 ..= pos`.
    pub sliding_window: Option<usize>,
    /// One logit per query head in the softmax denominator (gpt-oss).
    pub sinks: Option<&'a Tensor>,
}

/// How [`Backend::mla_attention`] computes: the two forms give the same result up to rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MlaForm {
    /// Per sequence, whichever form costs fewer multiply-adds: absorbed where the cache holds
    /// many more rows than the call adds (decode), expanded where it holds few (a prompt's
    /// first chunk) or the call adds many (in V3's shape, more than about 170 rows).
    #[default]
    Auto,
    /// The key up-projection folded into the query and the value up-projection applied after
    /// attention: every head attends over the latent rows themselves (FlashMLA's form).
    Absorbed,
    /// Keys and values expanded per head from every cached latent row, then attention per head.
    Expanded,
}

/// One MLA layer's attention (DeepSeek-V2/V3): its cache rows are `rank` latent values
/// followed by `rope` rotated key values, shared by every head. Head `h`'s key up-projection
/// `uk[h]` is `[nope, rank]`, its value up-projection `uv[h]` `[v, rank]`, and `uk_t[h]`
/// is `uk[h]` transposed (`[rank, nope]`, for the absorbed form).
#[derive(Clone, Copy, Debug)]
pub struct Mla<'a> {
    pub layer: usize,
    pub heads: usize,
    pub rank: usize,
    pub rope: usize,
    pub nope: usize,
    pub v: usize,
    /// Multiplies `q · k` before the softmax.
    pub scale: f32,
    pub form: MlaForm,
    pub uk: &'a [Weight],
    pub uk_t: &'a [Weight],
    pub uv: &'a [Weight],
}

/// The operations of a forward pass on one device. Tensors and weights passed in must live on
/// this backend's device; results do.
pub trait Backend: Send + Sync {
    /// The device this backend runs on.
    fn device(&self) -> Device;

    /// The device for logs and benchmark tables (`cpu (avx512, 2 threads)`, `cuda:0 (…)`).
    fn describe(&self) -> String;

    // ---- memory ----

    /// A `[rows, cols]` tensor of `values`.
    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Result<Tensor>;

    /// A `[rows, cols]` tensor of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor>;

    /// The values of an `f32` tensor, in host memory.
    fn download(&self, x: &Tensor) -> Result<Vec<f32>>;

    /// A copy of a host weight on this device (on the CPU: the same bytes, shared).
    fn upload_weight(&self, w: &Weight) -> Result<Weight>;

    /// Free and total bytes of device memory, where the device reports them.
    fn memory(&self) -> Result<Option<(usize, usize)>>;

    /// Measured read bandwidth of the device's memory in bytes/s: the best of `repeats`
    /// passes over `bytes` (much larger than the caches).
    fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64>;

    // ---- dense layers ----

    /// Rows of `table` for `ids`, widened to `f32`.
    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<Tensor>;

    /// `x · Wᵀ (+ bias)`: `[m, cols]` in, `[m, rows]` out.
    fn linear(&self, x: &Tensor, w: &Weight, precision: Precision) -> Result<Tensor>;

    /// RMSNorm over rows of `weight.len()` values (a per-head norm normalises each head).
    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor>;

    /// [`Backend::rms_norm`] in place.
    fn rms_norm_inplace(&self, x: &mut Tensor, weight: &Tensor, eps: f32) -> Result<()>;

    /// Rotate-half RoPE of `heads` heads per row of `x`, from per-row `cos`/`sin` tables of
    /// half a head each.
    fn rope(&self, x: &mut Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<()>;

    /// Clamps every value to `[-limit, limit]`.
    fn clip(&self, x: &mut Tensor, limit: f32) -> Result<()>;

    /// `x += y`.
    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()>;

    /// `silu(gate) · up`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// gpt-oss's clamped SwiGLU over rows of interleaved `[g0, u0, g1, u1, …]`.
    fn clamped_swiglu(&self, gate_up: &Tensor, alpha: f32, limit: f32) -> Result<Tensor>;

    /// `y[r, :] *= σ(gate[r])` (`gate` one value per row).
    fn scale_rows_sigmoid(&self, y: &mut Tensor, gate: &Tensor) -> Result<()>;

    /// Rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor>;

    /// The rows of `x` that hold a NaN or an infinity, in order (one pass over `x`; the
    /// forward pass checks its activations with it).
    fn non_finite_rows(&self, x: &Tensor) -> Result<Vec<u32>>;

    // ---- MoE ----

    /// Each row's top-`k` experts of its gate `logits` and their weights (to the host).
    fn top_k_gate(&self, logits: &Tensor, k: usize, gate: Gate) -> Result<TopK>;

    /// One projection of a layer's experts by slot, for [`Backend::grouped_linear`]. Every
    /// held matrix must have one format and shape and live on this device.
    fn group(&self, slots: Vec<Option<Weight>>) -> Result<Grouped>;

    /// Rows grouped by slot (`counts[e]` rows for slot `e`, in slot order) through their
    /// slot's matrix: `[Σ counts, cols]` in, `[Σ counts, rows]` out.
    fn grouped_linear(&self, x: &Tensor, w: &Grouped, counts: &[usize], precision: Precision) -> Result<Tensor>;

    /// Weighted sums of rows of `y` into token rows ([`Combine`]).
    fn combine_rows(&self, y: &Tensor, combine: &Combine) -> Result<Tensor>;

    // ---- attention over the paged KV cache ----

    /// An arena of `blocks` zeroed blocks of `layout`.
    fn kv_arena(&self, layout: KvLayout, blocks: usize) -> Result<Tensor>;

    /// Checks a forward pass's sequences against `arena` and prepares them for every layer.
    fn kv_batch(&self, layout: KvLayout, arena: &Tensor, seqs: &[SeqSpan<'_>]) -> Result<KvBatch>;

    /// Writes the new tokens' keys and values of one layer (`[tokens, kv_heads · head_dim]`).
    fn kv_write(&self, arena: &mut Tensor, batch: &KvBatch, layer: usize, k: &Tensor, v: &Tensor) -> Result<()>;

    /// Causal attention of the new tokens' queries (`[tokens, heads · head_dim]`) over their
    /// sequences' cached positions.
    fn attention(&self, q: &Tensor, arena: &Tensor, batch: &KvBatch, params: Attention<'_>) -> Result<Tensor>;

    /// Writes the new tokens' MLA cache rows of one layer: the normalised latent
    /// (`[tokens, rank]`) and the rotated shared key (`[tokens, rope]`), side by side.
    fn mla_write(
        &self,
        arena: &mut Tensor,
        batch: &KvBatch,
        layer: usize,
        latent: &Tensor,
        k_rope: &Tensor,
    ) -> Result<()>;

    /// Causal MLA attention of the new tokens' queries (`q_nope` `[tokens, heads · nope]`,
    /// rotated `q_rope` `[tokens, heads · rope]`) over their sequences' latent rows:
    /// `[tokens, heads · v]`, each head's output through its value up-projection.
    fn mla_attention(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        arena: &Tensor,
        batch: &KvBatch,
        params: Mla<'_>,
    ) -> Result<Tensor>;

    // ---- sampling ----

    /// Per row of logits: the most likely id (the lower on ties) and its log-probability.
    fn greedy(&self, logits: &Tensor) -> Result<Vec<(u32, f32)>>;
}

/// Shape checks every backend shares, so the implementations agree on what is an error.
pub(crate) mod check {
    use super::*;
    use crate::tensor::Shape;

    pub fn linear(op: &'static str, x: &Tensor, w: &Weight) -> Result<()> {
        w.expect_cols(op, "weight", x.cols())
    }

    pub fn same_shape(op: &'static str, arg: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        b.expect(op, arg, a.rows(), a.cols())
    }

    /// `x` is rows of `w.len()` values.
    pub fn norm(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
        let d = w.len();
        if d == 0 || !x.len().is_multiple_of(d) {
            return Err(KernelError::shape(op, "x", format!("rows of {d} values"), x.shape()));
        }
        Ok(x.len() / d)
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<usize> {
        let op = "rope";
        let half = cos.cols();
        cos.expect(op, "cos", x.rows(), half)?;
        sin.expect(op, "sin", x.rows(), half)?;
        x.expect(op, "x", x.rows(), heads * 2 * half)?;
        Ok(2 * half)
    }

    pub fn gather(x: &Tensor, rows: &[u32]) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows()) {
            return Err(KernelError::OutOfRange { op: "gather_rows", message: format!("row {r} of {}", x.rows()) });
        }
        Ok(())
    }

    pub fn embed(table: &Weight, ids: &[u32]) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows()) {
            return Err(KernelError::OutOfRange {
                op: "embed",
                message: format!("token id {id} is outside the table of {} rows", table.rows()),
            });
        }
        Ok(())
    }

    pub fn top_k(logits: &Tensor, k: usize) -> Result<()> {
        if k == 0 || k > logits.cols() {
            return Err(KernelError::Unsupported {
                op: "top_k_gate",
                message: format!("top-{k} of {} experts", logits.cols()),
            });
        }
        Ok(())
    }

    /// Every held slot has one format and shape and lives on `device`.
    pub fn group(slots: &[Option<Weight>], device: Device) -> Result<()> {
        let op = "group";
        let mut first: Option<&Weight> = None;
        for w in slots.iter().flatten() {
            if w.device() != device {
                return Err(KernelError::WrongDevice { op, arg: "expert weight", expected: device, got: w.device() });
            }
            match first {
                None => first = Some(w),
                Some(f)
                    if (f.format(), f.rows(), f.cols(), f.has_bias())
                        != (w.format(), w.rows(), w.cols(), w.has_bias()) =>
                {
                    return Err(KernelError::shape(
                        op,
                        "expert weight",
                        format!("{} {}", f.format().name(), Shape(f.rows(), f.cols())),
                        format!("{} {}", w.format().name(), Shape(w.rows(), w.cols())),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// `x` holds the rows `counts` lists, of the group's input width, and only held slots have
    /// rows. Returns the output width.
    pub fn grouped(x: &Tensor, w: &Grouped, counts: &[usize]) -> Result<usize> {
        let op = "grouped_linear";
        if counts.len() != w.slots() {
            return Err(KernelError::shape(
                op,
                "counts",
                format!("{} slots", w.slots()),
                format!("{} counts", counts.len()),
            ));
        }
        if let Some(e) = counts.iter().enumerate().position(|(e, &c)| c > 0 && !w.is_held(e)) {
            return Err(KernelError::OutOfRange {
                op,
                message: format!("rows routed to slot {e}, which holds no expert"),
            });
        }
        let total: usize = counts.iter().sum();
        let Some((rows, cols)) = w.shape() else {
            x.expect(op, "x", 0, x.cols())?;
            return Ok(0);
        };
        x.expect(op, "x", total, cols)?;
        Ok(rows)
    }

    pub fn clip(limit: f32) -> Result<()> {
        if limit.is_nan() || limit < 0.0 {
            return Err(KernelError::Unsupported { op: "clip", message: format!("clipping to ±{limit}") });
        }
        Ok(())
    }

    pub fn attention(q: &Tensor, batch: &KvBatch, p: &Attention<'_>) -> Result<()> {
        let op = "attention";
        let l = &batch.layout;
        per_head(op, l)?;
        if p.sliding_window == Some(0) {
            return Err(KernelError::Unsupported { op, message: "a sliding window of 0 positions".into() });
        }
        if l.kv_heads == 0 || p.layer >= l.layers || p.heads == 0 || !p.heads.is_multiple_of(l.kv_heads) {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "layer {} with {} heads over {} layers of {} KV heads",
                    p.layer, p.heads, l.layers, l.kv_heads
                ),
            });
        }
        q.expect(op, "q", batch.tokens, p.heads * l.head_dim)?;
        if let Some(s) = p.sinks {
            s.expect_len(op, "sinks", p.heads)?;
        }
        Ok(())
    }

    /// The cache holds keys and values per KV head (not MLA's latent rows).
    fn per_head(op: &'static str, l: &KvLayout) -> Result<()> {
        if l.is_latent() {
            return Err(KernelError::Unsupported {
                op,
                message: "an MLA latent cache (use the mla_ operations)".into(),
            });
        }
        Ok(())
    }

    /// The cache holds MLA's latent rows (not keys and values per head).
    fn latent(op: &'static str, l: &KvLayout) -> Result<()> {
        if !l.is_latent() {
            return Err(KernelError::Unsupported { op, message: "a per-head key and value cache".into() });
        }
        Ok(())
    }

    pub fn mla_write(batch: &KvBatch, layer: usize, latent: &Tensor, k_rope: &Tensor) -> Result<()> {
        let op = "mla_write";
        let l = &batch.layout;
        self::latent(op, l)?;
        if layer >= l.layers || latent.cols() + k_rope.cols() != l.head_dim {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "layer {layer}: rows of {} + {} values in a cache of {} layers of {}-value latent rows",
                    latent.cols(),
                    k_rope.cols(),
                    l.layers,
                    l.head_dim,
                ),
            });
        }
        latent.expect(op, "latent", batch.tokens, latent.cols())?;
        k_rope.expect(op, "k_rope", batch.tokens, k_rope.cols())
    }

    pub fn mla(q_nope: &Tensor, q_rope: &Tensor, batch: &KvBatch, p: &Mla<'_>) -> Result<()> {
        let op = "mla_attention";
        let l = &batch.layout;
        latent(op, l)?;
        if p.layer >= l.layers || p.rank + p.rope != l.head_dim || p.heads == 0 {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "layer {} of {} heads, rank {} + rope {} over a cache of {} layers of {}-value rows",
                    p.layer, p.heads, p.rank, p.rope, l.layers, l.head_dim
                ),
            });
        }
        if [p.rank, p.rope, p.nope, p.v].contains(&0) {
            return Err(KernelError::Unsupported {
                op,
                message: format!(
                    "rank {}, rope {}, nope {} and v {}: every width must be at least 1",
                    p.rank, p.rope, p.nope, p.v
                ),
            });
        }
        q_nope.expect(op, "q_nope", batch.tokens, p.heads * p.nope)?;
        q_rope.expect(op, "q_rope", batch.tokens, p.heads * p.rope)?;
        for (arg, ws, rows, cols) in
            [("uk", p.uk, p.nope, p.rank), ("uk_t", p.uk_t, p.rank, p.nope), ("uv", p.uv, p.v, p.rank)]
        {
            if ws.len() != p.heads {
                return Err(KernelError::shape(op, arg, format!("{} heads", p.heads), format!("{}", ws.len())));
            }
            for w in ws {
                if (w.rows(), w.cols()) != (rows, cols) {
                    return Err(KernelError::shape(op, arg, Shape(rows, cols), Shape(w.rows(), w.cols())));
                }
            }
        }
        Ok(())
    }

    pub fn kv_write(batch: &KvBatch, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let op = "kv_write";
        let l = &batch.layout;
        per_head(op, l)?;
        if layer >= l.layers {
            return Err(KernelError::OutOfRange { op, message: format!("layer {layer} of {}", l.layers) });
        }
        k.expect(op, "k", batch.tokens, l.kv_heads * l.head_dim)?;
        v.expect(op, "v", batch.tokens, l.kv_heads * l.head_dim)?;
        Ok(())
    }
}
