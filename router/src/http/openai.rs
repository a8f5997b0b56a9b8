//! The request bodies of the OpenAI API as clients send them, checked strictly, each error
//! naming its field. A field is either honoured, or accepted because it cannot change the
//! answer (`user`, `metadata`, a penalty of 0…), or refused with a 400 that names it: a
//! request never means something other than what it says.

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
#[serde(try_from = "Checked<CompletionFields>")]
pub struct CompletionRequest {
    pub sampling: Sampling,
    pub prompt: Value,
    /// How many alternatives to report per token (0–20).
    pub logprobs: Option<u32>,
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "Checked<ChatFields>")]
pub struct ChatRequest {
    pub sampling: Sampling,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<u64>,
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
}

/// `/v1/completions`' own fields.
#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    prompt: Value,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
}

/// `/v1/chat/completions`' own fields.
#[derive(Debug, Deserialize)]
pub struct ChatFields {
    messages: Vec<ChatMessage>,
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
}

/// A request as sent: the shared fields, the endpoint's own, and everything else, which
/// [`check_rest`] accepts or refuses by name.
#[derive(Debug, Deserialize)]
pub struct Checked<T> {
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(flatten)]
    fields: T,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

impl TryFrom<Checked<CompletionFields>> for CompletionRequest {
    type Error = String;

    fn try_from(c: Checked<CompletionFields>) -> Result<Self, String> {
        check_rest(&c.rest, false)?;
        let f = c.fields;
        Ok(CompletionRequest { sampling: c.sampling, prompt: f.prompt, logprobs: f.logprobs, echo: f.echo })
    }
}

impl TryFrom<Checked<ChatFields>> for ChatRequest {
    type Error = String;

    fn try_from(c: Checked<ChatFields>) -> Result<Self, String> {
        check_rest(&c.rest, true)?;
        let f = c.fields;
        Ok(ChatRequest {
            sampling: c.sampling,
            messages: f.messages,
            max_completion_tokens: f.max_completion_tokens,
            logprobs: f.logprobs,
            top_logprobs: f.top_logprobs,
        })
    }
}

/// Fields that cannot change the answer, accepted whatever their value.
const NO_EFFECT: [&str; 6] = ["user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"];

/// Fields the server does not implement, accepted only with the value that means "off".
fn neutral(field: &str, v: &Value) -> Option<bool> {
    let zero = || v.is_null() || v.as_f64() == Some(0.0);
    let empty =
        || v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(|o| o.is_empty());
    Some(match field {
        "presence_penalty" | "frequency_penalty" | "min_p" | "min_tokens" => zero(),
        "repetition_penalty" => v.is_null() || v.as_f64() == Some(1.0),
        "best_of" => v.is_null() || v.as_u64() == Some(1),
        "logit_bias" | "stop_token_ids" | "bad_words" | "tools" | "functions" => empty(),
        "suffix" | "prompt_logprobs" | "response_format" | "tool_choice" | "function_call" => {
            v.is_null()
                || v.as_str().is_some_and(|s| s.is_empty() || s == "none")
                || v.get("type").and_then(Value::as_str) == Some("text")
        }
        _ => return None,
    })
}

/// Accepts fields with no effect and unimplemented ones left off; refuses the rest by name.
fn check_rest(rest: &serde_json::Map<String, Value>, chat: bool) -> Result<(), String> {
    for (field, v) in rest {
        if NO_EFFECT.contains(&field.as_str()) {
            continue;
        }
        match neutral(field, v) {
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "`{field}` is not supported by this server (only its neutral value is accepted): got {v}"
                ));
            }
            None => {
                let endpoint = if chat { "/v1/chat/completions" } else { "/v1/completions" };
                return Err(format!("unknown field `{field}` for {endpoint}"));
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: &str) -> Result<CompletionRequest, String> {
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    #[test]
    fn every_field_is_honoured_accepted_as_neutral_or_refused_by_name() {
        let ok = completion(
            r#"{"model": "m", "prompt": "x", "max_tokens": 3, "user": "u", "metadata": {"a": 1}, "presence_penalty": 0,
                "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": null, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!(ok.sampling.max_tokens, Some(3));
        assert!(ok.sampling.stream_options.unwrap().include_usage);

        let err = completion(r#"{"model": "m", "prompt": "x", "logit_bias": {"50": 100}}"#).unwrap_err();
        assert!(err.contains("`logit_bias` is not supported"), "{err}");
        let err = completion(r#"{"model": "m", "prompt": "x", "presence_penalty": 0.5}"#).unwrap_err();
        assert!(err.contains("`presence_penalty`"), "{err}");
        let err = completion(r#"{"model": "m", "prompt": "x", "temprature": 0.5}"#).unwrap_err();
        assert!(err.contains("unknown field `temprature`"), "{err}");
        let err = completion(r#"{"model": "m", "prompt": "x", "max_completion_tokens": 5}"#).unwrap_err();
        assert!(err.contains("unknown field `max_completion_tokens` for /v1/completions"), "{err}");

        let chat: ChatRequest =
            serde_json::from_str(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "tools": [], "tool_choice": "none"}"#)
                .unwrap();
        assert_eq!(chat.max_completion_tokens, Some(4));
        let err = serde_json::from_str::<ChatRequest>(
            r#"{"model": "m", "messages": [], "response_format": {"type": "json_object"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`response_format` is not supported"), "{err}");
    }
}
