//! What a request asks its output to follow, read from the fields that say it: OpenAI's
//! `response_format`, vLLM's `structured_outputs` and `guided_*` extensions, and the chat's
//! `tools` with `tool_choice`. At most one of them constrains a request; the grammar they name
//! is compiled by llguidance ([`switchyard_model::grammar`]) before the request is queued, so
//! a schema feature it does not implement is a 400 naming the field.

use serde_json::{Value, json};
use switchyard_model::grammar::Grammar;

use super::error::ApiError;
use super::openai::Sampling;

/// A function the model may call, as the request defined it.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (`{"type": "object"}` when the tool gave none).
    pub parameters: Value,
}

/// How the chat's tools may be used (`tool_choice`).
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// No tool call is reported: the output is the message's content.
    None,
    /// The model decides; its calls are parsed from its output by the model family's parser.
    Auto,
    /// At least one call (exactly one unless `parallel_tool_calls`), constrained to the tools'
    /// schemas.
    Required,
    /// One call of this tool, its arguments constrained to its schema.
    Named(String),
}

/// The chat's tools and how they may be used.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Whether one message may hold more than one call.
    pub parallel: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message, Some(field))
}

fn string_of(field: &'static str, v: &Value) -> Result<String, ApiError> {
    v.as_str().map(String::from).ok_or_else(|| invalid(field, format!("`{field}` must be a string, got {v}")))
}

/// A JSON schema given as an object or as its JSON text (vLLM accepts both).
fn schema_of(field: &'static str, v: &Value) -> Result<Value, ApiError> {
    let schema = match v {
        Value::String(text) => {
            serde_json::from_str(text).map_err(|e| invalid(field, format!("`{field}` is not valid JSON: {e}")))?
        }
        v => v.clone(),
    };
    match schema {
        Value::Object(_) => Ok(schema),
        // The schema `true` allows any value.
        Value::Bool(true) => Ok(json!({})),
        Value::Bool(false) => {
            Err(invalid(field, format!("`{field}` is the schema `false`, which no output satisfies")))
        }
        _ => Err(invalid(field, format!("`{field}` must be a JSON schema (an object), got {schema}"))),
    }
}

fn choice_of(field: &'static str, v: &Value) -> Result<Grammar, ApiError> {
    let options: Option<Vec<String>> =
        v.as_array().and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect());
    match options {
        Some(options) if !options.is_empty() => Ok(Grammar::Choice(options)),
        _ => Err(invalid(field, format!("`{field}` must be a non-empty list of strings, got {v}"))),
    }
}

