//! `/v1/completions` and `/v1/chat/completions`: validate, tokenize (chat through the
//! checkpoint's template), start every choice (`n` per prompt), then answer with one JSON
//! body or stream server-sent events ending in `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{IntoResponse, Response};
use switchyard_model::SamplingParams;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::api::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, Completion, CompletionChoice,
    CompletionLogprobs, GenerateRefusals, PromptLogprobs, Usage,
};
use super::choice::{
    Choice, Collected, Delta, Params, chat_logprobs, completion_logprobs, prompt_completion_logprobs, text_offsets,
    vllm_prompt_logprobs,
};
use super::error::ApiError;
use super::message::{MessageParser, Parts};
use super::openai::{ChatRequest, CompletionRequest, Controls, Prompt, Sampling, prompts, stops};
use super::structured::{self, Tools};
use super::{ApiJson, Caller, HttpState, chat};
use crate::tokenize::{TokenizeError, Tokenizing};

/// Most choices one request may ask for (`n` times the prompts).
const MAX_CHOICES: usize = 128;
/// Chat's default `max_tokens` when the request sets none: the rest of the context, but no
/// more than this (each sequence reserves KV-cache blocks for its whole `max_tokens`).
const DEFAULT_CHAT_MAX_TOKENS: usize = 2048;
/// Most alternatives per token, as OpenAI allows.
const MAX_LOGPROBS: u32 = 20;

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Completions,
    Chat,
}

fn request_id(api: Api) -> String {
    super::unique_id(if api == Api::Chat { "chatcmpl-" } else { "cmpl-" })
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks the shared fields and builds the generation settings; the bad words they name are
/// left to [`tokenize_bad_words`]. `max_tokens` 0 is accepted only with `echo`.
pub(crate) fn params(
    s: &Sampling,
    max_tokens: Option<u64>,
    default_max: usize,
    logprobs: Option<u32>,
    vocab_size: usize,
    echo: bool,
) -> Result<Params, ApiError> {
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("`temperature` must be in [0, 2], got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(format!("`top_p` must be in (0, 1], got {top_p}"), Some("top_p")));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid(format!("`top_k` must be -1, 0 or positive, got {k}"), Some("top_k"))),
    };
    let max_tokens = match max_tokens {
        Some(0) if echo => 0,
        Some(0) => {
            return Err(ApiError::invalid(
                "`max_tokens` must be at least 1 (0 only with `echo`, to score the prompt alone)",
                Some("max_tokens"),
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => default_max,
    };
    if let Some(n) = logprobs
        && n > MAX_LOGPROBS
    {
        return Err(ApiError::invalid(format!("`logprobs` must be at most {MAX_LOGPROBS}, got {n}"), Some("logprobs")));
    }
    let Controls { controls, bad_words, best_of } = s.controls()?;
    controls.validate(Some(vocab_size), max_tokens).map_err(|e| ApiError::invalid(e.to_string(), Some(e.field)))?;
    let n = choices_per_prompt(s)?;
    match best_of {
        Some(b) if b < n as u64 => {
            return Err(ApiError::invalid(format!("`best_of` must be at least `n` ({n}), got {b}"), Some("best_of")));
        }
        Some(b) if b > n as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "`best_of` greater than `n` is not supported (got best_of {b}, n {n}): every generated \
                     sequence is returned; leave `best_of` out or set it to `n`"
                ),
                Some("best_of"),
            ));
        }
        _ => {}
    }
    Ok(Params {
        max_tokens,
        sampling: SamplingParams { temperature, top_p, top_k, seed: s.seed },
        controls,
        bad_words,
        logprobs: logprobs.map(|n| n as usize),
        prompt_logprobs: None,
        vllm_prompt_logprobs: None,
        ignore_eos: s.ignore_eos,
        stop: stops(s.stop.as_ref())?,
        tokens_as_ids: s.return_tokens_as_token_ids,
        cache_salt: cache_salt(s)?,
        constraint: None,
    })
}

/// Most bytes of a `cache_salt`.
const MAX_CACHE_SALT_BYTES: usize = 256;

