//! A chat choice's output turned into the assistant message's parts — `content`,
//! `reasoning_content` and `tool_calls` — as it streams and whole.
//!
//! The model family decides the format ([`OutputFormat`], detected once from the tokenizer and
//! chat template): gpt-oss writes harmony (messages on the `analysis`, `commentary` and `final`
//! channels between special tokens; a tool call is a commentary message to
//! `functions.NAME`), Qwen and Hermes templates wrap calls in `<tool_call>{…}</tool_call>`. A
//! `required` or named `tool_choice` on the other families is decoded as plain JSON (the
//! grammar of [`Tools::json_grammar`](super::structured::Tools::json_grammar)).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;
use switchyard_model::tokenizer::Tokenizer;
use utoipa::ToSchema;

use super::structured::{ToolChoice, Tools};

/// The special tokens of the harmony format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Harmony {
    pub start: u32,
    pub end: u32,
    pub message: u32,
    pub channel: u32,
    pub constrain: u32,
    pub return_: u32,
    pub call: u32,
}

/// How the served model writes tool calls (and reasoning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Plain text; tool calls only through `required` or a named `tool_choice`.
    Plain,
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (Qwen, Hermes).
    Hermes,
    /// gpt-oss's harmony channels.
    Harmony(Harmony),
}

impl OutputFormat {
    /// Harmony where the tokenizer has its special tokens; Hermes where the chat template
    /// writes `<tool_call>`; else plain.
    pub fn detect(tokenizer: Option<&Tokenizer>, template_source: Option<&str>) -> Self {
        if let Some(tk) = tokenizer {
            let id = |t: &str| tk.token_id(t);
            if let (Some(start), Some(end), Some(message), Some(channel), Some(constrain), Some(return_), Some(call)) = (
                id("<|start|>"),
                id("<|end|>"),
                id("<|message|>"),
                id("<|channel|>"),
                id("<|constrain|>"),
                id("<|return|>"),
                id("<|call|>"),
            ) {
                return OutputFormat::Harmony(Harmony { start, end, message, channel, constrain, return_, call });
            }
        }
        if template_source.is_some_and(|s| s.contains("<tool_call>")) {
            return OutputFormat::Hermes;
        }
        OutputFormat::Plain
    }

    /// Whether the model can decide to call a tool (`tool_choice: "auto"`) in a form this
    /// server parses.
    pub fn parses_calls(&self) -> bool {
        !matches!(self, OutputFormat::Plain)
    }
}

/// A tool call as the API shows it, or a piece of one in a stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The arguments as JSON text (a piece of it in a stream).
    pub arguments: String,
}

/// What a piece of output adds to the message.
#[derive(Debug, Default, PartialEq)]
pub struct Parts {
    pub content: String,
    pub reasoning: String,
    pub calls: Vec<ToolCallDelta>,
}

impl Parts {
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.reasoning.is_empty() && self.calls.is_empty()
    }

    pub fn extend(&mut self, more: Parts) {
        self.content.push_str(&more.content);
        self.reasoning.push_str(&more.reasoning);
        self.calls.extend(more.calls);
    }

    /// Merges the pieces of each call (by index) into whole calls.
    pub fn merged_calls(calls: Vec<ToolCallDelta>) -> Vec<ToolCallDelta> {
        let mut out: Vec<ToolCallDelta> = Vec::new();
        for c in calls {
            match out.iter_mut().find(|o| o.index == c.index) {
                Some(o) => {
                    o.function.arguments.push_str(&c.function.arguments);
                    o.id = o.id.take().or(c.id);
                    o.kind = o.kind.or(c.kind);
                    o.function.name = o.function.name.take().or(c.function.name);
                }
                None => out.push(c),
            }
        }
        out
    }
}

fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("call_{:x}{n:04x}", t & 0xffff_ffff_ffff)
}

/// The opening piece of call `index`: its id, type and name.
fn call_start(index: usize, name: &str, arguments: String) -> ToolCallDelta {
    ToolCallDelta {
        index,
        id: Some(call_id()),
        kind: Some("function"),
        function: FunctionDelta { name: Some(name.to_string()), arguments },
    }
}

/// The longest end of `text` that is a proper prefix of `marker` (held back: it may be the
/// start of the marker).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len()).rev().find(|&n| text.ends_with(&marker[..n])).unwrap_or(0)
}