/// `response_format` as OpenAI defines it: `text` (no constraint), `json_object`, or
/// `json_schema` with its `schema`.
fn response_format(v: &Value) -> Result<Option<Grammar>, ApiError> {
    const FIELD: &str = "response_format";
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let schema = v.pointer("/json_schema/schema").ok_or_else(|| {
                invalid(FIELD, "`response_format` of type `json_schema` needs `json_schema.schema`, the JSON schema")
            })?;
            if let Some(strict) = v.pointer("/json_schema/strict")
                && !strict.is_boolean()
                && !strict.is_null()
            {
                return Err(invalid(
                    FIELD,
                    format!("`response_format.json_schema.strict` must be a boolean, got {strict}"),
                ));
            }
            Ok(Some(Grammar::JsonSchema(schema_of(FIELD, schema)?)))
        }
        _ => Err(invalid(
            FIELD,
            format!(
                "`response_format.type` must be `text`, `json_object` or `json_schema`, got {}",
                v.get("type").map_or("nothing".to_string(), Value::to_string)
            ),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar` and
/// `json_object`; its other options are refused by name.
fn structured_outputs(v: &Value) -> Result<Option<Grammar>, ApiError> {
    const FIELD: &str = "structured_outputs";
    let Value::Object(o) = v else {
        return Err(invalid(FIELD, format!("`structured_outputs` must be an object, got {v}")));
    };
    let mut found = Vec::new();
    for (key, value) in o {
        if value.is_null() || (key == "json_object" && value == &Value::Bool(false)) {
            continue;
        }
        let grammar = match key.as_str() {
            "json" => Grammar::JsonSchema(schema_of(FIELD, value)?),
            "regex" => Grammar::Regex(string_of(FIELD, value)?),
            "choice" => choice_of(FIELD, value)?,
            "grammar" => Grammar::Lark(string_of(FIELD, value)?),
            "json_object" if value == &Value::Bool(true) => Grammar::JsonObject,
            other => {
                return Err(invalid(
                    FIELD,
                    format!(
                        "`structured_outputs.{other}` is not supported; this server takes one of `json`, `regex`, \
                         `choice`, `grammar` (Lark syntax) and `json_object`"
                    ),
                ));
            }
        };
        found.push((key.clone(), grammar));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, g)| g)),
        _ => Err(invalid(
            FIELD,
            format!(
                "`structured_outputs` sets {}; set exactly one",
                found.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(" and ")
            ),
        )),
    }
}

/// The grammar the request's own fields ask for (not counting tools), and the field that
/// asked; two fields that both constrain are refused, naming both.
pub fn requested(s: &Sampling) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut asked: Vec<(Grammar, &'static str)> = Vec::new();
    let mut add = |field: &'static str, g: Option<Grammar>| {
        if let Some(g) = g {
            asked.push((g, field));
        }
    };
    fn set(v: &Option<Value>) -> Option<&Value> {
        v.as_ref().filter(|v| !v.is_null())
    }
    if let Some(v) = set(&s.response_format) {
        add("response_format", response_format(v)?);
    }
    if let Some(v) = set(&s.structured_outputs) {
        add("structured_outputs", structured_outputs(v)?);
    }
    if let Some(v) = set(&s.guided_json) {
        add("guided_json", Some(Grammar::JsonSchema(schema_of("guided_json", v)?)));
    }
    if let Some(v) = set(&s.guided_regex) {
        add("guided_regex", Some(Grammar::Regex(string_of("guided_regex", v)?)));
    }
    if let Some(v) = set(&s.guided_choice) {
        add("guided_choice", Some(choice_of("guided_choice", v)?));
    }
    if let Some(v) = set(&s.guided_grammar) {
        add("guided_grammar", Some(Grammar::Lark(string_of("guided_grammar", v)?)));
    }
    if asked.len() > 1 {
        let fields: Vec<String> = asked.iter().map(|(_, f)| format!("`{f}`")).collect();
        return Err(invalid(asked[1].1, format!("{} each constrain the output; send one", fields.join(" and "))));
    }
    if let Some((_, field)) = asked.first() {
        without_min_tokens(s, field)?;
    }
    Ok(asked.pop())
}

/// Refuses `min_tokens` beside a grammar (sent in `field`): the grammar decides where the
/// output ends, so the output could not honour both.
pub fn without_min_tokens(s: &Sampling, field: &str) -> Result<(), ApiError> {
    if s.min_tokens.as_ref().is_some_and(|n| !n.is_null() && n.as_u64() != Some(0)) {
        return Err(invalid(
            "min_tokens",
            format!("`min_tokens` cannot be combined with `{field}`: the grammar decides where the output ends"),
        ));
    }
    Ok(())
}

/// Function names OpenAI allows: letters, digits, `_`, `-` and `.`, at most 64.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// `tools`, `tool_choice` and `parallel_tool_calls` as sent, each checked and named where
/// wrong. `None`: no tools and no choice that needs them.
pub fn tools(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(v) => return Err(invalid("tools", format!("`tools` must be a list of tools, got {v}"))),
    };
    let mut defined: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                "tools",
                format!("`tools[{i}].type` must be `function`, got {}", t.get("type").unwrap_or(&Value::Null)),
            ));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| invalid("tools", format!("`tools[{i}].function` must be an object")))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(invalid(
                "tools",
                format!("`tools[{i}].function.name` must be 1 to 64 letters, digits, `_`, `-` or `.`, got {name:?}"),
            ));
        }
        if defined.iter().any(|d| d.name == name) {
            return Err(invalid("tools", format!("`tools` defines `{name}` more than once")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p) if p.is_object() => p.clone(),
            Some(p) => {
                return Err(invalid(
                    "tools",
                    format!("`tools[{i}].function.parameters` must be a JSON schema object, got {p}"),
                ));
            }
        };
        defined.push(Tool { name: name.to_string(), parameters });
    }
    let choice = match choice {
        None | Some(Value::Null) if defined.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("`tool_choice` must be `none`, `auto`, `required` or a named function, got {other:?}"),
                ));
            }
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_string()),
                _ => {
                    return Err(invalid(
                        "tool_choice",
                        format!(
                            "`tool_choice` must be `none`, `auto`, `required` or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {v}"
                        ),
                    ));
                }
            }
        }
    };
    match &choice {
        ToolChoice::None if defined.is_empty() => return Ok(None),
        ToolChoice::Named(name) if !defined.iter().any(|t| &t.name == name) => {
            return Err(invalid("tool_choice", format!("`tool_choice` names `{name}`, which `tools` does not define")));
        }
        ToolChoice::Auto | ToolChoice::Required | ToolChoice::Named(_) if defined.is_empty() => {
            return Err(invalid("tool_choice", "`tool_choice` asks for a tool call but `tools` is empty"));
        }
        _ => {}
    }
    Ok(Some(Tools { tools: defined, choice, parallel: parallel.unwrap_or(true) }))
}

impl Tools {
    /// The grammar the output follows for `required` and a named tool, in the plain JSON form
    /// (the arguments object for a named tool; a list of `{"name", "parameters"}` calls for
    /// `required`); `None` where the model decides.
    pub fn json_grammar(&self) -> Option<Grammar> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Named(name) => {
                let tool = self.tools.iter().find(|t| &t.name == name).expect("checked in `tools`");
                Some(Grammar::JsonSchema(tool.parameters.clone()))
            }
            ToolChoice::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                            "required": ["name", "parameters"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut list = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
                if !self.parallel {
                    list["maxItems"] = json!(1);
                }
                Some(Grammar::JsonSchema(list))
            }
        }
    }
}

/// gpt-oss's optional reasoning before its answer: an analysis message, then the next
/// assistant message's header.
const HARMONY_ANALYSIS: &str = "analysis: <|channel|> \"analysis\" <|message|> REASONING <|end|> <|start|> \"assistant\"\nREASONING: /[\\s\\S]*/\n";

/// For gpt-oss: the request's grammar applies to the final channel, after any reasoning. A
/// user's Lark grammar is taken as written (it spells the channels itself).
pub fn harmony_final(grammar: &Grammar) -> Grammar {
    match grammar.lark_body() {
        Some(body) => Grammar::Lark(format!(
            "start: analysis? <|channel|> \"final\" <|message|> answer\nanswer: {body}\n{HARMONY_ANALYSIS}"
        )),
        None => grammar.clone(),
    }
}

/// For gpt-oss, the grammar of a `required` or named `tool_choice`: after any reasoning, a
/// commentary message to one of the functions (or the named one) whose body is JSON valid
/// under its parameters. gpt-oss ends its turn at each call, so a turn holds one.
pub fn harmony_call(tools: &Tools) -> Option<Grammar> {
    let names: Vec<&Tool> = match &tools.choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Named(name) => tools.tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::Required => tools.tools.iter().collect(),
    };
    let mut rules = String::from("start: analysis? call\ncall: ");
    let mut calls = Vec::new();
    let mut bodies = String::new();
    for (i, t) in names.iter().enumerate() {
        let header = serde_json::to_string(&format!("commentary to=functions.{} ", t.name)).expect("strings serialize");
        calls.push(format!("<|channel|> {header} <|constrain|> \"json\" <|message|> args{i}"));
        let body = Grammar::JsonSchema(t.parameters.clone()).lark_body().expect("a schema has a body");
        bodies.push_str(&format!("args{i}: {body}\n"));
    }
    rules.push_str(&calls.join(" | "));
    rules.push('\n');
    rules.push_str(&bodies);
    rules.push_str(HARMONY_ANALYSIS);
    Some(Grammar::Lark(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(extra: Value) -> Sampling {
        let mut body = json!({"model": "m"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn each_field_names_its_grammar_and_two_are_refused() {
        let schema = json!({"type": "object"});
        let rf = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
        assert_eq!(requested(&sampling(rf)).unwrap(), Some((Grammar::JsonSchema(schema.clone()), "response_format")));
        let text = json!({"response_format": {"type": "text"}});
        assert_eq!(requested(&sampling(text)).unwrap(), None);
        let guided = json!({"guided_json": "{\"type\": \"object\"}"});
        assert_eq!(requested(&sampling(guided)).unwrap(), Some((Grammar::JsonSchema(schema), "guided_json")));
        let so = json!({"structured_outputs": {"choice": ["a", "b"]}});
        assert_eq!(requested(&sampling(so)).unwrap().unwrap().0, Grammar::Choice(vec!["a".into(), "b".into()]));

        let both = json!({"guided_regex": "a+", "response_format": {"type": "json_object"}});
        let err = requested(&sampling(both)).unwrap_err();
        assert!(err.message.contains("`response_format` and `guided_regex`"), "{}", err.message);
        let tag = json!({"structured_outputs": {"structural_tag": "{}"}});
        assert!(requested(&sampling(tag)).unwrap_err().message.contains("`structured_outputs.structural_tag`"));
        let kind = json!({"response_format": {"type": "yaml"}});
        assert!(requested(&sampling(kind)).unwrap_err().message.contains("got \"yaml\""));
        let empty = json!({"guided_choice": []});
        assert!(requested(&sampling(empty)).unwrap_err().message.contains("non-empty list"));
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let tools_json = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
                                {"type": "function", "function": {"name": "noop"}}]);
        let t = tools(Some(&tools_json), None, None).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert_eq!(t.tools[1].parameters, json!({"type": "object"}));
        let named = json!({"type": "function", "function": {"name": "noop"}});
        assert_eq!(
            tools(Some(&tools_json), Some(&named), None).unwrap().unwrap().choice,
            ToolChoice::Named("noop".into())
        );
        let unknown = json!({"type": "function", "function": {"name": "other"}});
        assert!(tools(Some(&tools_json), Some(&unknown), None).unwrap_err().message.contains("`other`"));
        assert!(tools(None, Some(&json!("required")), None).unwrap_err().message.contains("`tools` is empty"));
        assert_eq!(tools(None, Some(&json!("none")), None).unwrap(), None);
        let bad = json!([{"type": "function", "function": {"name": "has space"}}]);
        assert!(tools(Some(&bad), None, None).unwrap_err().message.contains("`tools[0].function.name`"));

        let required = tools(Some(&tools_json), Some(&json!("required")), Some(false)).unwrap().unwrap();
        let Some(Grammar::JsonSchema(list)) = required.json_grammar() else { panic!() };
        assert_eq!(list["maxItems"], 1);
        assert_eq!(list["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
    }
}
