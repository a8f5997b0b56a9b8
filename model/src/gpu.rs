//! The forward pass on a CUDA device (feature `cuda`): [`GpuModel`] holds the dense weights,
//! the final norm and head, the experts this process holds ([`GpuExperts`]) and the paged KV
//! arena in device memory, and runs [`Model::forward_with`]'s pass there, step for step.
//!
//! Activations stay on the device from the embedding to the logits. The only host round
//! trips are per MoE layer: the gate's top-k choices come back (a few integers per token) to
//! group rows by expert, and, when the experts are remote (a router), the normalised hidden
//! states go out and the weighted sums come back.

use std::sync::Arc;

use switchyard_kernels::DType;
use switchyard_kernels::cpu::Precision;
use switchyard_kernels::cuda::{self, CacheShape, Gpu, GpuMatrix, GroupedWeights, TokenTables};

use crate::config::{ExpertActivation, Routing};
use crate::error::{ModelError, Result};
use crate::kv_cache::{BLOCK_TOKENS, KvPool};
use crate::layers::{Exec, Linear, SwiGluMlp};
use crate::model::{Chunk, FeedForward, Model};
use crate::moe::{Assignment, Expert, Experts};

use switchyard_kernels::cuda::CudaSlice;

/// A linear layer on the device.
pub struct GpuLinear {
    pub w: GpuMatrix,
    pub bias: Option<CudaSlice<f32>>,
}

impl GpuLinear {
    fn upload(gpu: &Gpu, l: &Linear) -> Result<Self> {
        let w = gpu.upload_matrix(l.weight.weights(), l.out_features(), l.in_features())?;
        let bias = l.bias.as_deref().map(|b| gpu.upload(b)).transpose()?;
        Ok(GpuLinear { w, bias })
    }

    fn forward(&self, gpu: &Gpu, x: &CudaSlice<f32>, m: usize, p: Precision, exec: &Exec) -> Result<CudaSlice<f32>> {
        exec.add(self.w.size_in_bytes());
        let mut out = gpu.alloc::<f32>(m * self.w.rows)?;
        gpu.linear(x, &self.w, self.bias.as_ref(), m, &mut out, p)?;
        Ok(out)
    }
}

struct GpuMlp {
    gate: GpuLinear,
    up: GpuLinear,
    down: GpuLinear,
}