/// Decodes a growing list of token ids into text incrementally, a few ids of context per
/// token, holding back an unfinished character.
#[derive(Default)]
struct Incremental {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Incremental {
    fn push(&mut self, id: u32, tk: &Tokenizer) -> String {
        self.ids.push(id);
        let before = tk.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        let full = tk.decode(&self.ids[self.prefix..]).unwrap_or_default();
        if full.len() > before.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(before.len()) {
            self.prefix = self.read;
            self.read = self.ids.len();
            return full[before.len()..].to_string();
        }
        String::new()
    }

    /// What is still held back, as it is.
    fn flush(&mut self, tk: &Tokenizer) -> String {
        let before = tk.decode(&self.ids[self.prefix..self.read]).unwrap_or_default();
        let full = tk.decode(&self.ids[self.prefix..]).unwrap_or_default();
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        if full.len() > before.len() && full.is_char_boundary(before.len()) {
            full[before.len()..].to_string()
        } else {
            String::new()
        }
    }
}

/// Where a harmony message's body goes.
#[derive(Clone, Debug, PartialEq)]
enum Body {
    Reasoning,
    Content,
    /// The arguments of call `index`.
    Call(usize),
    /// A call left out of the message (one past the first without parallel calls).
    Skipped,
}

enum HarmonyState {
    /// Reading a message header (role, channel, recipient, content type) up to `<|message|>`.
    Header(String),
    Body(Body, Incremental),
}

enum Mode {
    /// Everything is content.
    Plain,
    /// Everything is the arguments of one call of this tool.
    Named {
        name: String,
        started: bool,
    },
    /// A JSON list of `{"name", "parameters"}` calls, reported once whole.
    Required {
        text: String,
    },
    /// Content with `<tool_call>` blocks; `call` holds the text of the open block.
    Hermes {
        pending: String,
        call: Option<String>,
    },
    Harmony {
        tokens: Harmony,
        state: HarmonyState,
    },
}

/// Splits one choice's output into the message's parts.
pub struct MessageParser {
    mode: Mode,
    /// Whether tool calls are reported (`tool_choice` not `none`).
    calls_allowed: bool,
    parallel: bool,
    /// Whether `tool_choice` named the function (the call is the answer, not the model's
    /// choice).
    named: bool,
    calls: usize,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl MessageParser {
    pub fn new(format: OutputFormat, tools: Option<&Tools>) -> Self {
        let choice = tools.map_or(&ToolChoice::None, |t| &t.choice);
        let mode = match (format, choice) {
            (OutputFormat::Harmony(tokens), _) => Mode::Harmony { tokens, state: HarmonyState::Header(String::new()) },
            (_, ToolChoice::Named(name)) => Mode::Named { name: name.clone(), started: false },
            (_, ToolChoice::Required) => Mode::Required { text: String::new() },
            (OutputFormat::Hermes, ToolChoice::Auto) => Mode::Hermes { pending: String::new(), call: None },
            _ => Mode::Plain,
        };
        MessageParser {
            mode,
            calls_allowed: !matches!(choice, ToolChoice::None),
            parallel: tools.is_none_or(|t| t.parallel),
            named: matches!(choice, ToolChoice::Named(_)),
            calls: 0,
        }
    }

    /// Whether the message holds a tool call the model chose (`finish_reason` `tool_calls`;
    /// a named `tool_choice` finishes with `stop`, as OpenAI reports it).
    pub fn called(&self) -> bool {
        self.calls > 0 && !self.named
    }

    /// The parts of newly released `text` (special tokens left out) and the `ids` it came from.
    pub fn push(&mut self, text: &str, ids: &[u32], tk: Option<&Tokenizer>) -> Parts {
        let mut out = Parts::default();
        match &mut self.mode {
            Mode::Plain => out.content.push_str(text),
            Mode::Named { name, started } => {
                if !*started {
                    *started = true;
                    self.calls = 1;
                    out.calls.push(call_start(0, name, text.to_string()));
                } else if !text.is_empty() {
                    out.calls.push(ToolCallDelta {
                        index: 0,
                        function: FunctionDelta { name: None, arguments: text.into() },
                        ..Default::default()
                    });
                }
            }
            Mode::Required { text: all } => all.push_str(text),
            Mode::Hermes { .. } => out = self.hermes(text, false),
            Mode::Harmony { .. } => {
                if let Some(tk) = tk {
                    for &id in ids {
                        out.extend(self.harmony(id, tk));
                    }
                }
            }
        }
        out
    }

    /// What is left once the output has ended.
    pub fn finish(&mut self, tk: Option<&Tokenizer>) -> Parts {
        let mut out = Parts::default();
        match &mut self.mode {
            Mode::Plain | Mode::Named { .. } => {}
            Mode::Required { text } => {
                let calls = serde_json::from_str::<Vec<Value>>(text).ok().and_then(|list| {
                    list.iter()
                        .map(|c| Some((c.get("name")?.as_str()?.to_string(), c.get("parameters")?.to_string())))
                        .collect::<Option<Vec<_>>>()
                });
                match calls {
                    Some(calls) if !calls.is_empty() => {
                        for (i, (name, args)) in calls.into_iter().enumerate() {
                            out.calls.push(call_start(i, &name, args));
                        }
                        self.calls = out.calls.len();
                    }
                    // Cut short (max_tokens): what there is, as content.
                    _ => out.content = std::mem::take(text),
                }
            }
            Mode::Hermes { .. } => out = self.hermes("", true),
            Mode::Harmony { state, .. } => match std::mem::replace(state, HarmonyState::Header(String::new())) {
                HarmonyState::Header(text) => out.content.push_str(&text),
                HarmonyState::Body(body, mut dec) => {
                    let rest = tk.map(|tk| dec.flush(tk)).unwrap_or_default();
                    self.route(&body, rest, &mut out);
                }
            },
        }
        out
    }

    fn route(&self, body: &Body, text: String, out: &mut Parts) {
        if text.is_empty() {
            return;
        }
        match body {
            Body::Reasoning => out.reasoning.push_str(&text),
            Body::Content => out.content.push_str(&text),
            Body::Call(index) => out.calls.push(ToolCallDelta {
                index: *index,
                function: FunctionDelta { name: None, arguments: text },
                ..Default::default()
            }),
            Body::Skipped => {}
        }
    }

    /// Hermes blocks: content up to `<tool_call>` (holding back what may be its start), then
    /// the block's JSON, reported as a call once `</tool_call>` (or the end) closes it.
    fn hermes(&mut self, text: &str, end: bool) -> Parts {
        let Mode::Hermes { pending, call } = &mut self.mode else { unreachable!() };
        pending.push_str(text);
        let mut out = Parts::default();
        loop {
            match call {
                None => match pending.find(OPEN) {
                    Some(at) => {
                        out.content.push_str(&pending[..at]);
                        pending.drain(..at + OPEN.len());
                        *call = Some(String::new());
                    }
                    None => {
                        let keep = if end { 0 } else { partial_suffix(pending, OPEN) };
                        let upto = pending.len() - keep;
                        out.content.push_str(&pending[..upto]);
                        pending.drain(..upto);
                        break;
                    }
                },
                Some(body) => match pending.find(CLOSE) {
                    Some(at) => {
                        body.push_str(&pending[..at]);
                        pending.drain(..at + CLOSE.len());
                        let block = std::mem::take(body);
                        *call = None;
                        Self::hermes_call(&block, self.calls, &mut out);
                    }
                    None => {
                        let keep = if end { 0 } else { partial_suffix(pending, CLOSE) };
                        let upto = pending.len() - keep;
                        body.push_str(&pending[..upto]);
                        pending.drain(..upto);
                        if end {
                            let block = std::mem::take(body);
                            *call = None;
                            Self::hermes_call(&block, self.calls, &mut out);
                        }
                        break;
                    }
                },
            }
        }
        let made = out.calls.len();
        if !self.parallel && self.calls + made > 1 {
            // One call per message: the later ones are left out of it.
            out.calls.truncate(1usize.saturating_sub(self.calls));
        }
        if !self.calls_allowed {
            out.calls.clear();
        }
        self.calls += out.calls.len();
        out
    }

    /// One `<tool_call>` block: a call where it is `{"name", "arguments"}` JSON, else content
    /// as written.
    fn hermes_call(block: &str, index: usize, out: &mut Parts) {
        let parsed: Option<(String, String)> = serde_json::from_str::<Value>(block.trim()).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_string();
            let args = v
                .get("arguments")
                .or_else(|| v.get("parameters"))
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            let args = match args {
                Value::String(s) => s,
                other => other.to_string(),
            };
            Some((name, args))
        });
        match parsed {
            Some((name, args)) => out.calls.push(call_start(index + out.calls.len(), &name, args)),
            None => {
                out.content.push_str(OPEN);
                out.content.push_str(block);
            }
        }
    }

