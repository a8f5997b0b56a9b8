//! Sampling controls beyond temperature, top-k and top-p, with vLLM's semantics: presence,
//! frequency and repetition penalties, logit bias, banned words, min-p, min-tokens and stop
//! token ids. [`SamplingControls`] is what a request asks for and [`SamplingControls::validate`]
//! the one check of its values (each error names its field, as the HTTP API spells it);
//! [`Processor`] applies the rules to one sequence's logits on the engine thread, every step,
//! before the sampler picks, so a greedy request picks the argmax of the processed logits.
//!
//! The order is vLLM's: banned words, min-tokens, logit bias, then the penalties (repetition,
//! frequency, presence); temperature, min-p, top-k and top-p follow in the sampler.

use std::collections::{HashMap, HashSet};

use crate::error::ModelError;

/// Presence and frequency penalties lie in `[-MAX_PENALTY, MAX_PENALTY]` (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// Logit biases lie in `[-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]` (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// What a request sets beyond [`SamplingParams`](crate::SamplingParams); the default changes
/// nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingControls {
    /// Subtracted once from the logit of every token generated so far (OpenAI's formula).
    pub presence_penalty: f32,
    /// Subtracted from the logit of every generated token once per time it was generated.
    pub frequency_penalty: f32,
    /// Tokens of the prompt or generated so far have positive logits divided by it and negative
    /// ones multiplied by it (> 1 discourages repeating them), as transformers and vLLM apply it.
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens (each token once).
    pub logit_bias: Vec<(u32, f32)>,
    /// Token sequences never to generate: the last token of each is banned whenever the
    /// generated tokens end with the ones before it (a one-token sequence always).
    pub bad_words: Vec<Vec<u32>>,
    /// Tokens whose probability (after temperature) is below `min_p` times the most likely
    /// one's are dropped; no effect on greedy picks.
    pub min_p: f32,
    /// End-of-sequence tokens (unless end-of-sequence is ignored) and `stop_token_ids` are
    /// banned until this many tokens have been generated.
    pub min_tokens: usize,
    /// Generating any of these ends the sequence (finish reason `stop`).
    pub stop_token_ids: Vec<u32>,
}

impl Default for SamplingControls {
    fn default() -> Self {
        SamplingControls {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            bad_words: Vec::new(),
            min_p: 0.0,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
        }
    }
}

/// A control out of range: `field` is its name in the HTTP API.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{field}` {problem}")]
pub struct InvalidControl {
    pub field: &'static str,
    pub problem: String,
}

impl From<InvalidControl> for ModelError {
    fn from(e: InvalidControl) -> Self {
        ModelError::InvalidRequest(e.to_string())
    }
}

fn invalid(field: &'static str, problem: String) -> InvalidControl {
    InvalidControl { field, problem }
}

impl SamplingControls {
    /// Checks every value, naming the field of the first one out of range: the penalties,
    /// min-p and biases against vLLM's ranges, `min_tokens` against `max_tokens`, and (when
    /// `vocab_size` is given) every token id against the vocabulary.
    pub fn validate(&self, vocab_size: Option<usize>, max_tokens: usize) -> Result<(), InvalidControl> {
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return Err(invalid(field, format!("must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}")));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(
                "repetition_penalty",
                format!("must be greater than 0, got {}", self.repetition_penalty),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        if self.min_tokens > max_tokens {
            return Err(invalid(
                "min_tokens",
                format!("must be at most max_tokens ({max_tokens}), got {}", self.min_tokens),
            ));
        }
        let mut biased = HashSet::new();
        for &(id, bias) in &self.logit_bias {
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                return Err(invalid(
                    "logit_bias",
                    format!("values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias} for token {id}"),
                ));
            }
            if !biased.insert(id) {
                return Err(invalid("logit_bias", format!("names token {id} more than once")));
            }
        }
        if self.bad_words.iter().any(Vec::is_empty) {
            return Err(invalid("bad_words", "must not hold an empty word".into()));
        }
        if let Some(vocab) = vocab_size {
            let outside = |field: &'static str, id: u32| {
                invalid(field, format!("holds token id {id}, outside the vocabulary (size {vocab})"))
            };
            if let Some(&(id, _)) = self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
                return Err(outside("logit_bias", id));
            }
            if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(outside("stop_token_ids", id));
            }
            if let Some(&id) = self.bad_words.iter().flatten().find(|&&id| id as usize >= vocab) {
                return Err(outside("bad_words", id));
            }
        }
        Ok(())
    }

    /// Whether these controls can change which token a greedy pick makes (min-p and stop
    /// token ids alone cannot; min-tokens can when it bans something).
    pub fn changes_greedy(&self, ignore_eos: bool) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
            || !self.bad_words.is_empty()
            || (self.min_tokens > 0 && (!ignore_eos || !self.stop_token_ids.is_empty()))
    }
}