impl GpuMlp {
    fn upload(gpu: &Gpu, m: &SwiGluMlp) -> Result<Self> {
        Ok(GpuMlp {
            gate: GpuLinear::upload(gpu, &m.gate)?,
            up: GpuLinear::upload(gpu, &m.up)?,
            down: GpuLinear::upload(gpu, &m.down)?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &CudaSlice<f32>, m: usize, p: Precision, exec: &Exec) -> Result<CudaSlice<f32>> {
        let g = self.gate.forward(gpu, x, m, p, exec)?;
        let u = self.up.forward(gpu, x, m, p, exec)?;
        let n = m * self.gate.w.rows;
        let mut act = gpu.alloc::<f32>(n)?;
        gpu.swiglu(&g, &u, &mut act, n)?;
        self.down.forward(gpu, &act, m, p, exec)
    }
}

/// One expert on the device: SwiGLU's three projections, or gpt-oss's two.
enum GpuExpert {
    SwiGlu { gate: GpuLinear, up: GpuLinear, down: GpuLinear },
    Interleaved { gate_up: GpuLinear, down: GpuLinear },
}

/// The experts of one MoE layer held on the device, and their grouped address tables.
struct ExpertLayer {
    slots: Vec<Option<GpuExpert>>,
    activation: ExpertActivation,
    /// SwiGLU: gate, up, down. Interleaved: gate_up, down.
    tables: Vec<GroupedWeights>,
}

/// Experts resident in device memory, per layer, run as grouped products: the expert
/// nodes' store with `--device cuda:N`, and the MoE layers of a [`GpuModel`].
pub struct GpuExperts {
    gpu: Arc<Gpu>,
    layers: Vec<Option<ExpertLayer>>,
    /// The products' precision, and the weight bytes read by [`Experts::run`] calls.
    pub exec: Exec,
}

impl GpuExperts {
    /// Copies `layers[l][e]` (the held experts of each layer; `None` where not held) to the
    /// device.
    pub fn upload(gpu: &Arc<Gpu>, layers: &[&[Option<Expert>]], precision: Precision) -> Result<Self> {
        let mut out = Vec::with_capacity(layers.len());
        for experts in layers {
            out.push(Self::upload_layer(gpu, experts)?);
        }
        Ok(GpuExperts { gpu: gpu.clone(), layers: out, exec: Exec::new(precision) })
    }

    fn upload_layer(gpu: &Gpu, experts: &[Option<Expert>]) -> Result<Option<ExpertLayer>> {
        let Some(activation) = experts.iter().flatten().next().map(Expert::activation) else { return Ok(None) };
        let mut slots = Vec::with_capacity(experts.len());
        for e in experts {
            slots.push(match e {
                None => None,
                Some(Expert::SwiGlu(m)) => Some(GpuExpert::SwiGlu {
                    gate: GpuLinear::upload(gpu, &m.gate)?,
                    up: GpuLinear::upload(gpu, &m.up)?,
                    down: GpuLinear::upload(gpu, &m.down)?,
                }),
                Some(Expert::Interleaved { gate_up, down, .. }) => Some(GpuExpert::Interleaved {
                    gate_up: GpuLinear::upload(gpu, gate_up)?,
                    down: GpuLinear::upload(gpu, down)?,
                }),
            });
        }
        let projections = match activation {
            ExpertActivation::SwiGlu => 3,
            ExpertActivation::ClampedSwiGlu { .. } => 2,
        };
        let mut tables = Vec::with_capacity(projections);
        for p in 0..projections {
            let column: Vec<_> =
                slots.iter().map(|s| s.as_ref().map(|e| e.projection(p)).map(|l| (&l.w, l.bias.as_ref()))).collect();
            tables.push(gpu.group(&column)?.expect("the layer holds an expert"));
        }
        Ok(Some(ExpertLayer { slots, activation, tables }))
    }

    /// Device bytes of the expert weights.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().flatten().flat_map(|l| l.slots.iter().flatten()).map(GpuExpert::size_in_bytes).sum()
    }

    /// The weighted expert sums of `rows` rows of `x` (on the device), for `assignments`.
    /// Rows are grouped by expert in expert order and each expert's outputs are added in
    /// that order, as [`crate::moe::run_experts`] adds them.
    pub fn run_on_device(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        rows: usize,
        hidden: usize,
        assignments: &[Assignment],
        exec: &Exec,
    ) -> Result<CudaSlice<f32>> {
        let gpu = &*self.gpu;
        let unavailable = |expert: u32| ModelError::ExpertUnavailable {
            layer,
            expert: expert as usize,
            reason: "not loaded on this device".into(),
        };
        let Some(l) = self.layers.get(layer).and_then(Option::as_ref) else {
            return match assignments.first() {
                Some(a) => Err(unavailable(a.expert)),
                None => Ok(gpu.zeros::<f32>(rows * hidden)?),
            };
        };
        // Group by expert; within an expert, tokens keep their order.
        let mut by_expert: Vec<Vec<(u32, f32)>> = vec![Vec::new(); l.slots.len()];
        for a in assignments {
            match by_expert.get_mut(a.expert as usize) {
                Some(list) if l.slots[a.expert as usize].is_some() => list.push((a.token, a.weight)),
                _ => return Err(unavailable(a.expert)),
            }
        }
        let counts: Vec<usize> = by_expert.iter().map(Vec::len).collect();
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Ok(gpu.zeros::<f32>(rows * hidden)?);
        }
        let perm: Vec<i32> = by_expert.iter().flatten().map(|&(t, _)| t as i32).collect();
        // Per token, its (grouped row, weight) entries in expert order.
        let mut per_token: Vec<Vec<(i32, f32)>> = vec![Vec::new(); rows];
        for (row, &(t, w)) in by_expert.iter().flatten().enumerate() {
            per_token[t as usize].push((row as i32, w));
        }
        let mut start = Vec::with_capacity(rows + 1);
        let (mut src, mut weights) = (Vec::with_capacity(total), Vec::with_capacity(total));
        start.push(0i32);
        for entries in &per_token {
            src.extend(entries.iter().map(|e| e.0));
            weights.extend(entries.iter().map(|e| e.1));
            start.push(src.len() as i32);
        }
        // Experts with many rows go through cuBLAS where the precision allows it and cuBLAS
        // takes the weights (bf16 or f32, in every projection: they share one tile list).
        let cublas = exec.precision == Precision::Bf16Products
            && l.tables.iter().all(|t| matches!(t.dtype, DType::BF16 | DType::F32));
        let big = |e: usize| cublas && counts[e] >= switchyard_kernels::cpu::matmul::BF16_PRODUCT_MIN_ROWS;
        for (slot, _) in l.slots.iter().zip(&counts).filter(|(_, c)| **c > 0) {
            exec.add(slot.as_ref().map_or(0, GpuExpert::size_in_bytes));
        }
        let tiles = cuda::tiles(&counts, big);
        let n_tiles = tiles.len() / 3;
        let tiles = gpu.upload(&tiles)?;

        let mut xp = gpu.alloc::<f32>(total * hidden)?;
        gpu.gather_rows(x, &gpu.upload(&perm)?, total, hidden, &mut xp)?;
        // One projection over every expert's rows: grouped kernel, plus cuBLAS for big ones.
        let project = |p: usize, input: &CudaSlice<f32>| -> Result<CudaSlice<f32>> {
            let t = &l.tables[p];
            let mut out = gpu.alloc::<f32>(total * t.rows)?;
            gpu.grouped_linear(input, t, &tiles, n_tiles, &mut out)?;
            let mut row0 = 0;
            for (e, &c) in counts.iter().enumerate() {
                if big(e) {
                    let lin = l.slots[e].as_ref().expect("counted experts are held").projection(p);
                    if !gpu.expert_gemm(input, &lin.w, lin.bias.as_ref(), row0, c, &mut out, exec.precision)? {
                        unreachable!("cuBLAS is only chosen for bf16 or f32 weights");
                    }
                }
                row0 += c;
            }
            Ok(out)
        };
        let y = match l.activation {
            ExpertActivation::SwiGlu => {
                let g = project(0, &xp)?;
                let u = project(1, &xp)?;
                let n = total * l.tables[0].rows;
                let mut act = gpu.alloc::<f32>(n)?;
                gpu.swiglu(&g, &u, &mut act, n)?;
                project(2, &act)?
            }
            ExpertActivation::ClampedSwiGlu { alpha, limit } => {
                let gu = project(0, &xp)?;
                let n = total * l.tables[0].rows / 2;
                let mut act = gpu.alloc::<f32>(n)?;
                gpu.clamped_swiglu(&gu, &mut act, n, alpha, limit)?;
                project(1, &act)?
            }
        };
        let mut out = gpu.alloc::<f32>(rows * hidden)?;
        let (start, src, weights) = (gpu.upload(&start)?, gpu.upload(&src)?, gpu.upload(&weights)?);
        gpu.combine_rows(&y, &start, &src, &weights, rows, hidden, &mut out)?;
        Ok(out)
    }
}

