//! The single-process engine: a whole model in one process, generating for one or many
//! sequences. `switchyard generate` runs it, and it is the reference every distributed
//! topology must reproduce.

use std::path::Path;

use std::sync::Arc;

use serde::Serialize;
use switchyard_kernels::Device;
use switchyard_kernels::cpu::Precision;
use switchyard_kernels::cpu::routing::{log_softmax, top_k};

use crate::controls::{Processor, SamplingControls};
use crate::error::{ModelError, Result};
use crate::grammar::Constraint;
use crate::kv_cache::{KvPool, SeqCache, blocks_for};
use crate::model::{Chunk, Model};
use crate::moe::Experts;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{self, Tokenizer};

/// Prompt tokens fed to one forward pass at most (bounds activation memory).
pub const PREFILL_CHUNK: usize = 512;

/// Bytes of logits one sequence that scores its prompt may bring out of one pass (a row of
/// `vocab` floats per prompt token fed): its prefill chunks are cut shorter to stay under it.
pub const PROMPT_LOGITS_BYTES: usize = 256 << 20;

/// What to generate for one prompt.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// How many of the most likely alternatives to report per token (0: none).
    pub top_logprobs: usize,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Compute every prompt token's log-probability (but the first's) in the prefill, with
    /// this many of the most likely alternatives each; `None`: not computed. With it,
    /// `max_tokens` 0 runs the prefill and generates nothing.
    pub prompt_logprobs: Option<usize>,
    /// Where prefix caching is on, only sequences of the same salt share KV blocks (the
    /// router salts with the tenant, so one tenant cannot time another's prompts).
    pub cache_salt: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// A prompt token's log-probability given the tokens before it, from the prefill.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptLogprob {
    pub id: u32,
    /// Under the model's raw distribution, as [`GeneratedToken::logprob`].
    pub logprob: f32,
    /// 1 + how many tokens the model found more likely (vLLM's rank).
    pub rank: usize,
    /// The most likely tokens at that position, best first (as many as the request asked).
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GeneratedToken {
    pub id: u32,
    /// Log-probability under the model's raw distribution (before any control, temperature,
    /// min-p, top-k or top-p), as vLLM reports it by default.
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop token id was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Log-probabilities of `prompt_ids[1..]` where the request asked for them (else empty).
    pub prompt_logprobs: Vec<PromptLogprob>,
    pub tokens: Vec<GeneratedToken>,
    pub finish_reason: FinishReason,
}

/// One request's generation in progress: its cache, sampler, controls and tokens so far.
/// Made by [`Engine::start`] or [`Engine::start_with`], advanced by [`Engine::step`].
pub struct Sequence {
    pub request: GenerateRequest,
    cache: SeqCache,
    sampler: Sampler,
    processor: Processor,
    /// The grammar its tokens follow (structured output), if any.
    constraint: Option<Constraint>,
    /// Why it stopped early: its grammar could not continue (it is also finished).
    pub failure: Option<String>,
    /// Prompt tokens fed so far.
    fed: usize,
    /// Log-probabilities of the prompt tokens fed so far, from the second on (where asked).
    pub prompt_logprobs: Vec<PromptLogprob>,
    /// Whether [`Sequence::take_prompt_logprobs`] has handed them out.
    prompt_logprobs_taken: bool,
    pub tokens: Vec<GeneratedToken>,
    pub finish_reason: Option<FinishReason>,
}

impl Sequence {
    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// Leading prompt tokens whose keys and values came from the prefix cache.
    pub fn cached_tokens(&self) -> usize {
        self.cache.prefix_hit().tokens
    }

    pub fn controls(&self) -> &SamplingControls {
        self.processor.controls()
    }

    /// Makes its tokens follow `constraint` from the next one picked on. The sequence ends
    /// once the grammar is complete, and fails ([`Sequence::failure`]) if it cannot continue.
    pub fn constrain(&mut self, constraint: Constraint) {
        self.constraint = Some(constraint);
    }