fn cache_salt(s: &Sampling) -> Result<Option<String>, ApiError> {
    match s.cache_salt.as_deref() {
        None => Ok(None),
        Some("") => Err(ApiError::invalid("`cache_salt` must be a non-empty string", Some("cache_salt"))),
        Some(salt) if salt.len() > MAX_CACHE_SALT_BYTES => Err(ApiError::invalid(
            format!("`cache_salt` must be at most {MAX_CACHE_SALT_BYTES} bytes, got {}", salt.len()),
            Some("cache_salt"),
        )),
        Some(salt) => Ok(Some(salt.to_string())),
    }
}

/// Turns `params.bad_words` into the token sequences the engine bans, as vLLM does: each word
/// as written (leading spaces dropped) and, where the tokenizer gives it a different
/// first token of the same count, with one leading space (a word in the middle of a text).
pub(crate) async fn tokenize_bad_words(tokenizing: &Tokenizing, params: &mut Params) -> Result<(), ApiError> {
    let words = std::mem::take(&mut params.bad_words);
    if words.is_empty() {
        return Ok(());
    }
    let bytes = words.iter().map(|w| w.len() + 1).sum();
    tokenizing.check_size("bad_words", bytes)?;
    let texts: Vec<String> =
        words.iter().flat_map(|w| [w.trim_start().to_string(), format!(" {}", w.trim_start())]).collect();
    let encoded = tokenizing.encode(texts, false).await.map_err(|e| match e {
        TokenizeError::Failed { message, .. } => TokenizeError::Failed { field: "bad_words", message },
        e => e,
    })?;
    for (word, pair) in words.iter().zip(encoded.chunks(2)) {
        let (plain, spaced) = (&pair[0], &pair[1]);
        if plain.is_empty() {
            return Err(ApiError::invalid(format!("`bad_words` holds an empty word: {word:?}"), Some("bad_words")));
        }
        params.controls.bad_words.push(plain.clone());
        if spaced.len() == plain.len() && spaced[0] != plain[0] {
            params.controls.bad_words.push(spaced.clone());
        }
    }
    Ok(())
}

fn choices_per_prompt(s: &Sampling) -> Result<usize, ApiError> {
    match s.n.unwrap_or(1) {
        0 => Err(ApiError::invalid("`n` must be at least 1", Some("n"))),
        n => Ok(n as usize),
    }
}

/// Starts `n` choices per prompt; choice `i` of a seeded request uses seed + i so the
/// choices differ but repeat.
async fn start(
    state: &HttpState,
    caller: Caller,
    prompts: Vec<Vec<u32>>,
    n: usize,
    params: &Params,
) -> Result<Vec<Choice>, ApiError> {
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::invalid(format!("at most {MAX_CHOICES} choices per request (prompts × n)"), Some("n")));
    }
    // A tenant's request reserves what it may use (n × (prompt + max_tokens)); each choice
    // holds its share and gives back what it does not generate.
    let mut reservations = match &caller.0 {
        Some(tenant) => {
            let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let reserved =
                tenant.admit(&lengths, n, params.max_tokens).await.map_err(|e| ApiError::over_limit(tenant, e))?;
            reserved.into_iter().map(Some).collect::<Vec<_>>()
        }
        None => Vec::new(),
    }
    .into_iter();
    // A JoinSet aborts the starts if this handler is dropped (the client left): the queued
    // requests are then cancelled instead of lingering in the queue.
    let mut pending = tokio::task::JoinSet::new();
    for (p, ids) in prompts.into_iter().enumerate() {
        for i in 0..n {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(i as u64));
            let (scheduler, ids, reservation) = (state.scheduler.clone(), ids.clone(), reservations.next().flatten());
            let start = async move { Choice::start(&scheduler, ids, &params, p * n + i, reservation).await };
            pending.spawn(start.instrument(tracing::Span::current()));
        }
    }
    let mut choices = Vec::with_capacity(pending.len());
    while let Some(started) = pending.join_next().await {
        choices.push(started.map_err(|e| ApiError::from(crate::scheduler::ServeError::Internal(e.to_string())))??);
    }
    choices.sort_by_key(|c| c.index);
    Ok(choices)
}