impl GpuExpert {
    fn size_in_bytes(&self) -> usize {
        match self {
            GpuExpert::SwiGlu { gate, up, down } => {
                gate.w.size_in_bytes() + up.w.size_in_bytes() + down.w.size_in_bytes()
            }
            GpuExpert::Interleaved { gate_up, down } => gate_up.w.size_in_bytes() + down.w.size_in_bytes(),
        }
    }

    fn projection(&self, p: usize) -> &GpuLinear {
        match (self, p) {
            (GpuExpert::SwiGlu { gate, .. }, 0) => gate,
            (GpuExpert::SwiGlu { up, .. }, 1) => up,
            (GpuExpert::SwiGlu { down, .. }, 2) => down,
            (GpuExpert::Interleaved { gate_up, .. }, 0) => gate_up,
            (GpuExpert::Interleaved { down, .. }, 1) => down,
            _ => unreachable!("expert projection {p}"),
        }
    }
}

/// Host activations in, host sums out: what an expert node serves from device memory.
impl Experts for GpuExperts {
    fn run(&self, layer: usize, x: &[f32], hidden: usize, assignments: &[Assignment]) -> Result<Vec<f32>> {
        let rows = x.len() / hidden;
        self.gpu.bind()?;
        let xd = self.gpu.upload(x)?;
        let y = self.run_on_device(layer, &xd, rows, hidden, assignments, &self.exec)?;
        Ok(self.gpu.download(&y, rows * hidden)?)
    }
}

