//! Chat templates: the Jinja template a checkpoint ships (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`) rendered with minijinja the way transformers
//! renders it: `trim_blocks` and `lstrip_blocks` on, loop controls, Python string methods
//! (`.strip()`, `.startswith()`…), `tojson`, `raise_exception` and `strftime_now`.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value as Jinja};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One message of a conversation; `content` is a string or a list of parts. Other fields
/// (`name`, `tool_calls`, …) go to the template as they are.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, … as the model's chat template knows them.
    pub role: String,
    #[serde(default)]
    #[schema(value_type = MessageContent)]
    pub content: Value,
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: serde_json::Map<String, Value>,
}

/// The shapes a message's `content` takes.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // a schema: `content` goes to the template as JSON
pub enum MessageContent {
    Text(String),
    Parts(Vec<TextPart>),
}

/// A part of a message: `{"type": "text", "text": …}`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // a schema, as `MessageContent`
pub struct TextPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn special_token(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`, if it has one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::InvalidJson { file: config_path.clone(), message: e.to_string() })?,
            Err(_) => Value::Null,
        };
        let file = dir.join("chat_template.jinja");
        let source = if file.exists() {
            std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: use "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => return Ok(None),
            }
        };
        Self::new(source, special_token(&config, "bos_token"), special_token(&config, "eos_token")).map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Jinja, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned(NAME, source).map_err(|e| ModelError::Tokenizer(format!("chat template: {e:#}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// Renders `messages` into a prompt; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(NAME).expect("added in new");
        let ctx = minijinja::context! {
            messages => Jinja::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template.render(ctx).map_err(|e| {
            // raise_exception's message is the template author's words for the user.
            let detail = if e.kind() == ErrorKind::InvalidOperation {
                e.detail().unwrap_or_default().to_string()
            } else {
                format!("{e:#}")
            };
            ModelError::InvalidRequest(format!("chat template: {detail}"))
        })
    }
}

/// `strftime_now(format)`: the current UTC date and time, for the `%Y %m %d %H %M %S %B %b`
/// directives templates use to print today's date.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_now_formats_today() {
        let s = strftime_now("%d %B %Y");
        assert_eq!(s.len(), "21 November 2026".len().max(s.len()));
        assert!(s.split(' ').nth(2).unwrap().parse::<i32>().unwrap() >= 2024, "{s}");
    }
}
