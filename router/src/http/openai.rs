//! The request bodies of the OpenAI API as clients send them, read leniently (unknown fields
//! are ignored, as OpenAI and vLLM do) but checked strictly, each error naming its field.

use serde::Deserialize;
use serde_json::Value;
use switchyard_model::chat::ChatMessage;

use super::error::ApiError;

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension; -1 or 0 means all tokens.
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub n: Option<u32>,
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: render tokens as `token_id:123`.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    /// vLLM's extension: keep going past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    pub prompt: Value,
    /// How many alternatives to report per token (0–20).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
}

/// A completion prompt: text, or token ids; one or a batch.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt` as a list of prompts: a string, a list of strings, a list of token ids, or a list
/// of lists of token ids.
pub fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            Some("prompt"),
        )
    };
    let ids = |list: &[Value]| -> Result<Vec<u32>, ApiError> {
        list.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(list) if list.is_empty() => return Err(ApiError::invalid("`prompt` is empty", Some("prompt"))),
        Value::Array(list) => match &list[0] {
            Value::String(_) => list
                .iter()
                .map(|x| x.as_str().map(|s| Prompt::Text(s.into())).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(list)?)],
            Value::Array(_) => list
                .iter()
                .map(|x| x.as_array().ok_or_else(bad).and_then(|l| ids(l)).map(Prompt::Ids))
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    Ok(out)
}

/// `stop` as a list of strings (at most 4, none empty).
pub fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("`stop` must be a string or a list of strings", Some("stop")))?,
        Some(_) => return Err(ApiError::invalid("`stop` must be a string or a list of strings", Some("stop"))),
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("`stop` strings must not be empty", Some("stop")));
    }
    Ok(list)
}