    /// One token of harmony output.
    fn harmony(&mut self, id: u32, tk: &Tokenizer) -> Parts {
        let mut out = Parts::default();
        let Mode::Harmony { tokens: t, state } = &mut self.mode else { unreachable!() };
        let t = *t;
        match state {
            HarmonyState::Header(header) => {
                if id == t.message {
                    let body = Self::harmony_body(header);
                    let body = match body {
                        Some(name) if self.calls_allowed && (self.parallel || self.calls == 0) => {
                            let index = self.calls;
                            self.calls += 1;
                            out.calls.push(call_start(index, &name, String::new()));
                            Body::Call(index)
                        }
                        // A call `tool_choice: "none"` does not take is text like any other;
                        // one past the first without parallel calls is left out of the message.
                        Some(_) if !self.calls_allowed => Body::Content,
                        Some(_) => Body::Skipped,
                        None if header.contains("<|channel|>analysis") => Body::Reasoning,
                        None => Body::Content,
                    };
                    *state = HarmonyState::Body(body, Incremental::default());
                } else if id == t.channel {
                    header.push_str("<|channel|>");
                } else if id == t.constrain {
                    header.push_str(" <|constrain|>");
                } else if id == t.start {
                    header.clear();
                } else if ![t.end, t.return_, t.call].contains(&id) {
                    header.push_str(&tk.token_text(id));
                }
            }
            HarmonyState::Body(body, dec) => {
                if [t.end, t.return_, t.call, t.start].contains(&id) {
                    let rest = dec.flush(tk);
                    let body = body.clone();
                    *state = HarmonyState::Header(String::new());
                    self.route(&body, rest, &mut out);
                } else {
                    let text = dec.push(id, tk);
                    let body = body.clone();
                    self.route(&body, text, &mut out);
                }
            }
        }
        out
    }