struct GpuAttention {
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    sinks: Option<CudaSlice<f32>>,
    sliding_window: Option<usize>,
}

#[allow(clippy::large_enum_variant)] // one per layer
enum GpuFfn {
    Dense(GpuMlp),
    Moe { gate: GpuLinear, routing: Routing, top_k: usize, shared: Option<(GpuMlp, GpuLinear)> },
}

struct GpuLayer {
    input_norm: CudaSlice<f32>,
    attention: GpuAttention,
    post_norm: CudaSlice<f32>,
    ffn: GpuFfn,
}

/// A [`Model`]'s weights and KV arena on one CUDA device.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    embed: GpuMatrix,
    layers: Vec<GpuLayer>,
    norm: CudaSlice<f32>,
    lm_head: GpuLinear,
    experts: GpuExperts,
    kv_arena: std::sync::Mutex<CudaSlice<f32>>,
    kv_pool: Arc<KvPool>,
}

impl GpuModel {
    /// Copies `model`'s weights (and the experts it holds) to `gpu`, with a KV arena of
    /// `kv_bytes`, and reports `progress(layers_done, layers_total)`.
    pub fn upload(
        model: &Model,
        gpu: &Arc<Gpu>,
        kv_bytes: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        gpu.bind()?;
        let s = &model.spec;
        let precision = model.exec.precision;
        let upload_vec = |v: &[f32]| gpu.upload(v).map_err(ModelError::from);
        let embed = gpu.upload_matrix(model.embed.weights(), s.vocab_size, s.hidden_size)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, layer) in model.layers.iter().enumerate() {
            let a = &layer.attention;
            let attention = GpuAttention {
                q: GpuLinear::upload(gpu, &a.q)?,
                k: GpuLinear::upload(gpu, &a.k)?,
                v: GpuLinear::upload(gpu, &a.v)?,
                o: GpuLinear::upload(gpu, &a.o)?,
                q_norm: a.q_norm.as_deref().map(upload_vec).transpose()?,
                k_norm: a.k_norm.as_deref().map(upload_vec).transpose()?,
                sinks: a.sinks.as_deref().map(upload_vec).transpose()?,
                sliding_window: a.sliding_window,
            };
            let ffn = match &layer.ffn {
                FeedForward::Dense(m) => GpuFfn::Dense(GpuMlp::upload(gpu, m)?),
                FeedForward::Moe(b) => GpuFfn::Moe {
                    gate: GpuLinear::upload(gpu, &b.gate)?,
                    routing: b.routing,
                    top_k: b.top_k,
                    shared: b
                        .shared
                        .as_ref()
                        .map(|sh| -> Result<_> {
                            Ok((GpuMlp::upload(gpu, &sh.mlp)?, GpuLinear::upload(gpu, &sh.gate)?))
                        })
                        .transpose()?,
                },
            };
            layers.push(GpuLayer {
                input_norm: upload_vec(&layer.input_norm)?,
                attention,
                post_norm: upload_vec(&layer.post_norm)?,
                ffn,
            });
            progress(l + 1, model.layers.len());
        }
        let experts = GpuExperts::upload(gpu, &model.local_experts().layers, precision)?;
        let block_floats = KvPool::block_floats(s);
        let blocks = (kv_bytes / (block_floats * 4)).max(1);
        let kv_arena = gpu.zeros::<f32>(blocks * block_floats)?;
        let (free, total) = gpu.memory()?;
        tracing::info!(
            device = %format!("cuda:{}", gpu.ordinal()),
            experts_bytes = experts.size_in_bytes(),
            kv_blocks = blocks,
            free_bytes = free,
            total_bytes = total,
            "weights resident on {}",
            gpu.name()
        );
        Ok(GpuModel {
            gpu: gpu.clone(),
            embed,
            layers,
            norm: upload_vec(&model.norm)?,
            lm_head: GpuLinear::upload(gpu, &model.lm_head)?,
            experts,
            kv_arena: std::sync::Mutex::new(kv_arena),
            kv_pool: KvPool::for_device_arena(s, blocks),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The pool of the device KV arena's blocks; sequences run here must reserve from it.
    pub fn kv_pool(&self) -> &Arc<KvPool> {
        &self.kv_pool
    }

    /// [`Model::forward_with`] on the device: the last position's logits of each chunk.
    /// `remote`: where the experts run when they are not on this device (a router's
    /// dispatcher).
    pub(crate) fn forward(
        &self,
        model: &Model,
        chunks: &mut [Chunk<'_>],
        remote: Option<&dyn Experts>,
    ) -> Result<Vec<Vec<f32>>> {
        let logits = self.logits(model, chunks, remote)?;
        let (n, v) = (chunks.len(), model.spec.vocab_size);
        let host = self.gpu.download(&logits, n * v)?;
        Ok(host.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// The forward pass with a greedy pick on the device: per chunk, the most likely next
    /// token (ties to the lower id) and its log-probability. Only two numbers per sequence
    /// leave the device.
    pub(crate) fn forward_greedy(
        &self,
        model: &Model,
        chunks: &mut [Chunk<'_>],
        remote: Option<&dyn Experts>,
    ) -> Result<Vec<(u32, f32)>> {
        let logits = self.logits(model, chunks, remote)?;
        let gpu = &*self.gpu;
        let (n, v) = (chunks.len(), model.spec.vocab_size);
        let mut ids = gpu.alloc::<i32>(n)?;
        let mut logprobs = gpu.alloc::<f32>(n)?;
        gpu.greedy_pick(&logits, n, v, &mut ids, &mut logprobs)?;
        let (ids, logprobs) = (gpu.download(&ids, n)?, gpu.download(&logprobs, n)?);
        Ok(ids.into_iter().zip(logprobs).map(|(id, lp)| (id as u32, lp)).collect())
    }

    /// Runs the chunks through every layer, appending to their caches, and returns the
    /// logits of each chunk's last position, `[chunks, vocab]` on the device.
    fn logits(&self, model: &Model, chunks: &mut [Chunk<'_>], remote: Option<&dyn Experts>) -> Result<CudaSlice<f32>> {
        let gpu = &*self.gpu;
        gpu.bind()?;
        let s = &model.spec;
        let (h, hd, nh, nkv) = (s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads);
        let (p, exec) = (model.exec.precision, &model.exec);
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();

        // Per token: id, position, and its sequence's block table; rotary tables.
        let (mut ids, mut pos, mut table_at, mut tables) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let mut last = Vec::with_capacity(chunks.len());
        for c in chunks.iter_mut() {
            if !c.cache.on_device() {
                return Err(ModelError::Device(
                    "a sequence's KV cache is in host memory; reserve it from the device pool".into(),
                ));
            }
            let (first, n) = (c.cache.len(), c.tokens.len());
            let at = tables.len() as i32;
            tables.extend(c.cache.device_blocks(first + n).iter().map(|&b| b as i32));
            for (i, &t) in c.tokens.iter().enumerate() {
                ids.push(t);
                pos.push((first + i) as i32);
                table_at.push(at);
            }
            let positions: Vec<usize> = (first..first + n).collect();
            let (c_, s_) = model.rope.tables(&positions);
            cos.extend(c_);
            sin.extend(s_);
            last.push(ids.len() as i32 - 1);
        }
        let (pos, table_at, tables) = (gpu.upload(&pos)?, gpu.upload(&table_at)?, gpu.upload(&tables)?);
        let at = TokenTables { pos: &pos, table_at: &table_at, tables: &tables };
        let (cos, sin) = (gpu.upload(&cos)?, gpu.upload(&sin)?);

        let mut x = gpu.alloc::<f32>(total * h)?;
        gpu.embed(&self.embed, &gpu.upload(&ids)?, total, &mut x)?;
        let mut hbuf = gpu.alloc::<f32>(total * h)?;
        let mut arena = self.kv_arena.lock().expect("kv arena lock");
        for (l, layer) in self.layers.iter().enumerate() {
            gpu.rms_norm(&x, &layer.input_norm, total, s.rms_norm_eps, &mut hbuf)?;
            let a = &layer.attention;
            let mut q = a.q.forward(gpu, &hbuf, total, p, exec)?;
            let mut k = a.k.forward(gpu, &hbuf, total, p, exec)?;
            let mut v = a.v.forward(gpu, &hbuf, total, p, exec)?;
            if let Some(w) = &a.q_norm {
                gpu.rms_norm_inplace(&mut q, w, total * nh * hd / w.len(), s.rms_norm_eps)?;
            }
            if let Some(w) = &a.k_norm {
                gpu.rms_norm_inplace(&mut k, w, total * nkv * hd / w.len(), s.rms_norm_eps)?;
            }
            if let Some(c) = s.clip_qkv {
                gpu.clip(&mut q, total * nh * hd, c)?;
                gpu.clip(&mut k, total * nkv * hd, c)?;
                gpu.clip(&mut v, total * nkv * hd, c)?;
            }
            gpu.rope(&mut q, &cos, &sin, total, nh, hd)?;
            gpu.rope(&mut k, &cos, &sin, total, nkv, hd)?;
            let shape = CacheShape {
                layer: l as i32,
                n_layers: s.num_layers as i32,
                n_kv_heads: nkv as i32,
                head_dim: hd as i32,
            };
            gpu.kv_write(&k, &v, &mut arena, total, &at, shape)?;
            let mut attn = gpu.alloc::<f32>(total * nh * hd)?;
            gpu.paged_attention(&q, &mut attn, &arena, total, &at, a.sinks.as_ref(), shape, nh, a.sliding_window)?;
            let o = a.o.forward(gpu, &attn, total, p, exec)?;
            gpu.add(&mut x, &o, total * h)?;

            gpu.rms_norm(&x, &layer.post_norm, total, s.rms_norm_eps, &mut hbuf)?;
            let y = match &layer.ffn {
                GpuFfn::Dense(mlp) => mlp.forward(gpu, &hbuf, total, p, exec)?,
                GpuFfn::Moe { gate, routing, top_k, shared } => {
                    let assignments = self.route(gate, *routing, *top_k, &hbuf, total, exec)?;
                    let mut y = match remote {
                        None => self.experts.run_on_device(l, &hbuf, total, h, &assignments, exec)?,
                        Some(experts) => {
                            let host = gpu.download(&hbuf, total * h)?;
                            gpu.upload(&experts.run(l, &host, h, &assignments)?)?
                        }
                    };
                    if let Some((mlp, g)) = shared {
                        let mut sy = mlp.forward(gpu, &hbuf, total, p, exec)?;
                        let gl = g.forward(gpu, &hbuf, total, p, exec)?;
                        gpu.scale_rows_sigmoid(&mut sy, &gl, h, total)?;
                        gpu.add(&mut y, &sy, total * h)?;
                    }
                    y
                }
            };
            gpu.add(&mut x, &y, total * h)?;
        }
        drop(arena);
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }

        let n = chunks.len();
        let mut lastx = gpu.alloc::<f32>(n * h)?;
        gpu.gather_rows(&x, &gpu.upload(&last)?, n, h, &mut lastx)?;
        gpu.rms_norm_inplace(&mut lastx, &self.norm, n, s.rms_norm_eps)?;
        self.lm_head.forward(gpu, &lastx, n, p, exec)
    }

    /// The gate on the device; its top-k choices come back to the host as assignments.
    fn route(
        &self,
        gate: &GpuLinear,
        routing: Routing,
        top_k: usize,
        h: &CudaSlice<f32>,
        m: usize,
        exec: &Exec,
    ) -> Result<Vec<Assignment>> {
        let gpu = &*self.gpu;
        let e = gate.w.rows;
        let logits = gate.forward(gpu, h, m, exec.precision, exec)?;
        let mut ids = gpu.alloc::<i32>(m * top_k)?;
        let mut weights = gpu.alloc::<f32>(m * top_k)?;
        let (softmax_first, renormalize) = match routing {
            Routing::SoftmaxTopK { renormalize } => (true, renormalize),
            Routing::TopKSoftmax => (false, false),
        };
        gpu.topk_gate(&logits, m, e, top_k, softmax_first, renormalize, &mut ids, &mut weights)?;
        let (ids, weights) = (gpu.download(&ids, m * top_k)?, gpu.download(&weights, m * top_k)?);
        Ok(ids
            .iter()
            .zip(&weights)
            .enumerate()
            .map(|(i, (&expert, &weight))| Assignment { token: (i / top_k) as u32, expert: expert as u32, weight })
            .collect())
    }
}

// The device arena's blocks hold as many positions as the host cache's.
const _: () = assert!(BLOCK_TOKENS == cuda::BLOCK_TOKENS);
