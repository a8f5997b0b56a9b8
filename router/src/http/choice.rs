//! [`Choice`]: one generated sequence of an OpenAI request, from submission to finish: turns
//! the engine's tokens into text deltas (holding back an incomplete UTF-8 character and
//! anything that may be the start of a stop string), stops at stop strings (searched once
//! `min_tokens` are out, as vLLM does), leaves a stop token id out of the text, and cancels
//! the sequence in the engine when it stops early or is dropped.

use std::collections::BTreeMap;

use switchyard_model::engine::{GeneratedToken, PromptLogprob};
use switchyard_model::grammar::Constraint;
use switchyard_model::tokenizer::Tokenizer;
use switchyard_model::{FinishReason, GenerateRequest, SamplingControls, SamplingParams};
use tokio::sync::mpsc;

use super::api::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprobs, PromptTokenLogprob, TopLogprob};
use super::error::ApiError;

use crate::scheduler::{Event, Scheduler, ServeError, Submission};
use crate::tenants::Reservation;

/// Generation settings shared by every choice of a request.
#[derive(Clone, Debug)]
pub struct Params {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Penalties, logit bias, banned words (as token ids), min-p, min-tokens, stop token ids.
    pub controls: SamplingControls,
    /// `bad_words` as sent, until they are tokenized into `controls`.
    pub bad_words: Vec<String>,
    /// Alternatives to report per token; `None`: no log-probabilities at all.
    pub logprobs: Option<usize>,
    /// The prompt's log-probabilities are computed in the prefill, with this many
    /// alternatives per token (`echo` with `logprobs`, or `prompt_logprobs`); `None`: not.
    pub prompt_logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs` as asked (alternatives per prompt token); `None`: not asked.
    pub vllm_prompt_logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub tokens_as_ids: bool,
    /// `cache_salt` as sent.
    pub cache_salt: Option<String>,
    /// The grammar the output follows (structured output, tool calls); each choice follows
    /// its own copy.
    pub constraint: Option<Constraint>,
}

/// What a choice produced since the last call.
#[derive(Default)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<GeneratedToken>,
    /// Where in the choice's text each of `tokens` starts, in characters (as OpenAI counts).
    pub offsets: Vec<usize>,
    pub finish: Option<&'static str>,
}

pub struct Choice {
    pub index: usize,
    /// The tenant's share of the request (and its concurrency slot), held until the choice
    /// ends; generated tokens are counted against it and the rest given back at the end.
    reservation: Option<Reservation>,
    pub prompt_ids: Vec<u32>,
    /// Log-probabilities of `prompt_ids[1..]`, where [`Params::prompt_logprobs`] asks.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// Leading prompt tokens the prefix cache held.
    pub cached_tokens: usize,
    events: Option<mpsc::UnboundedReceiver<Result<Event, ServeError>>>,
    ids: Vec<u32>,
    /// The decoded text of `ids` so far (cut at a stop string once one is seen); an
    /// unfinished character waits in the ids past `read_offset`.
    text: String,
    /// Incremental decoding: `ids[prefix_offset..read_offset]` gives the context the next
    /// token is decoded against, so each token costs a few ids of decoding, not all of them.
    prefix_offset: usize,
    read_offset: usize,
    /// Bytes of `text` already handed out.
    sent: usize,
    stop: Vec<String>,
    /// Stop strings are searched only once more than this many tokens are out.
    min_tokens: usize,
    stop_token_ids: Vec<u32>,
    /// Whether the choice ended on a stop token id (counted, but not part of the text).
    on_stop_token: bool,
    finish: Option<&'static str>,
}

impl Choice {
    /// Submits one sequence and waits until the engine accepts it (and, where the prompt's
    /// log-probabilities are asked for, until its prefill has computed them).
    pub async fn start(
        scheduler: &Scheduler,
        prompt_ids: Vec<u32>,
        params: &Params,
        index: usize,
        mut reservation: Option<Reservation>,
    ) -> Result<Self, ApiError> {
        let (events, mut rx) = mpsc::unbounded_channel();
        let tenant = reservation.as_ref().map(|r| (r.tenant().name.clone(), r.tenant().priority));
        // Tenants share no cached prefix (one could time another's prompts), nor do requests
        // of different salts.
        let cache_salt = match (&tenant, &params.cache_salt) {
            (None, None) => None,
            (t, salt) => {
                let t = t.as_ref().map_or("", |t| t.0.as_str());
                Some(format!("{}:{t}{}", t.len(), salt.as_deref().unwrap_or("")))
            }
        };
        let request = GenerateRequest {
            prompt_ids: prompt_ids.clone(),
            max_tokens: params.max_tokens,
            sampling: params.sampling.clone(),
            top_logprobs: params.logprobs.unwrap_or(0),
            ignore_eos: params.ignore_eos,
            prompt_logprobs: params.prompt_logprobs,
            cache_salt,
        };
        scheduler.submit(Submission {
            request,
            controls: params.controls.clone(),
            constraint: params.constraint.clone(),
            events,
            priority: tenant.as_ref().map_or(0, |t| t.1),
            tenant: tenant.map(|t| t.0),
            span: tracing::Span::current(),
        })?;
        let cached_tokens = match rx.recv().await {
            Some(Ok(Event::Started { cached_tokens, .. })) => {
                if let Some(r) = &mut reservation {
                    r.started();
                }
                cached_tokens
            }
            Some(Ok(other)) => return Err(ServeError::Internal(format!("unexpected first event {other:?}")).into()),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ServeError::ShuttingDown.into()),
        };
        // They come before any token.
        let prompt_logprobs = match params.prompt_logprobs {
            None => None,
            Some(_) => match rx.recv().await {
                Some(Ok(Event::PromptLogprobs(p))) => Some(p),
                Some(Ok(other)) => {
                    return Err(
                        ServeError::Internal(format!("expected prompt log-probabilities, got {other:?}")).into()
                    );
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ServeError::ShuttingDown.into()),
            },
        };
        Ok(Choice {
            index,
            reservation,
            prompt_ids,
            cached_tokens,
            prompt_logprobs,
            events: Some(rx),
            ids: Vec::new(),
            text: String::new(),
            prefix_offset: 0,
            read_offset: 0,
            sent: 0,
            stop: params.stop.clone(),
            min_tokens: params.controls.min_tokens,
            stop_token_ids: params.controls.stop_token_ids.clone(),
            on_stop_token: false,
            finish: None,
        })
    }

    pub fn completion_tokens(&self) -> usize {
        self.ids.len() + usize::from(self.on_stop_token)
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Waits for the next token (or the end) and returns what can be handed out now; `None`
    /// once the choice has finished.
    pub async fn next(&mut self, tokenizer: Option<&Tokenizer>) -> Result<Option<Delta>, ApiError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let Some(events) = &mut self.events else { return Ok(None) };
        let mut delta = Delta::default();
        match events.recv().await {
            Some(Ok(Event::Token(t))) => {
                if let Some(r) = &mut self.reservation {
                    r.generated(1);
                }
                delta.offsets.push(self.text.chars().count());
                if self.stop_token_ids.contains(&t.id) {
                    // The engine ends the sequence on it; like an end-of-sequence token it is
                    // counted but not shown, and what was held back goes out.
                    delta.tokens.push(t);
                    self.on_stop_token = true;
                    let searched_from = self.text.len();
                    self.decode_new(tokenizer, true);
                    if let Some(at) = self.find_stop(searched_from) {
                        self.text.truncate(at);
                    }
                    self.end("stop");
                } else {
                    self.ids.push(t.id);
                    delta.tokens.push(t);
                    let searched_from = self.text.len();
                    self.decode_new(tokenizer, false);
                    if let Some(at) = self.find_stop(searched_from) {
                        self.text.truncate(at);
                        self.end("stop");
                    }
                }
            }
            Some(Ok(Event::Finished(reason))) => {
                // Whatever is still undecoded (an unfinished character) goes out as it is.
                let searched_from = self.text.len();
                self.decode_new(tokenizer, true);
                if let Some(at) = self.find_stop(searched_from) {
                    self.text.truncate(at);
                }
                self.end(match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                });
            }
            Some(Ok(Event::Started { .. } | Event::PromptLogprobs(_))) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ServeError::ShuttingDown.into()),
        }
        let mut release = if self.finish.is_some() { self.text.len() } else { self.text.len() - self.held_back() };
        // Never cut inside a character (a byte-fallback decoder can shorten the text when a
        // character completes).
        while !self.text.is_char_boundary(release) {
            release -= 1;
        }
        if release > self.sent && self.text.is_char_boundary(self.sent) {
            delta.text = self.text[self.sent..release].to_string();
            self.sent = release;
        }
        delta.finish = self.finish;
        Ok(Some(delta))
    }

    fn end(&mut self, reason: &'static str) {
        self.finish = Some(reason);
        // Dropping the receiver tells the engine to drop the sequence; dropping the
        // reservation gives back the tokens it did not generate.
        self.events = None;
        self.reservation = None;
    }

    /// Appends the text of the ids past `read_offset`, decoded against the few ids before
    /// them, once it forms whole characters (or at once when `flush`).
    fn decode_new(&mut self, tokenizer: Option<&Tokenizer>, flush: bool) {
        let Some(tk) = tokenizer else { return };
        let prefix = tk.decode(&self.ids[self.prefix_offset..self.read_offset]).unwrap_or_default();
        let full = tk.decode(&self.ids[self.prefix_offset..]).unwrap_or_default();
        let whole = !full.ends_with('\u{FFFD}') || flush;
        if full.len() > prefix.len() && whole && full.is_char_boundary(prefix.len()) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
    }

    /// Where the first stop string starts in the text, if one has appeared; only text from
    /// `from` on (less the longest stop string) is new and searched.
    fn find_stop(&self, from: usize) -> Option<usize> {
        if self.ids.len() <= self.min_tokens {
            return None;
        }
        let longest = self.stop.iter().map(String::len).max()?;
        let mut start = from.saturating_sub(longest);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        self.stop.iter().filter_map(|s| self.text[start..].find(s.as_str())).min().map(|i| start + i)
    }

    /// Trailing bytes that must wait: an incomplete character (decoded as one or more U+FFFD,
    /// one per byte with byte-fallback decoders), or a prefix of a stop string.
    fn held_back(&self) -> usize {
        let replacement = self.text.len() - self.text.trim_end_matches('\u{FFFD}').len();
        let mut hold = replacement;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        hold
    }

    /// Runs to the end; returns the whole text, every token with its offset, and the reason.
    pub async fn collect(mut self, tokenizer: Option<&Tokenizer>) -> Result<Collected, ApiError> {
        let mut out = Collected { index: self.index, prompt_tokens: self.prompt_ids.len(), ..Default::default() };
        while let Some(d) = self.next(tokenizer).await? {
            out.text.push_str(&d.text);
            out.tokens.extend(d.tokens);
            out.offsets.extend(d.offsets);
            out.finish = d.finish.unwrap_or(out.finish);
        }
        out.completion_tokens = self.completion_tokens();
        Ok(out)
    }
}

#[derive(Default)]
pub struct Collected {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<GeneratedToken>,
    pub offsets: Vec<usize>,
    pub finish: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A token as the API shows it: its text, or `token_id:N` when asked.
pub fn token_str(id: u32, tokenizer: Option<&Tokenizer>, as_ids: bool) -> String {
    match tokenizer {
        Some(t) if !as_ids => t.token_text(id),
        _ => format!("token_id:{id}"),
    }
}

/// The legacy completions `logprobs` object.
pub fn completion_logprobs(
    tokens: &[GeneratedToken],
    offsets: &[usize],
    tk: Option<&Tokenizer>,
    as_ids: bool,
) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| token_str(t.id, tk, as_ids)).collect(),
        token_logprobs: tokens.iter().map(|t| Some(t.logprob)).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| Some(t.top_logprobs.iter().map(|x| (token_str(x.id, tk, as_ids), x.logprob)).collect()))
            .collect(),
        text_offset: offsets.to_vec(),
    }
}

/// Where each of `ids` starts in their decoded text (as [`Tokenizer::decode`] gives it), in
/// characters, decoded incrementally as [`Choice`] decodes generated tokens.
pub fn text_offsets(ids: &[u32], tokenizer: Option<&Tokenizer>) -> Vec<usize> {
    let Some(tk) = tokenizer else { return vec![0; ids.len()] };
    let (mut len, mut prefix_offset, mut read_offset) = (0, 0, 0);
    let mut offsets = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        offsets.push(len);
        let prefix = tk.decode(&ids[prefix_offset..read_offset]).unwrap_or_default();
        let full = tk.decode(&ids[prefix_offset..=i]).unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            len += full[prefix.len()..].chars().count();
            prefix_offset = read_offset;
            read_offset = i + 1;
        }
    }
    offsets
}

/// The legacy completions `logprobs` object of an echoed prompt: the first token has no
/// log-probability (`null`s), each other one its own and its `top` most likely alternatives,
/// with itself added where it is not among them (as vLLM reports them).
pub fn prompt_completion_logprobs(
    prompt_ids: &[u32],
    logprobs: &[PromptLogprob],
    offsets: &[usize],
    top: usize,
    tk: Option<&Tokenizer>,
    as_ids: bool,
) -> CompletionLogprobs {
    let mut token_logprobs = vec![None];
    let mut top_logprobs = vec![None];
    for p in logprobs {
        token_logprobs.push(Some(p.logprob));
        let mut alternatives: BTreeMap<String, f32> =
            p.top_logprobs.iter().take(top).map(|x| (token_str(x.id, tk, as_ids), x.logprob)).collect();
        alternatives.entry(token_str(p.id, tk, as_ids)).or_insert(p.logprob);
        top_logprobs.push(Some(alternatives));
    }
    CompletionLogprobs {
        tokens: prompt_ids.iter().map(|&id| token_str(id, tk, as_ids)).collect(),
        token_logprobs,
        top_logprobs,
        text_offset: offsets.to_vec(),
    }
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token a map from
/// token id (as a string) to its `logprob`, `rank` and `decoded_token`, holding the token itself
/// and its `top` most likely alternatives.
pub fn vllm_prompt_logprobs(
    logprobs: &[PromptLogprob],
    top: usize,
    tk: Option<&Tokenizer>,
    as_ids: bool,
) -> PromptLogprobs {
    let entry = |id: u32, logprob: f32, rank: usize| {
        (id.to_string(), PromptTokenLogprob { logprob, rank, decoded_token: token_str(id, tk, as_ids) })
    };
    let mut out = vec![None];
    for p in logprobs {
        let mut m = BTreeMap::new();
        let (id, logprob) = entry(p.id, p.logprob, p.rank);
        m.insert(id, logprob);
        for (i, x) in p.top_logprobs.iter().take(top).enumerate() {
            let (id, logprob) = entry(x.id, x.logprob, if x.id == p.id { p.rank } else { i + 1 });
            m.insert(id, logprob);
        }
        out.push(Some(m));
    }
    out
}

/// The chat `logprobs` object.
pub fn chat_logprobs(tokens: &[GeneratedToken], tk: Option<&Tokenizer>, as_ids: bool) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        let token = token_str(id, tk, as_ids);
        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
    };
    let content = tokens
        .iter()
        .map(|t| {
            let TopLogprob { token, logprob, bytes } = top(t.id, t.logprob);
            let top_logprobs = t.top_logprobs.iter().map(|x| top(x.id, x.logprob)).collect();
            ChatTokenLogprob { token, logprob, bytes, top_logprobs }
        })
        .collect();
    ChatLogprobs { content }
}