/// Prompt tokens of a request: each distinct prompt once, however many choices it has.
/// Prompt tokens of a request's choices, each distinct prompt once, and how many of them
/// came from the prefix cache.
fn prompt_tokens(choices: &[Choice], n: usize) -> (usize, usize) {
    let distinct = || choices.iter().step_by(n);
    (distinct().map(|c| c.prompt_ids.len()).sum(), distinct().map(|c| c.cached_tokens).sum())
}

/// The request's span, named and attributed after the OpenTelemetry GenAI conventions.
fn request_span(api: Api, s: &Sampling) -> tracing::Span {
    let operation = if api == Api::Chat { "chat" } else { "text_completion" };
    tracing::info_span!(
        "generate",
        otel.name = format!("{operation} {}", s.model),
        otel.kind = "server",
        gen_ai.operation.name = operation,
        gen_ai.system = "switchyard",
        gen_ai.request.model = %s.model,
        gen_ai.request.max_tokens = s.max_tokens,
        gen_ai.request.temperature = s.temperature.unwrap_or(1.0),
        gen_ai.request.top_p = s.top_p.unwrap_or(1.0),
        gen_ai.request.seed = s.seed,
        gen_ai.response.id = tracing::field::Empty,
        gen_ai.response.finish_reasons = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
    )
}

fn record_usage(id: &str, prompt_tokens: usize, completion_tokens: usize, reasons: &[&str]) {
    let span = tracing::Span::current();
    span.record("gen_ai.response.id", id);
    span.record("gen_ai.usage.input_tokens", prompt_tokens as i64);
    span.record("gen_ai.usage.output_tokens", completion_tokens as i64);
    span.record("gen_ai.response.finish_reasons", reasons.join(","));
}

fn join_caller_trace(span: &tracing::Span, headers: &HeaderMap) {
    crate::trace::join_caller(span, |k| Some(headers.get(k)?.to_str().ok()?.to_string()));
}

/// Generates text after each prompt (or between it and `suffix`).
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, server-sent events of completions ending in `data: [DONE]`",
            content((Completion = "application/json"), (String = "text/event-stream"))),
        GenerateRefusals,
    ),
)]
pub async fn completions(
    State(state): State<Arc<HttpState>>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(r): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let span = request_span(Api::Completions, &r.sampling);
    join_caller_trace(&span, &headers);
    completions_in(state, caller, r).instrument(span).await
}

async fn completions_in(state: Arc<HttpState>, caller: Caller, r: CompletionRequest) -> Result<Response, ApiError> {
    state.check_model(&r.sampling.model)?;
    let mut params = params(&r.sampling, r.sampling.max_tokens, 16, r.logprobs, state.scheduler.vocab_size, r.echo)?;
    params.vllm_prompt_logprobs = vllm_prompt_logprobs_asked(r.prompt_logprobs()?)?;
    // The echoed prompt's log-probabilities and vLLM's `prompt_logprobs` both come from the
    // prefill, with as many alternatives as either shows.
    let echoed = if r.echo { params.logprobs } else { None };
    params.prompt_logprobs = match (echoed, params.vllm_prompt_logprobs) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
    };
    // Refused cheaply, before the prompt is tokenized, when over a limit now.
    state.precheck(&caller)?;
    if let Some((grammar, field)) = structured::requested(&r.sampling)? {
        params.constraint = Some(state.tokenizing.compile(grammar, field).await?);
    }
    tokenize_bad_words(&state.tokenizing, &mut params).await?;
    let prompts = prompts(&r.prompt)?;
    let mut texts: Vec<String> = prompts
        .iter()
        .filter_map(|p| match p {
            Prompt::Text(t) => Some(t.clone()),
            Prompt::Ids(_) => None,
        })
        .collect();
    if let Some(suffix) = r.suffix()? {
        texts = fill_in_the_middle(&state, &r, texts, prompts.len(), suffix)?;
    }
    let mut encoded = state.tokenizing.encode(texts, true).await?.into_iter();
    let ids: Vec<Vec<u32>> = prompts
        .into_iter()
        .map(|p| match p {
            Prompt::Ids(ids) => ids,
            Prompt::Text(_) => encoded.next().unwrap_or_default(),
        })
        .collect();
    let n = choices_per_prompt(&r.sampling)?;
    let choices = start(&state, caller, ids, n, &params).await?;
    respond(state, Api::Completions, choices, n, params, &r.sampling, r.echo, None).await
}