    /// Whether the next pass over `range` of this sequence's input picks a token.
    fn picks_after(&self, range: &std::ops::Range<usize>) -> bool {
        (self.is_decoding() || range.end == self.request.prompt_ids.len()) && self.request.max_tokens > 0
    }

    /// Whether the prompt has been fed whole.
    pub fn is_decoding(&self) -> bool {
        self.fed == self.request.prompt_ids.len()
    }

    /// The prompt's log-probabilities, once, as soon as the whole prompt is fed (`None`
    /// before, after, and where the request did not ask for them).
    pub fn take_prompt_logprobs(&mut self) -> Option<Vec<PromptLogprob>> {
        if self.request.prompt_logprobs.is_none() || !self.is_decoding() || self.prompt_logprobs_taken {
            return None;
        }
        self.prompt_logprobs_taken = true;
        Some(std::mem::take(&mut self.prompt_logprobs))
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            prompt_ids: self.request.prompt_ids,
            prompt_logprobs: self.prompt_logprobs,
            tokens: self.tokens,
            finish_reason: self.finish_reason.unwrap_or(FinishReason::Length),
        }
    }
}

/// What a forward pass returned for one sequence: its logits (every position's, one row after
/// another, where it asked for prompt log-probabilities; else the last position's), or the
/// greedy pick already made on the device.
enum Scores {
    Logits(Vec<f32>),
    Picked((u32, f32)),
}

/// Where and how an [`Engine`] runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineOptions {
    /// Where the weights, the KV cache and the forward pass live.
    pub device: Device,
    /// Bytes of the KV cache every sequence reserves from; `None`: one whole context.
    pub kv_bytes: Option<usize>,
    pub precision: Precision,
    /// Reuse the KV blocks of prompt prefixes seen before (see [`KvPool`]).
    pub prefix_caching: bool,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    /// Where the MoE layers' experts run; `None`: the experts loaded in `model`.
    pub experts: Option<Box<dyn Experts>>,
    /// The KV blocks sequences share, on the model's device.
    pub kv_pool: Arc<KvPool>,
    /// Threads that compute grammar masks while the forward pass runs; built the first time
    /// a constrained sequence steps (`None` inside: they could not be started, and masks are
    /// computed after the pass instead).
    mask_threads: std::sync::OnceLock<Option<rayon::ThreadPool>>,
}

/// Threads for grammar masks: half the cores, at least one and at most eight. A mask
/// costs tens of microseconds to a few milliseconds (llguidance bounds each step's work),
/// and the masks of a batch are independent of each other.
fn mask_threads() -> Option<rayon::ThreadPool> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    rayon::ThreadPoolBuilder::new()
        .num_threads(cores.div_ceil(2).clamp(1, 8))
        .thread_name(|i| format!("grammar-mask-{i}"))
        .build()
        .inspect_err(|e| tracing::warn!("grammar masks are computed after each forward pass: {e}"))
        .ok()
}

impl Engine {
    /// Loads the model, tokenizer and generation config in `dir`.
    pub fn load(dir: &Path, options: &EngineOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let model = Model::load_with(dir, options.device, &|_, _| true, progress)?;
        Self::with_model(dir, model, None, options)
    }

    /// Loads everything in `dir` but the experts, which run on `experts` (a router's
    /// dispatcher to expert nodes).
    pub fn load_dense(
        dir: &Path,
        experts: Box<dyn Experts>,
        options: &EngineOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let model = Model::load_with(dir, options.device, &|_, _| false, progress)?;
        Self::with_model(dir, model, Some(experts), options)
    }

    fn with_model(
        dir: &Path,
        mut model: Model,
        experts: Option<Box<dyn Experts>>,
        options: &EngineOptions,
    ) -> Result<Self> {
        model.exec.precision = options.precision;
        let tokenizer = if dir.join("tokenizer.json").exists() { Some(Tokenizer::from_dir(dir)?) } else { None };
        let eos_token_ids = tokenizer::eos_token_ids(dir, tokenizer.as_ref(), &model.spec.eos_token_ids)?;
        let kv_pool = Self::pool(&model, options.kv_bytes)?;
        kv_pool.set_prefix_caching(options.prefix_caching);
        Ok(Engine { model, tokenizer, eos_token_ids, experts, kv_pool, mask_threads: std::sync::OnceLock::new() })
    }

