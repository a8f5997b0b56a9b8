//! The request bodies of the OpenAI API as clients send them, checked strictly, each error
//! naming its field. A field is either honoured, or accepted because it cannot change the
//! answer (`user`, `metadata`, empty `tools`…), or refused with a 400 that names it: a
//! request never means something other than what it says.

use serde::Deserialize;
use serde_json::Value;
use switchyard_model::SamplingControls;
use switchyard_model::chat::ChatMessage;
use utoipa::ToSchema;

use super::api::{PromptInput, StopInput};
use super::error::ApiError;

#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Sampling {
    /// The served model's name (`GET /v1/models`).
    pub model: String,
    /// Most tokens to generate; `0` only with `echo`, to score the prompt alone.
    pub max_tokens: Option<u64>,
    /// 0 is greedy; at most 2.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// vLLM's extension; -1 or 0 means all tokens.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// Choice `i` of a seeded request samples with `seed + i`.
    pub seed: Option<u64>,
    /// Choices per prompt.
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    /// Text that ends a choice, left out of it.
    #[schema(value_type = Option<StopInput>)]
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
    // The sampling controls are read by [`Sampling::controls`], so that a value of the wrong
    // type is refused naming its field; vLLM's semantics.
    /// Subtracted once from the logit of every token generated so far.
    #[schema(value_type = Option<f32>, minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<Value>,
    /// Subtracted from the logit of every generated token once per time it was generated.
    #[schema(value_type = Option<f32>, minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<Value>,
    /// Over the prompt's and the generated tokens: positive logits divided by it, negative
    /// ones multiplied.
    #[schema(value_type = Option<f32>, exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<Value>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    #[schema(value_type = Option<std::collections::HashMap<String, f32>>)]
    pub logit_bias: Option<Value>,
    /// Tokens less likely than `min_p` times the most likely one are dropped.
    #[schema(value_type = Option<f32>, minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<Value>,
    /// End of sequence, stop token ids and stop strings wait until this many tokens are out.
    #[schema(value_type = Option<u64>)]
    pub min_tokens: Option<Value>,
    /// Tokens that end a choice (counted, not shown).
    #[schema(value_type = Option<Vec<u32>>)]
    pub stop_token_ids: Option<Value>,
    /// Words never generated.
    #[schema(value_type = Option<Vec<String>>)]
    pub bad_words: Option<Value>,
    /// Must equal `n` where set.
    #[schema(value_type = Option<u64>)]
    pub best_of: Option<Value>,
    /// vLLM's extension: only requests with the same salt (and tenant) share cached prompt
    /// prefixes. A non-empty string.
    #[schema(min_length = 1, max_length = 256)]
    pub cache_salt: Option<String>,
    // Structured output, read by [`structured::requested`](super::structured::requested):
    // at most one of these may be set.
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name": …, "schema": {…}, "strict": true}}`: the output is JSON valid under the schema.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// vLLM's extension: one of `json` (a JSON schema), `regex`, `choice` (a list of strings),
    /// `grammar` (llguidance's Lark syntax) or `json_object: true`.
    #[schema(value_type = Option<Object>)]
    pub structured_outputs: Option<Value>,
    /// vLLM's extension: a JSON schema (object or text) the output is valid under.
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<Value>,
    /// vLLM's extension: a regular expression the whole output matches.
    #[schema(value_type = Option<String>)]
    pub guided_regex: Option<Value>,
    /// vLLM's extension: the output is exactly one of these strings.
    #[schema(value_type = Option<Vec<String>>)]
    pub guided_choice: Option<Value>,
    /// vLLM's extension: a grammar in llguidance's Lark syntax the output follows.
    #[schema(value_type = Option<String>)]
    pub guided_grammar: Option<Value>,
}

/// What a request's controls say, before its bad words are tokenized.
pub struct Controls {
    /// Every control but `bad_words` (left empty).
    pub controls: SamplingControls,
    pub bad_words: Vec<String>,
    pub best_of: Option<u64>,
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(format!("`{field}` must be {expected}, got {got}"), Some(field))
}

fn number(field: &'static str, v: &Option<Value>, default: f32) -> Result<f32, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().map(|f| f as f32).ok_or_else(|| wrong_type(field, "a number", x)),
    }
}

fn count(field: &'static str, v: &Option<Value>) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| wrong_type(field, "a non-negative integer", x)),
    }
}

fn list<T>(
    field: &'static str,
    v: &Option<Value>,
    expected: &str,
    item: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|x| item(x).ok_or_else(|| wrong_type(field, expected, x))).collect(),
        Some(x) => Err(wrong_type(field, expected, x)),
    }
}