/// vLLM's `prompt_logprobs` as asked: at most [`MAX_LOGPROBS`] alternatives.
pub(crate) fn vllm_prompt_logprobs_asked(k: Option<u64>) -> Result<Option<usize>, ApiError> {
    match k {
        Some(k) if k > MAX_LOGPROBS as u64 => Err(ApiError::invalid(
            format!("`prompt_logprobs` must be at most {MAX_LOGPROBS}, got {k}"),
            Some("prompt_logprobs"),
        )),
        k => Ok(k.map(|k| k as usize)),
    }
}

/// The model's fill-in-the-middle prompts for text `prompts` and `suffix`: the completion is
/// what goes between them (an empty suffix: the end of the file). A model without FIM tokens
/// takes an empty suffix as the plain completion it means; any other suffix is refused, naming
/// `suffix`, as is a request that cannot be a FIM one.
fn fill_in_the_middle(
    state: &HttpState,
    r: &CompletionRequest,
    prompts: Vec<String>,
    sent: usize,
    suffix: &str,
) -> Result<Vec<String>, ApiError> {
    let refuse = |why: &str| ApiError::invalid(format!("`suffix` {why}"), Some("suffix"));
    let Some(fim) = state.tokenizing.fim() else {
        if suffix.is_empty() {
            return Ok(prompts);
        }
        return Err(refuse(
            "needs a model trained for fill-in-the-middle; this model's tokenizer has none of the FIM token \
             families (<|fim_prefix|>, <fim_prefix>, <\u{ff5c}fim\u{2581}begin\u{ff5c}>, [PREFIX])",
        ));
    };
    if prompts.len() != sent {
        return Err(refuse("needs a text prompt (token ids cannot be placed around the suffix)"));
    }
    if r.echo {
        return Err(refuse("cannot be combined with `echo`"));
    }
    // Tokenizing checks the size of the prompts built, suffixes included.
    Ok(prompts.iter().map(|prefix| fim.prompt(prefix, suffix)).collect())
}

/// Generates the assistant's next message.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The message; with `stream`, server-sent events of chunks ending in `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatChunk = "text/event-stream"))),
        GenerateRefusals,
    ),
)]
pub async fn chat(
    State(state): State<Arc<HttpState>>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(r): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let span = request_span(Api::Chat, &r.sampling);
    join_caller_trace(&span, &headers);
    chat_in(state, caller, r).instrument(span).await
}

