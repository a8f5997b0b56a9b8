//! Conversions between the model crate's types and the protobuf messages.

use switchyard_model::engine::GeneratedToken;
use switchyard_model::tokenizer::Tokenizer;
use switchyard_model::{GenerateRequest, SamplingParams};
use switchyard_proto::v1;

use crate::scheduler::{Event, ServeError};

/// A request's prompt before tokenization.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// The one mapping of [`ServeError`] to gRPC statuses.
impl From<ServeError> for tonic::Status {
    fn from(e: ServeError) -> Self {
        let message = e.to_string();
        match e {
            ServeError::Invalid(_) | ServeError::KvCacheTooSmall { .. } => tonic::Status::invalid_argument(message),
            ServeError::QueueFull { .. } => tonic::Status::resource_exhausted(message),
            ServeError::ShuttingDown | ServeError::ExpertsUnavailable(_) | ServeError::EngineFailed { .. } => {
                tonic::Status::unavailable(message)
            }
            ServeError::StepFailed(_) | ServeError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

/// The `GenerateResponse` of an engine event; `ids` collects the generated ids for the final
/// text. `None` for prompt log-probabilities, which a gRPC request never asks for.
pub fn event(e: Event, ids: &mut Vec<u32>, tokenizer: Option<&Tokenizer>) -> Option<v1::GenerateResponse> {
    use switchyard_model::FinishReason;
    use v1::generate_response::Event as E;
    let event = match e {
        Event::Started { prompt_ids } => E::Started(v1::Started { prompt_ids }),
        Event::Token(t) => {
            ids.push(t.id);
            E::Token(token(&t, tokenizer))
        }
        Event::Finished(reason) => {
            let reason = match reason {
                FinishReason::Stop => v1::FinishReason::Stop,
                FinishReason::Length => v1::FinishReason::Length,
            };
            let text = tokenizer.and_then(|t| t.decode(ids).ok()).unwrap_or_default();
            E::Finished(v1::Finished { reason: reason as i32, text })
        }
        Event::PromptLogprobs(_) => return None,
    };
    Some(v1::GenerateResponse { event: Some(event) })
}

pub fn token(t: &GeneratedToken, tokenizer: Option<&Tokenizer>) -> v1::GeneratedToken {
    v1::GeneratedToken {
        id: t.id,
        text: tokenizer.map(|tk| tk.token_text(t.id)).unwrap_or_default(),
        logprob: t.logprob,
        top_logprobs: t.top_logprobs.iter().map(|x| v1::TopLogprob { id: x.id, logprob: x.logprob }).collect(),
        delta: String::new(),
    }
}

/// Most alternatives per token, as on the HTTP API (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A `GenerateRequest`'s generation fields as the HTTP API's, so that both are checked by the
/// same code with the same messages (the field names are the same).
pub fn sampling(r: &v1::GenerateRequest) -> Result<crate::http::openai::Sampling, tonic::Status> {
    use serde_json::json;
    let mut fields = json!({
        "model": "",
        "temperature": r.temperature,
        "top_k": r.top_k,
        "ignore_eos": r.ignore_eos,
        "seed": r.seed,
        "top_p": r.top_p,
        "presence_penalty": r.presence_penalty,
        "frequency_penalty": r.frequency_penalty,
        "repetition_penalty": r.repetition_penalty,
        "min_p": r.min_p,
    });
    let more = [
        ("stop", (!r.stop.is_empty()).then(|| json!(r.stop))),
        (
            "logit_bias",
            (!r.logit_bias.is_empty()).then(|| {
                json!(r.logit_bias.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>())
            }),
        ),
        ("min_tokens", (r.min_tokens > 0).then(|| json!(r.min_tokens))),
        ("stop_token_ids", (!r.stop_token_ids.is_empty()).then(|| json!(r.stop_token_ids))),
        ("bad_words", (!r.bad_words.is_empty()).then(|| json!(r.bad_words))),
    ];
    for (k, v) in more {
        if let Some(v) = v {
            fields[k] = v;
        }
    }
    serde_json::from_value(fields).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

/// The prompt and the generation request (without prompt ids yet) of a `GenerateRequest`.
pub fn request(r: v1::GenerateRequest) -> Result<(Prompt, GenerateRequest), tonic::Status> {
    if r.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(tonic::Status::invalid_argument(format!(
            "top_logprobs: at most {MAX_TOP_LOGPROBS}, got {}",
            r.top_logprobs
        )));
    }
    let prompt = match r.prompt {
        Some(v1::generate_request::Prompt::Text(t)) => Prompt::Text(t),
        Some(v1::generate_request::Prompt::TokenIds(ids)) => Prompt::Ids(ids.ids),
        None => return Err(tonic::Status::invalid_argument("prompt: missing (set text or token_ids)")),
    };
    let request = GenerateRequest {
        prompt_ids: Vec::new(),
        // Unset (0) means the CLI's default of 16.
        max_tokens: if r.max_tokens == 0 { 16 } else { r.max_tokens as usize },
        sampling: SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p.unwrap_or(1.0),
            top_k: r.top_k as usize,
            seed: r.seed,
        },
        top_logprobs: r.top_logprobs as usize,
        ignore_eos: r.ignore_eos,
        prompt_logprobs: None,
    };
    Ok((prompt, request))
}