/// One sequence's controls with what they need to know of it: the distinct tokens of its
/// prompt and how often it has generated each token.
#[derive(Clone, Debug)]
pub struct Processor {
    controls: SamplingControls,
    /// Tokens `min_tokens` holds back: end-of-sequence (unless ignored) and stop token ids.
    stoppers: Vec<u32>,
    /// The prompt's distinct tokens (kept only for a repetition penalty).
    prompt: HashSet<u32>,
    /// How often each token was generated, and the generated tokens in order (both kept only
    /// when some rule reads them).
    counts: HashMap<u32, u32>,
    generated: Vec<u32>,
    generated_len: usize,
    changes_greedy: bool,
}

impl Processor {
    pub fn new(controls: SamplingControls, prompt_ids: &[u32], eos_token_ids: &[u32], ignore_eos: bool) -> Self {
        let mut stoppers = controls.stop_token_ids.clone();
        if !ignore_eos {
            stoppers.extend_from_slice(eos_token_ids);
        }
        let prompt =
            if controls.repetition_penalty != 1.0 { prompt_ids.iter().copied().collect() } else { HashSet::new() };
        let changes_greedy = controls.changes_greedy(ignore_eos);
        Processor {
            controls,
            stoppers,
            prompt,
            counts: HashMap::new(),
            generated: Vec::new(),
            generated_len: 0,
            changes_greedy,
        }
    }

    pub fn controls(&self) -> &SamplingControls {
        &self.controls
    }

    /// Whether [`Processor::apply`] can change the argmax of some logits.
    pub fn changes_greedy(&self) -> bool {
        self.changes_greedy
    }