    /// The function a harmony header addresses (`to=functions.NAME`), if any.
    fn harmony_body(header: &str) -> Option<String> {
        let to = header.split_whitespace().chain(header.split("<|channel|>")).find_map(|w| {
            let w = w.trim();
            w.strip_prefix("to=").or_else(|| w.split_whitespace().find_map(|x| x.strip_prefix("to=")))
        })?;
        let to = to.split(|c: char| c.is_whitespace() || c == '<').next().unwrap_or_default();
        Some(to.strip_prefix("functions.").unwrap_or(to).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools(choice: ToolChoice, parallel: bool) -> Tools {
        Tools {
            tools: vec![super::super::structured::Tool { name: "f".into(), parameters: json!({"type": "object"}) }],
            choice,
            parallel,
        }
    }

    #[test]
    fn hermes_blocks_become_calls_and_the_rest_content_however_the_text_is_cut() {
        let text = "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {}}";
        for cut in [1, 3, 7, text.len()] {
            let mut p = MessageParser::new(OutputFormat::Hermes, Some(&tools(ToolChoice::Auto, true)));
            let mut all = Parts::default();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(cut) {
                all.extend(p.push(&piece.iter().collect::<String>(), &[], None));
            }
            all.extend(p.finish(None));
            assert_eq!(all.content, "Sure.\n\n", "cut {cut}");
            let calls = Parts::merged_calls(all.calls);
            assert_eq!(calls.len(), 2);
            assert_eq!(
                (calls[0].function.name.as_deref(), calls[0].function.arguments.as_str()),
                (Some("f"), "{\"x\":1}")
            );
            assert_eq!((calls[1].index, calls[1].function.name.as_deref()), (1, Some("g")));
            assert!(p.called());
        }
        // One call per message without parallel calls; none at all with tool_choice none.
        let mut p = MessageParser::new(OutputFormat::Hermes, Some(&tools(ToolChoice::Auto, false)));
        let mut all = p.push(text, &[], None);
        all.extend(p.finish(None));
        assert_eq!(all.calls.len(), 1);
        let mut p = MessageParser::new(OutputFormat::Hermes, None);
        assert_eq!(p.push(text, &[], None).content, text);
    }

    #[test]
    fn required_and_named_calls_come_from_json() {
        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Required, true)));
        assert!(p.push("[{\"name\":\"f\",\"parameters\":{\"a\":[1]}}", &[], None).is_empty());
        let parts = p.push("]", &[], None);
        assert!(parts.is_empty());
        let done = p.finish(None);
        assert_eq!(done.calls[0].function.arguments, "{\"a\":[1]}");
        assert!(p.called());
        // Cut short: content, no call.
        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Required, true)));
        p.push("[{\"name\":", &[], None);
        assert_eq!(p.finish(None).content, "[{\"name\":");

        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Named("f".into()), true)));
        let first = p.push("{\"a\"", &[], None);
        assert_eq!(
            (first.calls[0].function.name.as_deref(), first.calls[0].function.arguments.as_str()),
            (Some("f"), "{\"a\"")
        );
        assert_eq!(p.push(":1}", &[], None).calls[0].function.arguments, ":1}");
        assert!(!p.called(), "a named tool_choice finishes with `stop`");
    }

    /// Output as gpt-oss writes it, token by token through the harmony fixture's tokenizer:
    /// every token is one the request's grammar allows, the grammar is complete at its end,
    /// and the parser splits reasoning, content and the call's arguments.
    #[test]
    fn harmony_output_follows_its_grammars_and_splits_into_channels() {
        use super::super::structured::{Tool, harmony_call, harmony_final};
        use switchyard_model::grammar::{Grammar, Grammars};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt_oss_harmony");
        let tk = Tokenizer::from_dir(&dir).unwrap();
        let format = OutputFormat::detect(Some(&tk), None);
        assert!(matches!(format, OutputFormat::Harmony(h) if h.channel == tk.token_id("<|channel|>").unwrap()));
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let vocab = config["vocab_size"].as_u64().unwrap() as usize;
        let eos: Vec<u32> = serde_json::from_value(config["eos_token_id"].clone()).unwrap();
        let grammars =
            Grammars::from_tokenizer_json(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(), vocab, &eos)
                .unwrap();
        let weather = Tool {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"],
                               "additionalProperties": false}),
        };
        let named =
            Tools { tools: vec![weather.clone()], choice: ToolChoice::Named("get_weather".into()), parallel: true };
        let run = |grammar: &Grammar, tools: Option<&Tools>, text: &str| {
            let mut c = grammars.compile(grammar).unwrap();
            let ids = tk.encode_raw(text).unwrap();
            for &id in &ids {
                let mut logits = vec![0.0; vocab];
                c.apply(&mut logits).unwrap();
                assert_eq!(logits[id as usize], 0.0, "{:?} not allowed after {text:?}", tk.token_text(id));
                c.commit(id).unwrap();
            }
            assert!(c.is_complete(), "{text:?}");
            let mut p = MessageParser::new(format, tools);
            let mut parts = p.push("", &ids, Some(&tk));
            parts.extend(p.finish(Some(&tk)));
            (parts, p.called())
        };
        let call = "<|channel|>analysis<|message|>The user wants Paris.<|end|><|start|>assistant<|channel|>commentary \
                    to=functions.get_weather <|constrain|>json<|message|>{\"location\":\"Paris\"}";
        let (parts, called) = run(&harmony_call(&named).unwrap(), Some(&named), call);
        assert_eq!(parts.reasoning, "The user wants Paris.");
        assert_eq!(parts.content, "");
        let calls = Parts::merged_calls(parts.calls);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name.as_deref(), Some("get_weather"));
        assert_eq!(calls[0].function.arguments, "{\"location\":\"Paris\"}");
        assert!(!called, "a named tool_choice finishes with `stop`");
        // With `tool_choice: "none"`, a call the model writes anyway is text like any other.
        let mut p = MessageParser::new(format, None);
        let mut parts = p.push("", &tk.encode_raw(call).unwrap(), Some(&tk));
        parts.extend(p.finish(Some(&tk)));
        assert_eq!((parts.content.as_str(), parts.calls.len()), ("{\"location\":\"Paris\"}", 0));
        let required = Tools { choice: ToolChoice::Required, ..named.clone() };
        let (_, called) = run(&harmony_call(&required).unwrap(), Some(&required), call);
        assert!(called);

        // A JSON answer goes on the final channel, reasoning or not.
        let answer = "<|channel|>final<|message|>{\"ok\":true}";
        let (parts, _) = run(&harmony_final(&Grammar::JsonObject), None, answer);
        assert_eq!((parts.content.as_str(), parts.reasoning.as_str()), ("{\"ok\":true}", ""));
        let choice = Grammar::Choice(vec!["yes".into(), "no".into()]);
        let (parts, _) = run(
            &harmony_final(&choice),
            None,
            "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>no",
        );
        assert_eq!((parts.content.as_str(), parts.reasoning.as_str()), ("no", "Hm."));
    }

    #[test]
    fn harmony_headers_name_the_channel_and_the_recipient() {
        assert_eq!(
            MessageParser::harmony_body("<|channel|>commentary to=functions.get_weather <|constrain|>json"),
            Some("get_weather".into())
        );
        assert_eq!(MessageParser::harmony_body("assistant to=functions.x<|channel|>commentary json"), Some("x".into()));
        assert_eq!(MessageParser::harmony_body("<|channel|>analysis"), None);
    }
}