async fn chat_in(state: Arc<HttpState>, caller: Caller, r: ChatRequest) -> Result<Response, ApiError> {
    state.check_model(&r.sampling.model)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid("`messages` is empty", Some("messages")));
    }
    let prompt_logprobs = vllm_prompt_logprobs_asked(r.prompt_logprobs()?)?;
    if prompt_logprobs.is_some() && r.sampling.stream {
        return Err(ApiError::invalid(
            "`prompt_logprobs` is not supported with `stream` on /v1/chat/completions; ask without `stream`",
            Some("prompt_logprobs"),
        ));
    }
    // Refused cheaply, before the chat is rendered and tokenized, when over a limit now.
    state.precheck(&caller)?;
    let tools = structured::tools(r.tools.as_ref(), r.tool_choice.as_ref(), r.parallel_tool_calls)?;
    let options = chat::render_options(&state, &r, tools.as_ref())?;
    let grammar =
        match (structured::requested(&r.sampling)?, tools.as_ref().and_then(|t| chat::tool_grammar(&state, t))) {
            (Some((_, field)), Some(_)) => {
                return Err(ApiError::invalid(
                    format!("`{field}` and a `tool_choice` that requires a call both constrain the output; send one"),
                    Some(field),
                ));
            }
            (Some((grammar, field)), None) => Some((chat::output_grammar(&state, grammar), field)),
            (None, Some(grammar)) => {
                structured::without_min_tokens(&r.sampling, "tool_choice")?;
                Some((grammar, "tool_choice"))
            }
            (None, None) => None,
        };
    let constraint = match grammar {
        Some((grammar, field)) => Some(state.tokenizing.compile(grammar, field).await?),
        None => None,
    };
    let ids = state.tokenizing.chat(r.messages, options).await?;
    let logprobs = if r.logprobs { Some(r.top_logprobs.unwrap_or(0)) } else { None };
    let max_tokens = r.max_completion_tokens.or(r.sampling.max_tokens);
    let mut default_max = state.max_context.saturating_sub(ids.len()).clamp(1, DEFAULT_CHAT_MAX_TOKENS);
    // Without a `max_tokens`, a tenant's request reserves no more than its per-minute limit
    // allows (an explicit one over it is refused by name).
    if let (Some(tenant), None) = (&caller.0, max_tokens)
        && let Some(limit) = tenant.tokens_per_minute()
    {
        let n = r.sampling.n.unwrap_or(1).max(1) as usize;
        default_max = default_max.min((limit / n).saturating_sub(ids.len()).max(1));
    }
    let mut params = params(&r.sampling, max_tokens, default_max, logprobs, state.scheduler.vocab_size, false)?;
    params.vllm_prompt_logprobs = prompt_logprobs;
    params.prompt_logprobs = prompt_logprobs;
    params.constraint = constraint;
    tokenize_bad_words(&state.tokenizing, &mut params).await?;
    let n = choices_per_prompt(&r.sampling)?;
    let choices = start(&state, caller, vec![ids], n, &params).await?;
    respond(state, Api::Chat, choices, n, params, &r.sampling, false, tools).await
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    state: Arc<HttpState>,
    api: Api,
    choices: Vec<Choice>,
    n: usize,
    params: Params,
    s: &Sampling,
    echo: bool,
    tools: Option<Tools>,
) -> Result<Response, ApiError> {
    let id = request_id(api);
    let include_usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let head = Head { id, created: now(), model: state.model_name.clone(), api };
    if s.stream {
        let (tx, rx) = mpsc::channel(64);
        let task = stream(state, head, choices, n, params, include_usage, echo, tools, tx);
        tokio::spawn(task.instrument(tracing::Span::current()));
        return Ok(SseBody::new(ReceiverStream::new(rx)).into_response());
    }
    let (prompt_tokens, cached_tokens) = prompt_tokens(&choices, n);
    let tk = state.tokenizer.as_deref();
    let mut done: Vec<Collected> = Vec::with_capacity(choices.len());
    let prompt_texts: Vec<String> = choices.iter().map(|c| echo_text(&state, c, echo)).collect();
    let prompt_parts: Vec<PromptParts> = choices.iter().map(|c| prompt_parts(c, &params, echo, tk)).collect();
    for c in choices {
        done.push(c.collect(tk).await?);
    }
    let completion_tokens = done.iter().map(|c| c.completion_tokens).sum();
    let reasons: Vec<&str> = done.iter().map(|c| c.finish).collect();
    record_usage(&head.id, prompt_tokens, completion_tokens, &reasons);
    let usage = Some(Usage::new(prompt_tokens, cached_tokens, completion_tokens));
    let logprobs = |c: &Collected, prefix: &str, echoed: Option<CompletionLogprobs>| {
        params.logprobs.map(|_| {
            let prefix_chars = prefix.chars().count();
            let offsets: Vec<usize> = c.offsets.iter().map(|o| o + prefix_chars).collect();
            let generated = completion_logprobs(&c.tokens, &offsets, tk, params.tokens_as_ids);
            match echoed {
                Some(mut echoed) => {
                    echoed.extend(generated);
                    echoed
                }
                None => generated,
            }
        })
    };
    let body = match api {
        Api::Completions => {
            let choices = done
                .iter()
                .zip(prompt_texts)
                .zip(prompt_parts)
                .map(|((c, prefix), parts)| CompletionChoice {
                    index: c.index,
                    logprobs: logprobs(c, &prefix, parts.logprobs),
                    text: prefix + &c.text,
                    finish_reason: Some(c.finish),
                    prompt_logprobs: parts.vllm,
                })
                .collect();
            Json(head.completion(choices, usage)).into_response()
        }
        Api::Chat => {
            let choices = done
                .iter()
                .map(|c| {
                    let (message, finish_reason) = chat::assistant_message(&state, tools.as_ref(), c);
                    ChatChoice {
                        index: c.index,
                        message,
                        logprobs: params.logprobs.map(|_| chat_logprobs(&c.tokens, tk, params.tokens_as_ids)),
                        finish_reason,
                    }
                })
                .collect();
            // Every choice has the same prompt: its log-probabilities are the response's.
            let prompt_logprobs = prompt_parts.into_iter().next().and_then(|p| p.vllm);
            let Head { id, created, model, .. } = head;
            let usage = Usage::new(prompt_tokens, cached_tokens, completion_tokens);
            Json(ChatCompletion { id, object: "chat.completion", created, model, choices, usage, prompt_logprobs })
                .into_response()
        }
    };
    Ok(body)
}