    /// Applies the rules to the next token's `logits`, in place.
    pub fn apply(&self, logits: &mut [f32]) {
        if !self.changes_greedy {
            return;
        }
        let c = &self.controls;
        let mut ban = |id: u32| {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        };
        for word in &c.bad_words {
            let (last, before) = word.split_last().expect("validated: no empty word");
            if self.generated.ends_with(before) {
                ban(*last);
            }
        }
        if self.generated_len < c.min_tokens {
            self.stoppers.iter().for_each(|&id| ban(id));
        }
        for &(id, bias) in &c.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let p = c.repetition_penalty;
        if p != 1.0 {
            let penalise = |l: &mut f32| *l = if *l > 0.0 { *l / p } else { *l * p };
            let seen = self.prompt.iter().chain(self.counts.keys().filter(|&id| !self.prompt.contains(id)));
            for &id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    penalise(l);
                }
            }
        }
        if c.frequency_penalty != 0.0 || c.presence_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= c.frequency_penalty * n as f32 + c.presence_penalty;
                }
            }
        }
    }

    /// Records a generated token.
    pub fn push(&mut self, id: u32) {
        self.generated_len += 1;
        let c = &self.controls;
        if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 || c.repetition_penalty != 1.0 {
            *self.counts.entry(id).or_default() += 1;
        }
        if !c.bad_words.is_empty() {
            self.generated.push(id);
        }
    }

    /// Whether generating `id` ends the sequence as a stop token.
    pub fn is_stop_token(&self, id: u32) -> bool {
        self.controls.stop_token_ids.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_are_refused_by_field() {
        let ok = SamplingControls::default();
        assert!(ok.validate(Some(10), 5).is_ok());
        let cases: Vec<(SamplingControls, &str)> = vec![
            (SamplingControls { presence_penalty: 2.5, ..ok.clone() }, "presence_penalty"),
            (SamplingControls { frequency_penalty: -2.01, ..ok.clone() }, "frequency_penalty"),
            (SamplingControls { frequency_penalty: f32::NAN, ..ok.clone() }, "frequency_penalty"),
            (SamplingControls { repetition_penalty: 0.0, ..ok.clone() }, "repetition_penalty"),
            (SamplingControls { min_p: 1.5, ..ok.clone() }, "min_p"),
            (SamplingControls { min_tokens: 6, ..ok.clone() }, "min_tokens"),
            (SamplingControls { logit_bias: vec![(3, 101.0)], ..ok.clone() }, "logit_bias"),
            (SamplingControls { logit_bias: vec![(3, 1.0), (3, 2.0)], ..ok.clone() }, "logit_bias"),
            (SamplingControls { logit_bias: vec![(10, 1.0)], ..ok.clone() }, "logit_bias"),
            (SamplingControls { stop_token_ids: vec![11], ..ok.clone() }, "stop_token_ids"),
            (SamplingControls { bad_words: vec![vec![]], ..ok.clone() }, "bad_words"),
            (SamplingControls { bad_words: vec![vec![1, 12]], ..ok.clone() }, "bad_words"),
        ];
        for (c, want) in cases {
            assert_eq!(c.validate(Some(10), 5).unwrap_err().field, want);
        }
        // Vocabulary checks wait until the vocabulary is known.
        assert!(SamplingControls { stop_token_ids: vec![11], ..ok }.validate(None, 5).is_ok());
    }

    #[test]
    fn penalties_follow_openai_and_transformers() {
        let c = SamplingControls {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 0 is in the prompt, 1 was generated twice, 2 once and in the prompt, 3 never.
        let mut p = Processor::new(c, &[0, 2], &[], false);
        for id in [1, 2, 1] {
            p.push(id);
        }
        let mut logits = vec![4.0, -4.0, 4.0, 4.0];
        p.apply(&mut logits);
        assert_eq!(logits, vec![2.0, -8.0 - 0.5 - 0.5, 2.0 - 0.25 - 0.5, 4.0]);
    }

    #[test]
    fn bias_bad_words_and_min_tokens_ban_what_they_name() {
        let c = SamplingControls {
            logit_bias: vec![(3, -1.5)],
            bad_words: vec![vec![2], vec![1, 0]],
            min_tokens: 2,
            stop_token_ids: vec![4],
            ..Default::default()
        };
        let mut p = Processor::new(c, &[], &[5], false);
        let mut logits = vec![1.0; 6];
        p.apply(&mut logits);
        let inf = f32::NEG_INFINITY;
        assert_eq!(logits, vec![1.0, 1.0, inf, -0.5, inf, inf]);
        p.push(3);
        p.push(1);
        let mut logits = vec![1.0; 6];
        p.apply(&mut logits);
        // `0` would now follow `1`; two tokens are out, so eos and the stop token are allowed.
        assert_eq!(logits, vec![inf, 1.0, inf, -0.5, 1.0, 1.0]);
        assert!(p.is_stop_token(4) && !p.is_stop_token(5));
    }

    #[test]
    fn neutral_controls_change_no_greedy_pick() {
        let neutral = SamplingControls { min_p: 0.3, stop_token_ids: vec![1], ..Default::default() };
        assert!(!neutral.changes_greedy(false));
        assert!(!SamplingControls { min_tokens: 3, ..Default::default() }.changes_greedy(true));
        assert!(SamplingControls { min_tokens: 3, ..Default::default() }.changes_greedy(false));
    }
}
