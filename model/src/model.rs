//! [`Model`]: a loaded checkpoint on one backend and its forward pass over a batch of sequence
//! chunks — written once, for every device.
//!
//! One forward pass takes any mix of prefill chunks and single decode tokens from different
//! sequences; products and experts run over all of their rows at once, attention runs per
//! sequence against its own blocks of the shared KV cache.

use std::path::Path;
use std::sync::Arc;

use switchyard_kernels::backend::{self, MlaForm, SeqSpan};
use switchyard_kernels::cpu::Precision;
use switchyard_kernels::{Backend, Device, Tensor, Weight};

use crate::checkpoint::Checkpoint;
use crate::config::ModelSpec;
use crate::error::{ModelError, NonFiniteAt, Result};
use crate::kv_cache::{KvPool, SeqCache};
use crate::layers::{AttentionWeights, Exec, Mlp};
use crate::loader::{ExpertFilter, Names};
use crate::mla::{self, LatentAttention};
use crate::moe::{Assignment, Experts, MoeBlock};
use crate::rope::Rope;

#[allow(clippy::large_enum_variant)] // one per layer
pub enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// Which attention a layer has.
#[allow(clippy::large_enum_variant)] // one per layer
pub enum Attention {
    /// Keys and values per KV head.
    PerHead(AttentionWeights),
    /// DeepSeek's multi-head latent attention.
    Latent(LatentAttention),
}

impl Attention {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Attention::PerHead(a) => a.size_in_bytes(),
            Attention::Latent(a) => a.size_in_bytes(),
        }
    }
}

pub struct Layer {
    pub input_norm: Tensor,
    pub attention: Attention,
    pub post_norm: Tensor,
    pub ffn: FeedForward,
}

pub struct Model {
    pub spec: ModelSpec,
    /// The backend every forward pass runs on, the product precision, and the weight bytes
    /// streamed since last taken.
    pub exec: Exec,
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: Weight,
    pub(crate) rope: Rope,
    /// How MLA layers attend (the benchmark compares the forms; `Auto` otherwise).
    pub mla_form: MlaForm,
}

/// New tokens of one sequence for a forward pass.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

