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
    /// The template's text, to tell which variables it reads.
    source: String,
    bos_token: String,
    eos_token: String,
}

/// What a chat request passes to the template beside its messages, as transformers passes
/// `apply_chat_template`'s keyword arguments.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// The request's `tools` (OpenAI's function definitions), as sent.
    pub tools: Option<Value>,
    /// `reasoning_effort` (gpt-oss templates read it).
    pub reasoning_effort: Option<String>,
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
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e:#}")))?;
        Ok(ChatTemplate { env, source, bos_token, eos_token })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template reads the variable `name` (so passing it changes the prompt).
    pub fn reads(&self, name: &str) -> bool {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        self.source.match_indices(name).any(|(at, _)| {
            let before = self.source[..at].chars().next_back();
            let after = self.source[at + name.len()..].chars().next();
            !before.is_some_and(ident) && !after.is_some_and(ident)
        })
    }

    /// Renders `messages` into a prompt; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// [`ChatTemplate::render`] with the request's tools and reasoning effort.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        options: &RenderOptions,
    ) -> Result<String> {
        let template = self.env.get_template(NAME).expect("added in new");
        let messages: Vec<ChatMessage> = messages.iter().map(arguments_as_objects).collect();
        let ctx = minijinja::context! {
            messages => Jinja::from(minijinja::value::Serde(&messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => options.tools.as_ref().map(|t| Jinja::from(minijinja::value::Serde(t))),
            reasoning_effort => options.reasoning_effort.as_deref(),
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

/// `message` with each tool call's `arguments` as the object its JSON text holds: OpenAI's
/// clients send the text, chat templates (as transformers documents them) expect the object.
/// Text that is not a JSON object stays as it is.
fn arguments_as_objects(message: &ChatMessage) -> ChatMessage {
    let mut m = message.clone();
    if let Some(Value::Array(calls)) = m.extra.get_mut("tool_calls") {
        for call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments")
                && let Some(parsed) = args.as_str().and_then(|t| serde_json::from_str::<Value>(t).ok())
                && parsed.is_object()
            {
                *args = parsed;
            }
        }
    }
    m
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with its
/// `indent`, `separators`, `sort_keys` and `ensure_ascii` (which transformers turns off by
/// default): `", "` and `": "` between items, keys in their order, non-ASCII text as it is,
/// floats as Python prints them, no HTML escaping. minijinja's own filter escapes `<`, `>`,
/// `&` and `'`, which would change the prompt a template renders from what the model was
/// trained on.
fn tojson(
    value: Jinja,
    ensure_ascii: Option<Jinja>,
    indent: Option<usize>,
    separators: Option<Vec<String>>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Jinja, Error> {
    let invalid = |message: String| Error::new(ErrorKind::InvalidOperation, format!("tojson: {message}"));
    // transformers' order of arguments: `tojson(x, ensure_ascii, indent, separators, sort_keys)`
    // (`sort_keys` by name only here).
    let ensure_ascii = kwargs.get::<Option<Jinja>>("ensure_ascii")?.or(ensure_ascii).is_some_and(|v| v.is_true());
    let indent = kwargs.get::<Option<usize>>("indent")?.or(indent);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")?.or(separators) {
        None => None,
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => Some((item, key)),
            Err(pair) => return Err(invalid(format!("`separators` must be two strings, got {}", pair.len()))),
        },
    };
    let style = PyJson {
        indent,
        // Python's defaults: no space before a newline.
        separators: separators.unwrap_or_else(|| ((if indent.is_some() { "," } else { ", " }).into(), ": ".into())),
        sort_keys,
        ensure_ascii,
    };
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| invalid(e.to_string()))?;
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Jinja::from_safe_string(out))
}

/// How Python's `json.dumps` lays JSON out.
struct PyJson {
    indent: Option<usize>,
    /// Between items, and between a key and its value.
    separators: (String, String),
    sort_keys: bool,
    /// Non-ASCII characters as `\uXXXX` escapes (UTF-16, as Python writes them).
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, v: &Value, depth: usize, out: &mut String) {
        let (open, close, mut items): (char, char, Vec<(Option<&String>, &Value)>) = match v {
            Value::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
            Value::Object(o) => ('{', '}', o.iter().map(|(k, x)| (Some(k), x)).collect()),
            Value::String(s) => return self.string(s, out),
            Value::Number(n) if n.is_f64() => return python_float(n.as_f64().expect("an f64"), out),
            scalar => return out.push_str(&scalar.to_string()),
        };
        if self.sort_keys {
            items.sort_by_key(|(k, _)| *k);
        }
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return;
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        for (i, (key, item)) in items.into_iter().enumerate() {
            if i > 0 {
                out.push_str(&self.separators.0);
            }
            newline(out, depth + 1);
            if let Some(k) = key {
                self.string(k, out);
                out.push_str(&self.separators.1);
            }
            self.write(item, depth + 1, out);
        }
        newline(out, depth);
        out.push(close);
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).expect("strings serialize");
        if !self.ensure_ascii || !quoted.bytes().any(|b| b >= 0x7f) {
            return out.push_str(&quoted);
        }
        for c in quoted.chars() {
            // Python escapes DEL too.
            if c.is_ascii() && c != '\x7f' {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// `x` as Python's `repr` writes a float: the shortest digits that read back as `x`, in
/// positional notation for decimal exponents from -4 to 15 (`123.0`, `0.0001`), else in
/// scientific notation with a signed exponent of at least two digits (`1e+16`, `1.5e-07`).
fn python_float(x: f64, out: &mut String) {
    // serde_json writes the shortest digits too, in another layout: read them back from it.
    let text = serde_json::Number::from_f64(x).map_or_else(|| "NaN".to_string(), |n| n.to_string());
    let (sign, text) = text.strip_prefix('-').map_or(("", text.as_str()), |t| ("-", t));
    let (mantissa, exponent) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all = format!("{int}{frac}");
    let lead = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_matches('0');
    if digits.is_empty() {
        out.push_str(sign);
        return out.push_str("0.0");
    }
    // The value is 0.DIGITS × 10^(point), DIGITS without leading zeros.
    let point = int.len() as i32 - lead as i32 + exponent;
    let sci = point - 1;
    out.push_str(sign);
    if (-4..16).contains(&sci) {
        if point <= 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat(point.unsigned_abs() as usize));
            out.push_str(digits);
        } else {
            let point = point as usize;
            let whole: String = digits.chars().chain(std::iter::repeat('0')).take(point.max(digits.len())).collect();
            let (int, frac) = whole.split_at(point);
            out.push_str(int);
            out.push('.');
            out.push_str(if frac.is_empty() { "0" } else { frac });
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!("e{}{:02}", if sci < 0 { '-' } else { '+' }, sci.abs()));
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

    /// Each against what Python's `json.dumps` writes with the same arguments.
    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let cases = [
            (
                "x | tojson",
                r#"{"b": "it's <ok> & \"é\"\n😀", "a": [1, 2.5, true, null, 1e+20, 1.5e-07, 0.0001, 1e-05, 123.0, 1e+16, 1000000000000000.0, -0.5], "c": {}, "A": {"z": 1, "y": [2]}}"#,
            ),
            (
                "x | tojson(ensure_ascii=true)",
                r#"{"b": "it's <ok> & \"\u00e9\"\n\ud83d\ude00", "a": [1, 2.5, true, null, 1e+20, 1.5e-07, 0.0001, 1e-05, 123.0, 1e+16, 1000000000000000.0, -0.5], "c": {}, "A": {"z": 1, "y": [2]}}"#,
            ),
            (
                "x | tojson(separators=(',', ':'), sort_keys=true, ensure_ascii=true)",
                r#"{"A":{"y":[2],"z":1},"a":[1,2.5,true,null,1e+20,1.5e-07,0.0001,1e-05,123.0,1e+16,1000000000000000.0,-0.5],"b":"it's <ok> & \"\u00e9\"\n\ud83d\ude00","c":{}}"#,
            ),
            (
                "x | tojson(indent=2, sort_keys=true, ensure_ascii=true)",
                r#"{
  "A": {
    "y": [
      2
    ],
    "z": 1
  },
  "a": [
    1,
    2.5,
    true,
    null,
    1e+20,
    1.5e-07,
    0.0001,
    1e-05,
    123.0,
    1e+16,
    1000000000000000.0,
    -0.5
  ],
  "b": "it's <ok> & \"\u00e9\"\n\ud83d\ude00",
  "c": {}
}"#,
            ),
            (
                "x | tojson(indent=1, separators=[';', '='])",
                r#"{
 "b"="it's <ok> & \"é\"\n😀";
 "a"=[
  1;
  2.5;
  true;
  null;
  1e+20;
  1.5e-07;
  0.0001;
  1e-05;
  123.0;
  1e+16;
  1000000000000000.0;
  -0.5
 ];
 "c"={};
 "A"={
  "z"=1;
  "y"=[
   2
  ]
 }
}"#,
            ),
        ];
        let x = serde_json::json!({"b": "it's <ok> & \"é\"\n😀",
            "a": [1, 2.5, true, null, 1e20, 1.5e-7, 0.0001, 1e-5, 123.0, 1e16, 1e15, -0.5], "c": {}, "A": {"z": 1, "y": [2]}});
        for (expr, expected) in cases {
            let t = ChatTemplate::new(format!("{{{{ {expr} }}}}"), String::new(), String::new()).unwrap();
            let out = t
                .env
                .get_template(NAME)
                .unwrap()
                .render(minijinja::context! { x => Jinja::from(minijinja::value::Serde(&x)) })
                .unwrap();
            assert_eq!(out, expected, "{expr}");
        }
        // transformers' positional order (`ensure_ascii` first); Python escapes DEL too.
        let t = ChatTemplate::new(
            "{{ y | tojson(true) }}|{{ y | tojson }}|{{ y | tojson(false, 2) }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let out = t.env.get_template(NAME).unwrap().render(minijinja::context! { y => "é\x7f" }).unwrap();
        assert_eq!(out, "\"\\u00e9\\u007f\"|\"é\x7f\"|\"é\x7f\"");
        let t = ChatTemplate::new("{{ x | tojson(separators=[',']) }}".into(), String::new(), String::new()).unwrap();
        let err = t.env.get_template(NAME).unwrap().render(minijinja::context! { x => 1 }).unwrap_err();
        assert!(format!("{err:#}").contains("`separators` must be two strings"), "{err:#}");
    }

    #[test]
    fn strftime_now_formats_today() {
        let s = strftime_now("%d %B %Y");
        assert_eq!(s.len(), "21 November 2026".len().max(s.len()));
        assert!(s.split(' ').nth(2).unwrap().parse::<i32>().unwrap() >= 2024, "{s}");
    }
}