impl Sampling {
    /// The sampling controls as sent, each of the type it must have; their ranges are checked
    /// by [`SamplingControls::validate`].
    pub fn controls(&self) -> Result<Controls, ApiError> {
        let token = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        let logit_bias = match &self.logit_bias {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    let id = k.trim().parse::<u32>().map_err(|_| {
                        ApiError::invalid(
                            format!("`logit_bias` keys must be token ids (integers as strings), got \"{k}\""),
                            Some("logit_bias"),
                        )
                    })?;
                    let bias =
                        v.as_f64().ok_or_else(|| wrong_type("logit_bias", "a map of token ids to numbers", v))?;
                    Ok((id, bias as f32))
                })
                .collect::<Result<_, ApiError>>()?,
            Some(x) => return Err(wrong_type("logit_bias", "a map of token ids to numbers", x)),
        };
        let controls = SamplingControls {
            presence_penalty: number("presence_penalty", &self.presence_penalty, 0.0)?,
            frequency_penalty: number("frequency_penalty", &self.frequency_penalty, 0.0)?,
            repetition_penalty: number("repetition_penalty", &self.repetition_penalty, 1.0)?,
            logit_bias,
            bad_words: Vec::new(),
            min_p: number("min_p", &self.min_p, 0.0)?,
            min_tokens: count("min_tokens", &self.min_tokens)?.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            stop_token_ids: list("stop_token_ids", &self.stop_token_ids, "a list of token ids", token)?,
        };
        let bad_words = list("bad_words", &self.bad_words, "a list of strings", |x| x.as_str().map(String::from))?;
        Ok(Controls { controls, bad_words, best_of: count("best_of", &self.best_of)? })
    }
}

/// A `/v1/completions` request. Fields not listed here are refused by name, except those
/// that cannot change the answer (`user`, `metadata`, `store`, `service_tier`, …).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(try_from = "Checked<CompletionFields>")]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    #[schema(value_type = PromptInput)]
    pub prompt: Value,
    /// How many alternatives to report per token; with `echo`, for the prompt's tokens too.
    #[schema(maximum = 20)]
    pub logprobs: Option<u32>,
    /// Answer with the prompt in front of the completion.
    #[serde(default)]
    pub echo: bool,
    /// vLLM's extension: the prompt tokens' log-probabilities with this many alternatives
    /// each.
    // Read by [`CompletionRequest::prompt_logprobs`].
    #[schema(value_type = Option<u32>, maximum = 20)]
    pub prompt_logprobs: Option<Value>,
    /// The text after the completion (fill-in-the-middle, for models with FIM tokens).
    // Read by [`CompletionRequest::suffix`].
    #[schema(value_type = Option<String>)]
    pub suffix: Option<Value>,
}

impl CompletionRequest {
    /// `prompt_logprobs` as sent (`None`: left out or null).
    pub fn prompt_logprobs(&self) -> Result<Option<u64>, ApiError> {
        count("prompt_logprobs", &self.prompt_logprobs)
    }

    /// `suffix` as sent; `None` when left out or null.
    pub fn suffix(&self) -> Result<Option<&str>, ApiError> {
        match &self.suffix {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(x) => Err(wrong_type("suffix", "a string", x)),
        }
    }
}

/// A `/v1/chat/completions` request, rendered through the model's chat template. Fields not
/// listed here are refused by name, except those that cannot change the answer (`user`,
/// `metadata`, empty `tools`, …).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(try_from = "Checked<ChatFields>")]
pub struct ChatRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Takes precedence over `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    /// vLLM's extension: the rendered prompt's log-probabilities with this many alternatives
    /// each (not with `stream`).
    // Read by [`ChatRequest::prompt_logprobs`].
    #[schema(value_type = Option<u32>, maximum = 20)]
    pub prompt_logprobs: Option<Value>,
    /// Functions the model may call: `{"type": "function", "function": {"name", "description",
    /// "parameters"}}`, rendered into the chat template as transformers passes them.
    // Read by [`structured::tools`](super::structured::tools).
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function", "function":
    /// {"name": …}}`; `required` and a named function are constrained to the tools' schemas.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// Whether a message may hold several tool calls (default true).
    pub parallel_tool_calls: Option<bool>,
    /// `low`, `medium` or `high`, passed to chat templates that read it (gpt-oss).
    pub reasoning_effort: Option<String>,
}

impl ChatRequest {
    /// `prompt_logprobs` as sent (`None`: left out or null).
    pub fn prompt_logprobs(&self) -> Result<Option<u64>, ApiError> {
        count("prompt_logprobs", &self.prompt_logprobs)
    }
}

/// `/v1/completions`' own fields.
#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    prompt: Value,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    prompt_logprobs: Option<Value>,
    suffix: Option<Value>,
}

/// `/v1/chat/completions`' own fields.
#[derive(Debug, Deserialize)]
pub struct ChatFields {
    messages: Vec<ChatMessage>,
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    prompt_logprobs: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    reasoning_effort: Option<String>,
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
        Ok(CompletionRequest {
            sampling: c.sampling,
            prompt: f.prompt,
            logprobs: f.logprobs,
            echo: f.echo,
            prompt_logprobs: f.prompt_logprobs,
            suffix: f.suffix,
        })
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
            prompt_logprobs: f.prompt_logprobs,
            tools: f.tools,
            tool_choice: f.tool_choice,
            parallel_tool_calls: f.parallel_tool_calls,
            reasoning_effort: f.reasoning_effort,
        })
    }
}

