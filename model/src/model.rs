//! [`Model`]: a loaded checkpoint and its forward pass over a batch of sequence chunks.
//!
//! One forward pass takes any mix of prefill chunks and single decode tokens from different
//! sequences; linear layers and experts run over all of their rows at once, attention runs
//! per sequence against its own cache.

use std::path::Path;

use rayon::prelude::*;
use switchyard_kernels::cpu::{attention, norm, rope};

use crate::checkpoint::{Checkpoint, Tensor};
use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::kv_cache::SeqCache;
use crate::layers::{AttentionWeights, Exec, Linear, SwiGluMlp};
use crate::loader::{ExpertFilter, Names};
use crate::moe::{self, Experts, LocalExperts, MoeBlock};
use crate::rope::Rope;

pub enum FeedForward {
    Dense(SwiGluMlp),
    Moe(MoeBlock),
}

pub struct Layer {
    pub input_norm: Vec<f32>,
    pub attention: AttentionWeights,
    pub post_norm: Vec<f32>,
    pub ffn: FeedForward,
}

pub struct Model {
    pub spec: ModelSpec,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
    pub(crate) rope: Rope,
    /// Weight bytes streamed since last taken.
    pub exec: Exec,
    /// The weights' copy on a CUDA device, which then runs every forward pass.
    #[cfg(feature = "cuda")]
    pub gpu: Option<crate::gpu::GpuModel>,
}

/// New tokens of one sequence for a forward pass.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

