//! The single-process engine: a whole model in one process, generating for one or many
//! sequences. `switchyard generate` runs it, and it is the reference every distributed
//! topology must reproduce.

use std::path::Path;

use serde::Serialize;
use switchyard_kernels::cpu::routing::{log_softmax, top_k};

use crate::error::{ModelError, Result};
use crate::kv_cache::SeqCache;
use crate::model::{Chunk, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{self, Tokenizer};

/// Prompt tokens fed to one forward pass at most (bounds activation memory).
pub const PREFILL_CHUNK: usize = 512;

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
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GeneratedToken {
    pub id: u32,
    /// Log-probability under the model's raw distribution (before temperature, top-k, top-p).
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub tokens: Vec<GeneratedToken>,
    pub finish_reason: FinishReason,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
}

impl Engine {
    /// Loads the model, tokenizer and generation config in `dir`.
    pub fn load(dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let model = Model::load_with(dir, &|_, _| true, progress)?;
        let tokenizer = if dir.join("tokenizer.json").exists() { Some(Tokenizer::from_dir(dir)?) } else { None };
        let eos_token_ids = tokenizer::eos_token_ids(dir, tokenizer.as_ref(), &model.spec.eos_token_ids)?;
        Ok(Engine { model, tokenizer, eos_token_ids })
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
        if req.prompt_ids.len() + req.max_tokens.saturating_sub(1) > spec.max_context {
            return Err(ModelError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {} tokens",
                req.prompt_ids.len(),
                req.max_tokens,
                spec.max_context
            )));
        }
        req.sampling.validate().map_err(ModelError::InvalidRequest)
    }

    pub fn generate(&self, req: &GenerateRequest) -> Result<Generation> {
        Ok(self.generate_batch(std::slice::from_ref(req))?.remove(0))
    }

    /// Generates for every request together: prompts are prefilled in chunks, then all
    /// running sequences decode one token per step in one batch until each finishes.
    pub fn generate_batch(&self, reqs: &[GenerateRequest]) -> Result<Vec<Generation>> {
        for r in reqs {
            self.validate(r)?;
        }
        let spec = &self.model.spec;
        let mut caches: Vec<SeqCache> = reqs.iter().map(|_| SeqCache::new(spec)).collect();
        let mut samplers: Vec<Sampler> = reqs.iter().map(|r| Sampler::new(r.sampling.clone())).collect();
        let mut outs: Vec<Vec<GeneratedToken>> = vec![Vec::new(); reqs.len()];
        let mut finish: Vec<Option<FinishReason>> =
            reqs.iter().map(|r| (r.max_tokens == 0).then_some(FinishReason::Length)).collect();

        // Prefill: feed each prompt in chunks; the last chunk's logits give the first token.
        let mut next: Vec<Option<Vec<f32>>> = vec![None; reqs.len()];
        for (i, r) in reqs.iter().enumerate() {
            if finish[i].is_some() {
                continue;
            }
            for piece in r.prompt_ids.chunks(PREFILL_CHUNK) {
                let mut chunk = [Chunk { tokens: piece, cache: &mut caches[i] }];
                next[i] = self.model.forward(&mut chunk)?.pop();
            }
        }
        loop {
            // Sample from the latest logits of every running sequence.
            let mut step_tokens: Vec<(usize, u32)> = Vec::new();
            for i in 0..reqs.len() {
                let Some(logits) = next[i].take() else { continue };
                let tok = self.pick(&logits, &mut samplers[i], reqs[i].top_logprobs);
                let id = tok.id;
                outs[i].push(tok);
                if !reqs[i].ignore_eos && self.eos_token_ids.contains(&id) {
                    finish[i] = Some(FinishReason::Stop);
                } else if outs[i].len() >= reqs[i].max_tokens {
                    finish[i] = Some(FinishReason::Length);
                } else {
                    step_tokens.push((i, id));
                }
            }
            if step_tokens.is_empty() {
                break;
            }
            let ids: Vec<[u32; 1]> = step_tokens.iter().map(|&(_, id)| [id]).collect();
            let mut chunks: Vec<Chunk<'_>> = Vec::with_capacity(step_tokens.len());
            let mut rest = &mut caches[..];
            let mut offset = 0;
            for (&(i, _), id) in step_tokens.iter().zip(&ids) {
                let (_, tail) = rest.split_at_mut(i - offset);
                let (cache, tail) = tail.split_first_mut().expect("index in range");
                chunks.push(Chunk { tokens: id, cache });
                rest = tail;
                offset = i + 1;
            }
            let logits = self.model.forward(&mut chunks)?;
            for (&(i, _), l) in step_tokens.iter().zip(logits) {
                next[i] = Some(l);
            }
        }
        Ok(reqs
            .iter()
            .zip(outs)
            .zip(finish)
            .map(|((r, tokens), f)| Generation {
                prompt_ids: r.prompt_ids.clone(),
                tokens,
                finish_reason: f.unwrap_or(FinishReason::Length),
            })
            .collect())
    }

    fn pick(&self, logits: &[f32], sampler: &mut Sampler, n_top: usize) -> GeneratedToken {
        let id = sampler.sample(logits);
        let lp = log_softmax(logits);
        let top_logprobs = top_k(&lp, n_top).into_iter().map(|i| TopLogprob { id: i as u32, logprob: lp[i] }).collect();
        GeneratedToken { id, logprob: lp[id as usize], top_logprobs }
    }
}