/// What a completions choice shows of its prompt's log-probabilities.
struct PromptParts {
    /// The echoed prompt's part of `logprobs` (`echo` with `logprobs`).
    logprobs: Option<CompletionLogprobs>,
    /// vLLM's `prompt_logprobs`, where asked.
    vllm: Option<PromptLogprobs>,
}

fn prompt_parts(
    c: &Choice,
    params: &Params,
    echo: bool,
    tk: Option<&switchyard_model::tokenizer::Tokenizer>,
) -> PromptParts {
    let empty = Vec::new();
    let lps = c.prompt_logprobs.as_ref().unwrap_or(&empty);
    debug_assert!(c.prompt_logprobs.is_none() || lps.len() + 1 == c.prompt_ids.len());
    let logprobs = match (echo, params.logprobs) {
        (true, Some(top)) => Some(prompt_completion_logprobs(
            &c.prompt_ids,
            lps,
            &text_offsets(&c.prompt_ids, tk),
            top,
            tk,
            params.tokens_as_ids,
        )),
        _ => None,
    };
    let vllm = params.vllm_prompt_logprobs.map(|top| vllm_prompt_logprobs(lps, top, tk, params.tokens_as_ids));
    PromptParts { logprobs, vllm }
}

fn echo_text(state: &HttpState, c: &Choice, echo: bool) -> String {
    match (&state.tokenizer, echo) {
        (Some(tk), true) => tk.decode(&c.prompt_ids).unwrap_or_default(),
        _ => String::new(),
    }
}

#[derive(Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    api: Api,
}