impl Model {
    /// Loads every weight of `dir` into host memory (views of the mapped files).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, Device::Cpu, &|_, _| true, &mut |_, _| {})
    }

    /// Loads the checkpoint in `dir` onto `device`, keeping the experts `keep(layer, expert)`
    /// accepts, and reports `progress(layers_done, layers_total)`.
    pub fn load_with(
        dir: &Path,
        device: Device,
        keep: ExpertFilter<'_>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::NotACheckpoint { path: dir.to_path_buf(), reason: "no such directory".into() });
        }
        let spec = ModelSpec::from_dir(dir)?;
        mla::check_device(&spec, device)?;
        let ckpt = Checkpoint::open(dir)?;
        let backend = switchyard_kernels::open(device)?;
        if spec.mtp_layers > 0 {
            tracing::info!(
                layers = spec.mtp_layers,
                "skipping the checkpoint's multi-token-prediction layers (speculative decoding does not use them)"
            );
        }
        let names = Names { ckpt: &ckpt, spec: &spec, backend: &*backend };
        let embed = names.embed()?;
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            layers.push(names.layer(l, keep)?);
            progress(l + 1, spec.num_layers);
        }
        let norm = names.final_norm()?;
        let lm_head = names.lm_head()?;
        let rope = Rope::new(&spec.rope, (spec.head_dim, spec.rotary_dim), spec.max_position_embeddings);
        tracing::info!(
            model_type = spec.arch.model_type(),
            layers = spec.num_layers,
            experts = spec.num_experts,
            bytes = ckpt.total_bytes(),
            device = %backend.describe(),
            "loaded checkpoint {}",
            dir.display()
        );
        Ok(Model {
            spec,
            exec: Exec::new(backend, Precision::F32),
            embed,
            layers,
            norm,
            lm_head,
            rope,
            mla_form: MlaForm::Auto,
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.exec.backend
    }

    pub fn device(&self) -> Device {
        self.exec.backend.device()
    }

    /// A KV pool of `blocks` blocks on this model's device.
    pub fn kv_pool(&self, blocks: usize) -> Result<Arc<KvPool>> {
        KvPool::new(self.exec.ops(), &self.spec, blocks)
    }

    /// The experts this process holds, as an [`Experts`] for another pass.
    pub fn experts(&self) -> LocalExperts<'_> {
        LocalExperts(self)
    }

    /// Runs `chunks` through the model, appending to their caches, and returns the logits of
    /// each chunk's last position, `[chunks, vocab]` on the model's device. MoE layers' experts
    /// run on `experts` where given, else on the ones held here.
    ///
    /// The hidden states are checked for NaN and infinities after the embedding and after each
    /// layer's attention and feed-forward, and so are the logits: the first to fail is a
    /// [`ModelError::NonFinite`] naming where.
    ///
    /// On error no cache has advanced: the rows written so far are overwritten when the same
    /// chunks run again.
    pub fn forward(&self, chunks: &mut [Chunk<'_>], experts: Option<&dyn Experts>) -> Result<Tensor> {
        self.forward_with(chunks, experts, &vec![false; chunks.len()])
    }

    /// [`Model::forward`] with the logits of every position of each chunk whose
    /// `every_position` entry is set (prompt log-probabilities), of the last position of the
    /// others: `[rows, vocab]`, the chunks' rows in order.
    pub fn forward_with(
        &self,
        chunks: &mut [Chunk<'_>],
        experts: Option<&dyn Experts>,
        every_position: &[bool],
    ) -> Result<Tensor> {
        let ops = self.exec.ops();
        let s = &self.spec;
        if every_position.len() != chunks.len() {
            return Err(ModelError::InvalidRequest(format!(
                "{} every-position flags for {} chunks",
                every_position.len(),
                chunks.len()
            )));
        }
        let Some(pool) = self.check(chunks)? else { return Ok(ops.zeros(0, s.vocab_size)?) };
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let mut x = ops.embed(&self.embed, &ids)?;
        let bad = ops.non_finite_rows(&x)?;
        if !bad.is_empty() {
            let mut token_ids: Vec<u32> = bad.iter().map(|&r| ids[r as usize]).collect();
            token_ids.sort_unstable();
            token_ids.dedup();
            return Err(ModelError::NonFinite { at: NonFiniteAt::Embedding { token_ids } });
        }
        // Rotary tables of every token, each sequence's from its own positions.
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for c in chunks.iter() {
            let positions: Vec<usize> = (c.cache.len()..c.cache.len() + c.tokens.len()).collect();
            let (c_, s_) = self.rope.tables(&positions);
            cos.extend(c_);
            sin.extend(s_);
        }
        let half = s.head_dim / 2;
        let rope = (ops.upload(&cos, ids.len(), half)?, ops.upload(&sin, ids.len(), half)?);

        let mut arena = pool.arena();
        let spans: Vec<(usize, usize, Vec<u32>)> = chunks
            .iter_mut()
            .map(|c| {
                let (first, n) = (c.cache.len(), c.tokens.len());
                let blocks = c.cache.blocks(first + n).expect("checked against the reservation").to_vec();
                (n, first, blocks)
            })
            .collect();
        let spans: Vec<SeqSpan<'_>> =
            spans.iter().map(|(n, first, b)| SeqSpan { tokens: *n, first_pos: *first, blocks: b }).collect();
        let batch = ops.kv_batch(pool.layout(), &arena, &spans)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = ops.rms_norm(&x, &layer.input_norm, s.rms_norm_eps)?;
            let a = match &layer.attention {
                Attention::PerHead(a) => a,
                Attention::Latent(a) => {
                    let step = mla::Step {
                        layer: l,
                        cos: &rope.0,
                        sin: &rope.1,
                        arena: &mut arena,
                        batch: &batch,
                        form: self.mla_form,
                    };
                    let o = a.forward(&self.exec, s, step, &h)?;
                    self.after_attention((l, layer), &mut x, &o, experts)?;
                    continue;
                }
            };
            let mut q = self.exec.linear(&h, &a.q)?;
            let mut k = self.exec.linear(&h, &a.k)?;
            let mut v = self.exec.linear(&h, &a.v)?;
            if let Some(w) = &a.q_norm {
                ops.rms_norm_inplace(&mut q, w, s.rms_norm_eps)?;
            }
            if let Some(w) = &a.k_norm {
                ops.rms_norm_inplace(&mut k, w, s.rms_norm_eps)?;
            }
            if let Some(c) = s.clip_qkv {
                for t in [&mut q, &mut k, &mut v] {
                    ops.clip(t, c)?;
                }
            }
            ops.rope(&mut q, &rope.0, &rope.1, s.num_heads)?;
            ops.rope(&mut k, &rope.0, &rope.1, s.num_kv_heads)?;
            ops.kv_write(&mut arena, &batch, l, &k, &v)?;
            let params = backend::Attention {
                layer: l,
                heads: s.num_heads,
                scale: 1.0 / (s.head_dim as f32).sqrt(),
                sliding_window: a.sliding_window,
                sinks: a.sinks.as_ref(),
            };
            let o = self.exec.linear(&ops.attention(&q, &arena, &batch, params)?, &a.o)?;
            self.after_attention((l, layer), &mut x, &o, experts)?;
        }
        drop(arena);

        // Each chunk's last position needs logits; every position where asked.
        let mut end = 0;
        let mut rows: Vec<u32> = Vec::with_capacity(chunks.len());
        for (c, &every) in chunks.iter().zip(every_position) {
            let start = end;
            end += c.tokens.len();
            if every {
                rows.extend(start as u32..end as u32);
            } else {
                rows.push((end - 1) as u32);
            }
        }
        let mut last = ops.gather_rows(&x, &rows)?;
        ops.rms_norm_inplace(&mut last, &self.norm, s.rms_norm_eps)?;
        let logits = self.exec.linear(&last, &self.lm_head)?;
        if !ops.non_finite_rows(&logits)?.is_empty() {
            return Err(ModelError::NonFinite { at: NonFiniteAt::Logits });
        }
        for c in chunks.iter_mut() {
            c.cache.advance(c.tokens.len());
        }
        Ok(logits)
    }

    /// The rest of layer `l` after its attention returned `o`: the residual, then the
    /// feed-forward (its experts on `experts` where given) and its residual, each checked for
    /// NaN and infinities.
    fn after_attention(
        &self,
        (l, layer): (usize, &Layer),
        x: &mut Tensor,
        o: &Tensor,
        experts: Option<&dyn Experts>,
    ) -> Result<()> {
        let (ops, s) = (self.exec.ops(), &self.spec);
        ops.add(x, o)?;
        // Before the gate sees them: NaN gate logits would route nowhere.
        if !ops.non_finite_rows(x)?.is_empty() {
            return Err(ModelError::NonFinite { at: NonFiniteAt::Attention { layer: l } });
        }
        let h = ops.rms_norm(x, &layer.post_norm, s.rms_norm_eps)?;
        let y = match &layer.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&self.exec, &h)?,
            FeedForward::Moe(block) => block.forward(&self.exec, l, &h, experts)?,
        };
        ops.add(x, &y)?;
        if !ops.non_finite_rows(x)?.is_empty() {
            let moe = matches!(layer.ffn, FeedForward::Moe(_));
            return Err(ModelError::NonFinite { at: NonFiniteAt::FeedForward { layer: l, moe } });
        }
        Ok(())
    }

    /// [`Model::forward`] with the logits in host memory, one row per chunk.
    pub fn logits(&self, chunks: &mut [Chunk<'_>], experts: Option<&dyn Experts>) -> Result<Vec<Vec<f32>>> {
        let logits = self.forward(chunks, experts)?;
        let v = self.spec.vocab_size;
        Ok(self.exec.ops().download(&logits)?.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// [`Model::forward_with`] with the logits in host memory: per chunk, its rows one after
    /// another (`tokens × vocab` values where `every_position`, else `vocab`).
    pub fn logits_with(
        &self,
        chunks: &mut [Chunk<'_>],
        experts: Option<&dyn Experts>,
        every_position: &[bool],
    ) -> Result<Vec<Vec<f32>>> {
        let rows: Vec<usize> =
            chunks.iter().zip(every_position).map(|(c, &every)| if every { c.tokens.len() } else { 1 }).collect();
        let logits = self.forward_with(chunks, experts, every_position)?;
        let v = self.spec.vocab_size;
        let all = self.exec.ops().download(&logits)?;
        let mut at = 0;
        Ok(rows
            .into_iter()
            .map(|n| {
                at += n * v;
                all[at - n * v..at].to_vec()
            })
            .collect())
    }

    /// [`Model::forward`] with the greedy pick made where the logits are: per chunk, the most
    /// likely next token (the lower id on ties) and its log-probability. Only two numbers per
    /// sequence leave the device.
    pub fn greedy(&self, chunks: &mut [Chunk<'_>], experts: Option<&dyn Experts>) -> Result<Vec<(u32, f32)>> {
        let logits = self.forward(chunks, experts)?;
        Ok(self.exec.ops().greedy(&logits)?)
    }

    /// Checks every chunk against the vocabulary, its cache and the context, and that every
    /// cache is in one pool on this model's device; returns that pool (`None`: no chunks).
    fn check(&self, chunks: &[Chunk<'_>]) -> Result<Option<Arc<KvPool>>> {
        let s = &self.spec;
        let Some(first) = chunks.first() else { return Ok(None) };
        let pool = first.cache.pool().clone();
        if pool.device() != self.device() {
            return Err(ModelError::InvalidRequest(format!(
                "the KV cache is on {} but the model runs on {}",
                pool.device(),
                self.device()
            )));
        }
        for c in chunks.iter() {
            if c.tokens.is_empty() {
                return Err(ModelError::InvalidRequest("a sequence chunk has no tokens".into()));
            }
            if !Arc::ptr_eq(c.cache.pool(), &pool) {
                return Err(ModelError::InvalidRequest("the sequences of one pass must share one KV pool".into()));
            }
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
        Ok(Some(pool))
    }

    /// Bytes of all weights (dense and loaded experts).
    pub fn weight_bytes(&self) -> usize {
        let mut bytes = self.embed.size_in_bytes() + self.lm_head.size_in_bytes();
        for l in &self.layers {
            bytes += l.attention.size_in_bytes();
            bytes += match &l.ffn {
                FeedForward::Dense(m) => m.size_in_bytes(),
                FeedForward::Moe(b) => b.size_in_bytes(),
            };
        }
        bytes
    }
}

/// A model's own experts as an [`Experts`] (to run them for another pass, or compare).
pub struct LocalExperts<'a>(&'a Model);

impl Experts for LocalExperts<'_> {
    fn run(&self, exec: &Exec, layer: usize, x: &Tensor, assignments: &[Assignment]) -> Result<Tensor> {
        match self.0.layers.get(layer).map(|l| &l.ffn) {
            Some(FeedForward::Moe(block)) => block.experts.run(exec, layer, x, assignments),
            _ => Err(ModelError::InvalidRequest(format!("layer {layer} has no experts"))),
        }
    }
}
