//! Conversions between the model crate's types and the protobuf messages.

use switchyard_model::engine::{GeneratedToken, PromptLogprob};
use switchyard_model::tokenizer::Tokenizer;
use switchyard_proto::v1;

use crate::scheduler::ServeError;

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
            ServeError::Invalid(_) | ServeError::KvCacheTooSmall { .. } | ServeError::GrammarFailed(_) => {
                tonic::Status::invalid_argument(message)
            }
            ServeError::QueueFull { .. } => tonic::Status::resource_exhausted(message),
            ServeError::ShuttingDown | ServeError::ExpertsUnavailable(_) | ServeError::EngineFailed { .. } => {
                tonic::Status::unavailable(message)
            }
            ServeError::StepFailed(_) | ServeError::Internal(_) => tonic::Status::internal(message),
        }
    }
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

pub fn prompt_logprob(p: &PromptLogprob) -> v1::PromptLogprob {
    v1::PromptLogprob {
        id: p.id,
        logprob: p.logprob,
        rank: p.rank as u32,
        top_logprobs: p.top_logprobs.iter().map(|x| v1::TopLogprob { id: x.id, logprob: x.logprob }).collect(),
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
        ("cache_salt", (!r.cache_salt.is_empty()).then(|| json!(r.cache_salt))),
        ("guided_json", (!r.guided_json.is_empty()).then(|| json!(r.guided_json))),
        ("guided_regex", (!r.guided_regex.is_empty()).then(|| json!(r.guided_regex))),
        ("guided_choice", (!r.guided_choice.is_empty()).then(|| json!(r.guided_choice))),
        ("guided_grammar", (!r.guided_grammar.is_empty()).then(|| json!(r.guided_grammar))),
    ];
    for (k, v) in more {
        if let Some(v) = v {
            fields[k] = v;
        }
    }
    serde_json::from_value(fields).map_err(|e| tonic::Status::invalid_argument(e.to_string()))
}

/// A `GenerateRequest`'s prompt, taken out of it, once its `top_logprobs` is checked.
pub fn prompt(r: &mut v1::GenerateRequest) -> Result<Prompt, tonic::Status> {
    if r.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(tonic::Status::invalid_argument(format!(
            "top_logprobs: at most {MAX_TOP_LOGPROBS}, got {}",
            r.top_logprobs
        )));
    }
    match r.prompt.take() {
        Some(v1::generate_request::Prompt::Text(t)) => Ok(Prompt::Text(t)),
        Some(v1::generate_request::Prompt::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids)),
        None => Err(tonic::Status::invalid_argument("prompt: missing (set text or token_ids)")),
    }
}