/// Fields that cannot change the answer, accepted whatever their value.
const NO_EFFECT: [&str; 6] = ["user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"];

/// Fields the server does not implement, accepted only with the value that means "off".
fn neutral(field: &str, v: &Value) -> Option<bool> {
    let empty =
        || v.is_null() || v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(|o| o.is_empty());
    Some(match field {
        "tools" | "functions" => empty(),
        "tool_choice" | "function_call" => v.is_null() || v.as_str().is_some_and(|s| s.is_empty() || s == "none"),
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
            r#"{"model": "m", "prompt": "x", "max_tokens": 3, "user": "u", "metadata": {"a": 1}, "tools": [],
                "suffix": null, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!(ok.sampling.max_tokens, Some(3));
        assert!(ok.sampling.stream_options.unwrap().include_usage);

        let err = completion(r#"{"model": "m", "prompt": "x", "temprature": 0.5}"#).unwrap_err();
        assert!(err.contains("unknown field `temprature`"), "{err}");
        let err = completion(r#"{"model": "m", "prompt": "x", "max_completion_tokens": 5}"#).unwrap_err();
        assert!(err.contains("unknown field `max_completion_tokens` for /v1/completions"), "{err}");
        let fim = completion(r#"{"model": "m", "prompt": "x", "suffix": "y"}"#).unwrap();
        assert_eq!(fim.suffix().map_err(|e| e.message).unwrap(), Some("y"));
        let end = completion(r#"{"model": "m", "prompt": "x", "suffix": ""}"#).unwrap();
        assert_eq!(end.suffix().map_err(|e| e.message).unwrap(), Some(""));
        let plain = completion(r#"{"model": "m", "prompt": "x", "suffix": null}"#).unwrap();
        assert_eq!(plain.suffix().map_err(|e| e.message).unwrap(), None);
        let e = completion(r#"{"model": "m", "prompt": "x", "suffix": 3}"#).unwrap().suffix().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("suffix"), "{}", e.message);

        let chat: ChatRequest =
            serde_json::from_str(r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "tools": [], "tool_choice": "none"}"#)
                .unwrap();
        assert_eq!(chat.max_completion_tokens, Some(4));
        // Tools are the chat's; on completions only "none" is accepted.
        let err = completion(r#"{"model": "m", "prompt": "x", "tools": [{"type": "function"}]}"#).unwrap_err();
        assert!(err.contains("`tools` is not supported"), "{err}");
        let err = completion(r#"{"model": "m", "prompt": "x", "functions": [{"name": "f"}]}"#).unwrap_err();
        assert!(err.contains("`functions` is not supported"), "{err}");
    }

    #[test]
    fn sampling_controls_are_read_with_their_types() {
        let r = completion(
            r#"{"model": "m", "prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                "logit_bias": {"50": 100, " 7": -3.5}, "min_p": 0.1, "min_tokens": 2, "stop_token_ids": [4, 9],
                "bad_words": ["foo", " bar"], "best_of": 1}"#,
        )
        .unwrap();
        let Controls { controls: c, bad_words, best_of } = r.sampling.controls().map_err(|e| e.message).unwrap();
        assert_eq!((c.presence_penalty, c.frequency_penalty, c.repetition_penalty), (0.5, -1.0, 1.2));
        let mut bias = c.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -3.5), (50, 100.0)]);
        assert_eq!((c.min_p, c.min_tokens, c.stop_token_ids), (0.1, 2, vec![4, 9]));
        assert_eq!((bad_words, best_of), (vec!["foo".to_string(), " bar".to_string()], Some(1)));

        // Left out or null: neutral.
        let r = completion(r#"{"model": "m", "prompt": "x", "presence_penalty": null}"#).unwrap();
        assert_eq!(r.sampling.controls().map_err(|e| e.message).unwrap().controls, SamplingControls::default());

        for (body, field) in [
            (r#""presence_penalty": "high""#, "presence_penalty"),
            (r#""logit_bias": {"abc": 1}"#, "logit_bias"),
            (r#""logit_bias": {"5": "up"}"#, "logit_bias"),
            (r#""logit_bias": [5]"#, "logit_bias"),
            (r#""min_tokens": -1"#, "min_tokens"),
            (r#""stop_token_ids": [-1]"#, "stop_token_ids"),
            (r#""bad_words": "foo""#, "bad_words"),
            (r#""best_of": 1.5"#, "best_of"),
        ] {
            let r = completion(&format!(r#"{{"model": "m", "prompt": "x", {body}}}"#)).unwrap();
            let e = r.sampling.controls().err().unwrap_or_else(|| panic!("{body} is accepted"));
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
            assert!(e.message.contains(&format!("`{field}`")), "{}", e.message);
        }
    }
}