    fn pool(model: &Model, kv_bytes: Option<usize>) -> Result<Arc<KvPool>> {
        let spec = &model.spec;
        let pool = match kv_bytes {
            Some(bytes) => KvPool::with_bytes(model.exec.ops(), spec, bytes)?,
            None => model.kv_pool(blocks_for(spec.max_context))?,
        };
        if pool.capacity() == 0 {
            return Err(ModelError::InvalidRequest(format!(
                "a KV cache of {} bytes holds no block ({} bytes each)",
                kv_bytes.unwrap_or(0),
                pool.block_bytes()
            )));
        }
        tracing::info!(blocks = pool.capacity(), block_bytes = pool.block_bytes(), device = %pool.device(), "KV cache");
        Ok(pool)
    }

    /// Replaces the KV cache with one of `bytes` (sequences already started keep theirs).
    pub fn set_kv_bytes(&mut self, bytes: usize) -> Result<()> {
        let caching = self.kv_pool.prefix_caching();
        self.kv_pool = Self::pool(&self.model, Some(bytes))?;
        self.kv_pool.set_prefix_caching(caching);
        Ok(())
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::Tokenizer("the checkpoint has no tokenizer.json; pass token ids".into()))
    }

    /// Checks a request against the model before any compute.
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        let spec = &self.model.spec;
        if req.prompt_ids.is_empty() {
            return Err(ModelError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&id) = req.prompt_ids.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab_size: spec.vocab_size });
        }
        if req.prompt_ids.len() > spec.max_context {
            return Err(ModelError::PromptTooLong {
                prompt_tokens: req.prompt_ids.len(),
                max_context: spec.max_context,
            });
        }
        // The last sampled token is never fed back, so it needs no position.
        if req.prompt_ids.len().saturating_add(req.max_tokens.saturating_sub(1)) > spec.max_context {
            return Err(ModelError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {} tokens",
                req.prompt_ids.len(),
                req.max_tokens,
                spec.max_context
            )));
        }
        req.sampling.validate().map_err(ModelError::InvalidRequest)
    }

    /// [`Engine::validate`], and `controls` against the request and the vocabulary.
    pub fn validate_with(&self, req: &GenerateRequest, controls: &SamplingControls) -> Result<()> {
        self.validate(req)?;
        Ok(controls.validate(Some(self.model.spec.vocab_size), req.max_tokens)?)
    }

    /// KV positions `req` may need: its prompt and every generated token but the last.
    pub fn kv_tokens(req: &GenerateRequest) -> usize {
        req.prompt_ids.len().saturating_add(req.max_tokens.saturating_sub(1)).max(1)
    }

    /// Validates `req` and makes its [`Sequence`], ready for [`Engine::step`], reserving its
    /// KV blocks in the shared pool (an error if the pool has not enough available now).
    pub fn start(&self, req: GenerateRequest) -> Result<Sequence> {
        self.start_with(req, SamplingControls::default())
    }

    /// [`Engine::start`] with sampling controls.
    pub fn start_with(&self, req: GenerateRequest, controls: SamplingControls) -> Result<Sequence> {
        self.validate_with(&req, &controls)?;
        if controls != SamplingControls::default() {
            tracing::debug!(?controls, "sampling controls");
        }
        let pool = &self.kv_pool;
        let tokens = Self::kv_tokens(&req);
        let (salt, max_hit) = (req.cache_salt.as_deref().unwrap_or(""), Self::max_prefix_hit(&req));
        let cache = SeqCache::reserve_for(pool, tokens, &req.prompt_ids, salt, max_hit).ok_or_else(|| {
            ModelError::KvCacheFull {
                blocks: pool.blocks_needed(tokens, &req.prompt_ids, salt, max_hit),
                available: pool.available(),
                capacity: pool.capacity(),
            }
        })?;
        let hit = cache.prefix_hit().tokens;
        if hit > 0 {
            tracing::debug!(cached_tokens = hit, prompt_tokens = req.prompt_ids.len(), "prefix cache hit");
        }
        Ok(Sequence {
            cache,
            sampler: Sampler::new(req.sampling.clone()).with_min_p(controls.min_p),
            processor: Processor::new(controls, &req.prompt_ids, &self.eos_token_ids, req.ignore_eos),
            constraint: None,
            failure: None,
            fed: hit,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_taken: false,
            tokens: Vec::new(),
            // Nothing to compute, unless the prompt's log-probabilities are asked for.
            finish_reason: (req.max_tokens == 0 && req.prompt_logprobs.is_none()).then_some(FinishReason::Length),
            request: req,
        })
    }

    /// Prompt positions `req` may take from the prefix cache: all but the last (whose logits
    /// pick the first token), none where the prompt's log-probabilities are asked for (they
    /// come from the prefill).
    fn max_prefix_hit(req: &GenerateRequest) -> usize {
        if req.prompt_logprobs.is_some() { 0 } else { req.prompt_ids.len().saturating_sub(1) }
    }

    /// KV blocks `req` would reserve from [`KvPool::available`] now (less the cached blocks
    /// of its prefix that other sequences hold: those it shares).
    pub fn blocks_needed(&self, req: &GenerateRequest) -> usize {
        let salt = req.cache_salt.as_deref().unwrap_or("");
        self.kv_pool.blocks_needed(Self::kv_tokens(req), &req.prompt_ids, salt, Self::max_prefix_hit(req))
    }

    pub fn generate(&self, req: &GenerateRequest) -> Result<Generation> {
        Ok(self.generate_batch(std::slice::from_ref(req))?.remove(0))
    }

    /// [`Engine::generate`] with sampling controls.
    pub fn generate_with(&self, req: &GenerateRequest, controls: &SamplingControls) -> Result<Generation> {
        let mut seq = self.start_with(req.clone(), controls.clone())?;
        while !seq.is_finished() {
            self.step(&mut [&mut seq], usize::MAX)?;
        }
        Ok(seq.into_generation())
    }

    /// Generates for every request together, one [`Engine::step`] after another until each
    /// finishes.
    pub fn generate_batch(&self, reqs: &[GenerateRequest]) -> Result<Vec<Generation>> {
        let mut seqs = reqs.iter().map(|r| self.start(r.clone())).collect::<Result<Vec<_>>>()?;
        while seqs.iter().any(|s| !s.is_finished()) {
            let mut running: Vec<&mut Sequence> = seqs.iter_mut().collect();
            self.step(&mut running, usize::MAX)?;
        }
        Ok(seqs.into_iter().map(Sequence::into_generation).collect())
    }

    /// Runs one forward pass over the unfinished sequences of `seqs`: decoding ones feed their
    /// last token, prefilling ones their next prompt piece (at most [`PREFILL_CHUNK`] tokens,
    /// fewer where [`PROMPT_LOGITS_BYTES`] asks, and no more than `token_budget` tokens in all,
    /// decode tokens first). Every sequence
    /// whose prompt is now fed samples its next token, which is returned in its slot (but one
    /// with `max_tokens` 0, which finishes). Sequences that asked for prompt log-probabilities
    /// get them for every position of the piece they feed, so any chunking gives the same.
    ///
    /// On error no sequence has changed, so the step can be run again.
    pub fn step(&self, seqs: &mut [&mut Sequence], token_budget: usize) -> Result<Vec<Option<GeneratedToken>>> {
        // What each sequence feeds: a range of its prompt, or its last generated token.
        let mut budget = token_budget;
        let mut feeds: Vec<Option<std::ops::Range<usize>>> = vec![None; seqs.len()];
        for (feed, s) in feeds.iter_mut().zip(seqs.iter()) {
            if !s.is_finished() && s.is_decoding() && budget > 0 {
                *feed = Some(0..1);
                budget -= 1;
            }
        }
        for (feed, s) in feeds.iter_mut().zip(seqs.iter()) {
            if !s.is_finished() && !s.is_decoding() && budget > 0 {
                let mut n = (s.request.prompt_ids.len() - s.fed).min(PREFILL_CHUNK).min(budget);
                if s.request.prompt_logprobs.is_some() {
                    let row = self.model.spec.vocab_size * std::mem::size_of::<f32>();
                    n = n.min((PROMPT_LOGITS_BYTES / row.max(1)).max(1));
                }
                *feed = Some(s.fed..s.fed + n);
                budget -= n;
            }
        }
        if feeds.iter().all(Option::is_none) {
            return Ok(vec![None; seqs.len()]);
        }

        // Where every token picked this step is greedy on the model's own logits with no
        // alternatives reported, the device may pick it and return two numbers instead of a
        // row of logits.
        let greedy = feeds.iter().zip(seqs.iter()).all(|(feed, s)| {
            feed.is_none()
                || (s.request.sampling.is_greedy()
                    && s.request.top_logprobs == 0
                    && !s.processor.changes_greedy()
                    && s.constraint.is_none()
                    && (s.is_decoding() || s.request.prompt_logprobs.is_none()))
        });
        let mut chunks = Vec::new();
        let mut every_position = Vec::new();
        // The grammars of the sequences that pick a token after this pass: their masks are
        // computed while the pass runs.
        let mut masks: Vec<&mut Constraint> = Vec::new();
        for (feed, s) in feeds.iter().zip(seqs.iter_mut()) {
            let Some(range) = feed.clone() else { continue };
            every_position.push(!s.is_decoding() && s.request.prompt_logprobs.is_some());
            let picks = s.picks_after(&range);
            let Sequence { request, cache, tokens, fed, constraint, .. } = &mut **s;
            if let Some(c) = constraint.as_mut().filter(|_| picks) {
                masks.push(c);
            }
            let tokens: &[u32] = if *fed == request.prompt_ids.len() {
                std::slice::from_ref(&tokens.last().expect("a decoding sequence has sampled").id)
            } else {
                &request.prompt_ids[range]
            };
            chunks.push(Chunk { tokens, cache });
        }
        let experts = self.experts.as_deref();
        let mut forward = || -> Result<_> {
            Ok(if greedy {
                (Some(self.model.greedy(&mut chunks, experts)?.into_iter()), Vec::new())
            } else {
                (None, self.model.logits_with(&mut chunks, experts, &every_position)?)
            })
        };
        let pool = if masks.is_empty() { None } else { self.mask_threads.get_or_init(mask_threads).as_ref() };
        let (picks, logits) = match pool {
            // Each mask on the first free mask thread; the scope ends when the pass and every
            // mask are done. Without mask threads, `pick` computes each mask after the pass.
            Some(pool) => pool.in_place_scope(|scope| {
                for c in masks {
                    scope.spawn(move |_| c.prepare());
                }
                forward()
            })?,
            None => forward()?,
        };
        drop(chunks);
        // The blocks this pass filled are ready for other sequences to reuse.
        for (feed, s) in feeds.iter().zip(seqs.iter_mut()) {
            if feed.is_some() {
                let Sequence { request, tokens, cache, .. } = &mut **s;
                let prompt = &request.prompt_ids;
                cache.register_full_blocks(|p| prompt.get(p).copied().unwrap_or_else(|| tokens[p - prompt.len()].id));
            }
        }

        let mut logits = logits.into_iter();
        let mut picks = picks;
        let mut out = vec![None; seqs.len()];
        for ((feed, s), slot) in feeds.into_iter().zip(seqs.iter_mut()).zip(&mut out) {
            let Some(range) = feed else { continue };
            let scores = match &mut picks {
                Some(p) => Scores::Picked(p.next().expect("one pick per chunk")),
                None => Scores::Logits(logits.next().expect("one logits row per chunk")),
            };
            let scores = match scores {
                Scores::Logits(rows) if !s.is_decoding() && s.request.prompt_logprobs.is_some() => {
                    Scores::Logits(Self::record_prompt_logprobs(rows, range.clone(), s))
                }
                scores => scores,
            };
            if !s.is_decoding() {
                s.fed = range.end;
                if !s.is_decoding() {
                    continue;
                }
                if s.request.max_tokens == 0 {
                    s.finish_reason = Some(FinishReason::Length);
                    continue;
                }
            }
            let tok = match scores {
                Scores::Logits(logits) => match Self::pick(logits, s) {
                    Ok(tok) => tok,
                    Err(failure) => {
                        s.failure = Some(failure);
                        s.finish_reason = Some(FinishReason::Stop);
                        continue;
                    }
                },
                Scores::Picked((id, logprob)) => GeneratedToken { id, logprob, top_logprobs: Vec::new() },
            };
            s.tokens.push(tok.clone());
            s.processor.push(tok.id);
            let eos = !s.request.ignore_eos && self.eos_token_ids.contains(&tok.id);
            let complete = match s.constraint.as_mut().map(|c| c.commit(tok.id).map(|()| c.is_complete())) {
                Some(Err(failure)) => {
                    s.failure = Some(failure);
                    false
                }
                Some(Ok(complete)) => complete,
                None => false,
            };
            if eos || complete || s.failure.is_some() || s.processor.is_stop_token(tok.id) {
                s.finish_reason = Some(FinishReason::Stop);
            } else if s.tokens.len() >= s.request.max_tokens {
                s.finish_reason = Some(FinishReason::Length);
            }
            *slot = Some(tok);
        }
        Ok(out)
    }

    /// Records, from the logits of every position of `s`'s prompt piece `range` (`rows`, one
    /// after another), the log-probability of each prompt token they predict; returns the last
    /// position's logits.
    fn record_prompt_logprobs(rows: Vec<f32>, range: std::ops::Range<usize>, s: &mut Sequence) -> Vec<f32> {
        let vocab = rows.len() / range.len();
        let n_top = s.request.prompt_logprobs.unwrap_or(0);
        for (row, pos) in rows.chunks_exact(vocab).zip(range.clone()) {
            // Position `pos` predicts the token after it; the last prompt position predicts
            // the first generated token, which is not the prompt's.
            let Some(&id) = s.request.prompt_ids.get(pos + 1) else { break };
            let lp = log_softmax(row);
            let logprob = lp[id as usize];
            let rank = 1 + lp.iter().filter(|&&x| x > logprob).count();
            let top_logprobs =
                top_k(&lp, n_top).into_iter().map(|i| TopLogprob { id: i as u32, logprob: lp[i] }).collect();
            s.prompt_logprobs.push(PromptLogprob { id, logprob, rank, top_logprobs });
        }
        rows[rows.len() - vocab..].to_vec()
    }

    /// Picks `s`'s next token from the model's `logits`: log-probabilities come from them as
    /// they are, the pick from them after the sequence's controls and grammar. Fails when its
    /// grammar allows no token.
    fn pick(mut logits: Vec<f32>, s: &mut Sequence) -> std::result::Result<GeneratedToken, String> {
        let lp = log_softmax(&logits);
        s.processor.apply(&mut logits);
        if let Some(c) = &mut s.constraint {
            c.apply(&mut logits)?;
        }
        let id = s.sampler.sample(&logits);
        let n_top = s.request.top_logprobs;
        let top_logprobs = top_k(&lp, n_top).into_iter().map(|i| TopLogprob { id: i as u32, logprob: lp[i] }).collect();
        Ok(GeneratedToken { id, logprob: lp[id as usize], top_logprobs })
    }
}