impl Model {
    /// Loads every weight of `dir` (see [`Model::load_with`]).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &|_, _| true, &mut |_, _| {})
    }

    /// Loads the checkpoint in `dir`, keeping the experts `keep(layer, expert)` accepts, and
    /// reports `progress(layers_done, layers_total)`.
    pub fn load_with(dir: &Path, keep: ExpertFilter<'_>, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::NotACheckpoint { path: dir.to_path_buf(), reason: "no such directory".into() });
        }
        let spec = ModelSpec::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let names = Names { ckpt: &ckpt, spec: &spec };
        let embed = names.embed()?;
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            layers.push(names.layer(l, keep)?);
            progress(l + 1, spec.num_layers);
        }
        let norm = names.final_norm()?;
        let lm_head = names.lm_head()?;
        let rope = Rope::new(&spec.rope, spec.head_dim, spec.max_position_embeddings);
        tracing::info!(
            model_type = spec.arch.model_type(),
            layers = spec.num_layers,
            experts = spec.num_experts,
            bytes = ckpt.total_bytes(),
            "loaded checkpoint {}",
            dir.display()
        );
        Ok(Model {
            spec,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            exec: Exec::default(),
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// The experts this process holds, as an [`Experts`] backend.
    pub fn local_experts(&self) -> LocalExperts<'_> {
        let layers = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FeedForward::Moe(b) => &b.experts[..],
                FeedForward::Dense(_) => &[],
            })
            .collect();
        LocalExperts { layers, exec: &self.exec }
    }

    /// Copies the weights, and the experts held here, to `device` with a KV arena of
    /// `kv_bytes`; every forward pass then runs there. `cpu` is a no-op.
    pub fn to_device(
        &mut self,
        device: switchyard_kernels::Device,
        kv_bytes: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        use switchyard_kernels::Device;
        match device.ensure_available()? {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = switchyard_kernels::cuda::Gpu::open(n)?;
                self.gpu = Some(crate::gpu::GpuModel::upload(self, &gpu, kv_bytes, progress)?);
                Ok(())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                let _ = (kv_bytes, progress);
                unreachable!("ensure_available refuses CUDA in a build without it")
            }
        }
    }

    /// The KV pool sequences must reserve from when the model runs on a device.
    pub fn device_kv_pool(&self) -> Option<std::sync::Arc<crate::kv_cache::KvPool>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.kv_pool().clone());
        }
        None
    }

    /// Runs `chunks` through the model with the experts loaded here (see
    /// [`Model::forward_with`]).
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Vec<f32>>> {
        if self.check(chunks)? == 0 {
            return Ok(vec![Vec::new(); chunks.len()]);
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.forward(self, chunks, None);
        }
        self.forward_cpu(chunks, &self.local_experts())
    }

    /// Runs `chunks` through the model, appending to their caches, and returns the logits of
    /// each chunk's last token. MoE layers' experts run on `experts`.
    pub fn forward_with(&self, chunks: &mut [Chunk<'_>], experts: &dyn Experts) -> Result<Vec<Vec<f32>>> {
        if self.check(chunks)? == 0 {
            return Ok(vec![Vec::new(); chunks.len()]);
        }
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.forward(self, chunks, Some(experts));
        }
        self.forward_cpu(chunks, experts)
    }

    /// The forward pass with the greedy pick made where the logits are: per chunk, the most
    /// likely next token and its log-probability. `None` where that is not cheaper than
    /// returning the logits (on the CPU); the caller then uses [`Model::forward_with`].
    pub fn forward_greedy(
        &self,
        chunks: &mut [Chunk<'_>],
        experts: Option<&dyn Experts>,
    ) -> Result<Option<Vec<(u32, f32)>>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            if self.check(chunks)? == 0 {
                return Ok(Some(Vec::new()));
            }
            return g.forward_greedy(self, chunks, experts).map(Some);
        }
        let _ = (chunks, experts);
        Ok(None)
    }

    /// Checks every chunk against the vocabulary, its cache and the context; returns the
    /// number of tokens.
    fn check(&self, chunks: &[Chunk<'_>]) -> Result<usize> {
        let s = &self.spec;
        for c in chunks.iter() {
            if let Some(&id) = c.tokens.iter().find(|&&t| t as usize >= s.vocab_size) {
                return Err(ModelError::TokenOutOfRange { id, vocab_size: s.vocab_size });
            }
            if c.cache.len() + c.tokens.len() > c.cache.capacity() {
                return Err(ModelError::InvalidRequest(format!(
                    "{} positions exceed the {} this sequence reserved in the KV cache",
                    c.cache.len() + c.tokens.len(),
                    c.cache.capacity()
                )));
            }
            if c.cache.len() + c.tokens.len() > s.max_context {
                return Err(ModelError::PromptTooLong {
                    prompt_tokens: c.cache.len() + c.tokens.len(),
                    max_context: s.max_context,
                });
            }
        }
        Ok(chunks.iter().map(|c| c.tokens.len()).sum())
    }

    fn forward_cpu(&self, chunks: &mut [Chunk<'_>], experts: &dyn Experts) -> Result<Vec<Vec<f32>>> {
        let s = &self.spec;
        let h = s.hidden_size;
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut x = vec![0.0f32; total * h];
        let embed = self.embed.weights();
        for (row, &t) in x.chunks_exact_mut(h).zip(chunks.iter().flat_map(|c| c.tokens)) {
            embed.to_f32_into(t as usize * h..(t as usize + 1) * h, row);
        }
        let tables: Vec<(Vec<f32>, Vec<f32>)> = chunks
            .iter()
            .map(|c| {
                let positions: Vec<usize> = (c.cache.len()..c.cache.len() + c.tokens.len()).collect();
                self.rope.tables(&positions)
            })
            .collect();

        let mut hbuf = vec![0.0f32; total * h];
        for (l, layer) in self.layers.iter().enumerate() {
            norm::rms_norm(&x, &layer.input_norm, s.rms_norm_eps, &mut hbuf);
            let attn = self.attention(l, &layer.attention, &hbuf, total, chunks, &tables);
            add(&mut x, &attn);
            norm::rms_norm(&x, &layer.post_norm, s.rms_norm_eps, &mut hbuf);
            // On error no cache has advanced: the rows appended so far are overwritten when the
            // same chunks run again.
            let y = self.feed_forward(l, &layer.ffn, &hbuf, total, experts)?;
            add(&mut x, &y);
        }
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }

        // Only each chunk's last position needs logits.
        let mut last = Vec::with_capacity(chunks.len() * h);
        let mut end = 0;
        for c in chunks.iter() {
            end += c.tokens.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        norm::rms_norm_inplace(&mut last, &self.norm, s.rms_norm_eps);
        let logits = self.lm_head.forward(&last, chunks.len(), &self.exec);
        Ok(logits.chunks_exact(s.vocab_size).map(<[f32]>::to_vec).collect())
    }

    fn attention(
        &self,
        l: usize,
        w: &AttentionWeights,
        h: &[f32],
        total: usize,
        chunks: &mut [Chunk<'_>],
        tables: &[(Vec<f32>, Vec<f32>)],
    ) -> Vec<f32> {
        let s = &self.spec;
        let (hd, nh, nkv) = (s.head_dim, s.num_heads, s.num_kv_heads);
        let mut q = w.q.forward(h, total, &self.exec);
        let mut k = w.k.forward(h, total, &self.exec);
        let mut v = w.v.forward(h, total, &self.exec);
        // q/k norms: per head (weight of head_dim) or over the whole projection.
        if let Some(qn) = &w.q_norm {
            norm::rms_norm_inplace(&mut q, qn, s.rms_norm_eps);
        }
        if let Some(kn) = &w.k_norm {
            norm::rms_norm_inplace(&mut k, kn, s.rms_norm_eps);
        }
        if let Some(c) = s.clip_qkv {
            for t in [&mut q, &mut k, &mut v] {
                t.iter_mut().for_each(|x| *x = x.clamp(-c, c));
            }
        }

        let mut out = vec![0.0f32; total * nh * hd];
        // Split q/k/v/out into per-chunk pieces and run each sequence in parallel.
        let mut pieces = Vec::with_capacity(chunks.len());
        let (mut qr, mut kr, mut vr, mut or) = (&mut q[..], &mut k[..], &v[..], &mut out[..]);
        for (c, table) in chunks.iter_mut().zip(tables) {
            let n = c.tokens.len();
            let (qa, qb) = qr.split_at_mut(n * nh * hd);
            let (ka, kb) = kr.split_at_mut(n * nkv * hd);
            let (va, vb) = vr.split_at(n * nkv * hd);
            let (oa, ob) = or.split_at_mut(n * nh * hd);
            pieces.push((c, table, qa, ka, va, oa));
            (qr, kr, vr, or) = (qb, kb, vb, ob);
        }
        pieces.into_par_iter().with_max_len(1).for_each(|(c, (cos, sin), q, k, v, o)| {
            let n = c.tokens.len();
            rope::apply_rope(q, n, nh, hd, cos, sin);
            rope::apply_rope(k, n, nkv, hd, cos, sin);
            let first_pos = c.cache.len();
            c.cache.append(l, k, v);
            let (kc, vc) = c.cache.layer(l, n);
            let (kc, vc): (Vec<&[f32]>, Vec<&[f32]>) =
                (kc.iter().map(Vec::as_slice).collect(), vc.iter().map(Vec::as_slice).collect());
            let params = attention::AttentionParams {
                n_tokens: n,
                first_pos,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                sliding_window: w.sliding_window,
                sinks: w.sinks.as_deref(),
            };
            attention::attention(q, &kc, &vc, o, params);
        });
        w.o.forward(&out, total, &self.exec)
    }

    fn feed_forward(
        &self,
        l: usize,
        ffn: &FeedForward,
        h: &[f32],
        total: usize,
        experts: &dyn Experts,
    ) -> Result<Vec<f32>> {
        match ffn {
            FeedForward::Dense(mlp) => Ok(mlp.forward(h, total, &self.exec)),
            FeedForward::Moe(block) => {
                let assignments = moe::route(&block.gate, block.routing, block.top_k, h, total, &self.exec);
                let mut y = experts.run(l, h, self.spec.hidden_size, &assignments)?;
                if let Some(shared) = &block.shared {
                    add(&mut y, &shared.forward(h, total, &self.exec));
                }
                Ok(y)
            }
        }
    }

    /// Bytes of all weights (dense and loaded experts).
    pub fn weight_bytes(&self) -> usize {
        let mut bytes = self.embed.size_in_bytes() + self.lm_head.size_in_bytes();
        for l in &self.layers {
            let a = &l.attention;
            bytes += a.q.size_in_bytes() + a.k.size_in_bytes() + a.v.size_in_bytes() + a.o.size_in_bytes();
            bytes += match &l.ffn {
                FeedForward::Dense(m) => m.size_in_bytes(),
                FeedForward::Moe(b) => {
                    b.gate.size_in_bytes()
                        + b.experts.iter().flatten().map(|e| e.size_in_bytes()).sum::<usize>()
                        + b.shared.as_ref().map_or(0, |s| s.mlp.size_in_bytes() + s.gate.size_in_bytes())
                }
            };
        }
        bytes
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