impl Head {
    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Completion {
        let Head { id, created, model, .. } = self.clone();
        Completion { id, object: "text_completion", created, model, choices, usage }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatChunk {
        let Head { id, created, model, .. } = self.clone();
        ChatChunk { id, object: "chat.completion.chunk", created, model, choices, usage }
    }

    /// An event of a stream.
    fn event(&self, choice: StreamChoice, usage: Option<Usage>) -> Sse {
        let data = match choice {
            StreamChoice::Completion(c) => serde_json::to_string(&self.completion(c.into_iter().collect(), usage)),
            StreamChoice::Chat(c) => serde_json::to_string(&self.chat_chunk(c.into_iter().collect(), usage)),
        };
        Sse::default().data(data.expect("response bodies serialize"))
    }
}

/// The choice an event of a stream carries (none: the closing usage event).
enum StreamChoice {
    Completion(Option<CompletionChoice>),
    Chat(Option<ChatChunkChoice>),
}

/// Drives every choice and sends their deltas as server-sent events. Stops early, cancelling
/// the choices, when the client goes away (the receiver is dropped).
#[allow(clippy::too_many_arguments)]
async fn stream(
    state: Arc<HttpState>,
    head: Head,
    mut choices: Vec<Choice>,
    n: usize,
    params: Params,
    include_usage: bool,
    echo: bool,
    tools: Option<Tools>,
    tx: mpsc::Sender<Result<Sse, Infallible>>,
) {
    let tk = state.tokenizer.as_deref();
    let mut parsers: Vec<MessageParser> =
        choices.iter().map(|_| MessageParser::new(state.output_format, tools.as_ref())).collect();
    let (prompt_tokens, cached_tokens) = prompt_tokens(&choices, n);
    // Opening chunks: the assistant role (chat) or the echoed prompt (completions), with the
    // prompt's log-probabilities where asked.
    let mut prefix_lens = Vec::with_capacity(choices.len());
    for c in &choices {
        let prefix = echo_text(&state, c, echo);
        prefix_lens.push(prefix.chars().count());
        let parts = prompt_parts(c, &params, echo, tk);
        let first = match head.api {
            Api::Chat => Some(StreamChoice::Chat(Some(ChatChunkChoice {
                index: c.index,
                delta: ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() },
                logprobs: None,
                finish_reason: None,
            }))),
            Api::Completions if echo || parts.vllm.is_some() => {
                Some(StreamChoice::Completion(Some(CompletionChoice {
                    index: c.index,
                    text: prefix,
                    logprobs: parts.logprobs,
                    finish_reason: None,
                    prompt_logprobs: parts.vllm,
                })))
            }
            Api::Completions => None,
        };
        if let Some(first) = first
            && tx.send(Ok(head.event(first, None))).await.is_err()
        {
            return;
        }
    }
    // Round-robin over the unfinished choices; each waits for its next token.
    while choices.iter().any(|c| !c.is_finished()) {
        let unfinished = choices.iter_mut().zip(&prefix_lens).zip(&mut parsers).filter(|((c, _), _)| !c.is_finished());
        for ((c, &prefix_len), parser) in unfinished {
            let mut delta = match c.next(tk).await {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    let body = e.body();
                    let _ =
                        tx.send(Ok(Sse::default().data(serde_json::to_string(&body).expect("errors serialize")))).await;
                    let _ = tx.send(Ok(Sse::default().data("[DONE]"))).await;
                    return;
                }
            };
            let parts = match head.api {
                Api::Chat => {
                    let ids: Vec<u32> = delta.tokens.iter().map(|t| t.id).collect();
                    let mut parts = parser.push(&delta.text, &ids, &delta.offsets);
                    if let Some(finish) = delta.finish {
                        parts.extend(parser.finish());
                        delta.finish = Some(chat::finish_reason(parser, finish));
                    }
                    Some(parts)
                }
                Api::Completions => None,
            };
            let nothing = parts.as_ref().map_or(delta.text.is_empty(), Parts::is_empty);
            if nothing && delta.finish.is_none() && params.logprobs.is_none() {
                continue;
            }
            // Offsets count from the start of the text, which begins with the echoed prompt.
            delta.offsets.iter_mut().for_each(|o| *o += prefix_len);
            let event = stream_choice(head.api, c.index, delta, parts, &params, tk);
            if tx.send(Ok(head.event(event, None))).await.is_err() {
                return; // the client left: dropping the choices cancels them
            }
        }
    }
    let completion_tokens = choices.iter().map(Choice::completion_tokens).sum();
    record_usage(&head.id, prompt_tokens, completion_tokens, &[]);
    if include_usage {
        let last = match head.api {
            Api::Completions => StreamChoice::Completion(None),
            Api::Chat => StreamChoice::Chat(None),
        };
        let _ = tx.send(Ok(head.event(last, Some(Usage::new(prompt_tokens, cached_tokens, completion_tokens))))).await;
    }
    let _ = tx.send(Ok(Sse::default().data("[DONE]"))).await;
}

fn stream_choice(
    api: Api,
    index: usize,
    d: Delta,
    parts: Option<Parts>,
    params: &Params,
    tk: Option<&switchyard_model::tokenizer::Tokenizer>,
) -> StreamChoice {
    match api {
        Api::Completions => StreamChoice::Completion(Some(CompletionChoice {
            index,
            logprobs: params.logprobs.map(|_| completion_logprobs(&d.tokens, &d.offsets, tk, params.tokens_as_ids)),
            text: d.text,
            finish_reason: d.finish,
            prompt_logprobs: None,
        })),
        Api::Chat => {
            let parts = parts.unwrap_or_default();
            let only_text = parts.reasoning.is_empty() && parts.calls.is_empty() && d.finish.is_none();
            let content = (!parts.content.is_empty() || only_text).then_some(parts.content);
            StreamChoice::Chat(Some(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content,
                    reasoning_content: Some(parts.reasoning).filter(|r| !r.is_empty()),
                    tool_calls: Some(parts.calls).filter(|c| !c.is_empty()),
                },
                logprobs: params.logprobs.map(|_| chat_logprobs(&d.tokens, tk, params.tokens_as_ids)),
                finish_reason: d.finish,
            }))
        }
    }
}
