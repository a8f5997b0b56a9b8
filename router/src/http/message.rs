//! A chat choice's output turned into the assistant message's parts — `content`,
//! `reasoning_content` and `tool_calls` — as it streams and whole.
//!
//! The model family decides the format ([`OutputFormat`], detected once from the tokenizer and
//! chat template): gpt-oss writes harmony (messages on the `analysis`, `commentary` and `final`
//! channels between special tokens; a tool call is a commentary message to
//! `functions.NAME`), Qwen and Hermes templates wrap calls in `<tool_call>{…}</tool_call>`. A
//! `required` or named `tool_choice` on the other families is decoded as plain JSON (the
//! grammar of [`Tools::json_grammar`](super::structured::Tools::json_grammar)).

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
        if template_source.is_some_and(writes_json_tool_calls) {
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

/// Whether a chat template writes tool calls as `<tool_call>` blocks of JSON (Qwen2.5, Qwen3,
/// Hermes), and not in the forms other templates put inside the same tags, which this server
/// does not parse (Qwen3-Coder's `<function=…><parameter=…>`, GLM-4.5's `<arg_key>`).
fn writes_json_tool_calls(template: &str) -> bool {
    // Quotes inside the template's string literals may be escaped.
    let text = template.replace('\\', "");
    if text.contains("<function=") || text.contains("<arg_key>") {
        return false;
    }
    text.match_indices(OPEN).any(|(at, _)| {
        let after: String = text[at + OPEN.len()..].chars().take(64).collect();
        after.contains("{\"name\"") || after.contains("{\"arguments\"")
    })
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

/// The opening piece of call `index`: its id, type and name.
fn call_start(index: usize, name: &str, arguments: String) -> ToolCallDelta {
    ToolCallDelta {
        index,
        id: Some(super::unique_id("call_")),
        kind: Some("function"),
        function: FunctionDelta { name: Some(name.to_string()), arguments },
    }
}

/// The longest end of `text` that is a proper prefix of `marker` (held back: it may be the
/// start of the marker).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len()).rev().find(|&n| text.ends_with(&marker[..n])).unwrap_or(0)
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
    Body(Body),
}

enum Mode {
    /// Everything is content.
    Plain,
    /// Everything is the arguments of one call of this tool.
    Named { name: String, started: bool },
    /// A JSON list of `{"name", "parameters"}` calls, reported once whole.
    Required { text: String },
    /// Content with `<tool_call>` blocks; `call` holds the text of the open block.
    Hermes { pending: String, call: Option<String> },
    Harmony {
        tokens: Harmony,
        state: HarmonyState,
        /// The harmony tokens seen but not yet reached in the text: where each stands (in
        /// characters of the choice's text, which leaves special tokens out) and which it is.
        marks: std::collections::VecDeque<(usize, u32)>,
        /// Characters of the text read so far.
        read: usize,
        /// Whether any harmony token was reached: output without one (a user's grammar that
        /// writes none) is all content.
        seen: bool,
        /// The arguments of the call being written, to tell a whole call from one cut short.
        args: String,
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
    /// Whether the output ended inside a call's arguments that are not whole JSON (cut by a
    /// stop string or `max_tokens`): the model did not finish calling.
    cut_call: bool,
    /// Content held back while all of it is whitespace and a call may still come: a message
    /// with tool calls and only whitespace besides has no content, streamed or not.
    blank: String,
    /// Whether content other than whitespace has gone out.
    spoke: bool,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

impl MessageParser {
    pub fn new(format: OutputFormat, tools: Option<&Tools>) -> Self {
        let choice = tools.map_or(&ToolChoice::None, |t| &t.choice);
        let mode = match (format, choice) {
            (OutputFormat::Harmony(tokens), _) => Mode::Harmony {
                tokens,
                state: HarmonyState::Header(String::new()),
                marks: Default::default(),
                read: 0,
                seen: false,
                args: String::new(),
            },
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
            cut_call: false,
            blank: String::new(),
            spoke: false,
        }
    }

    /// Whether the message holds a tool call the model chose (`finish_reason` `tool_calls`;
    /// a named `tool_choice` finishes with `stop`, as OpenAI reports it).
    pub fn called(&self) -> bool {
        self.calls > 0 && !self.named && !self.cut_call
    }

    /// The parts of newly released `text` (the choice's text: special tokens left out, cut
    /// at a stop string) and of the `ids` generated with it, each at its place in the text
    /// (`offsets`, in characters). The text is the message; the ids only tell where
    /// harmony's special tokens stand in it.
    pub fn push(&mut self, text: &str, ids: &[u32], offsets: &[usize]) -> Parts {
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
            Mode::Harmony { .. } => out = self.harmony(text, ids, offsets),
        }
        self.settle(&mut out, false);
        out
    }

    /// What is left once the output has ended.
    pub fn finish(&mut self) -> Parts {
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
            // A header the output ended in (cut short by `max_tokens` or a stop) is no part
            // of any message, unless the output has no harmony at all; the marks past the end
            // of the text were never reached.
            Mode::Harmony { state, marks, seen, args, .. } => {
                marks.clear();
                match std::mem::replace(state, HarmonyState::Header(String::new())) {
                    HarmonyState::Header(text) if !*seen => out.content = text,
                    HarmonyState::Body(Body::Call(_)) => {
                        self.cut_call = serde_json::from_str::<serde::de::IgnoredAny>(args).is_err();
                    }
                    _ => {}
                }
            }
        }
        self.settle(&mut out, true);
        out
    }

    /// Holds back content while all of it is whitespace and tool calls are possible; it goes
    /// out with the first other character, or at the end where no call came.
    fn settle(&mut self, out: &mut Parts, end: bool) {
        if !self.calls_allowed || self.spoke {
            return;
        }
        self.blank.push_str(&std::mem::take(&mut out.content));
        if !self.blank.trim().is_empty() {
            self.spoke = true;
            out.content = std::mem::take(&mut self.blank);
        } else if end && self.calls == 0 {
            out.content = std::mem::take(&mut self.blank);
        }
    }

    fn route(&self, body: &Body, text: &str, out: &mut Parts) {
        if text.is_empty() {
            return;
        }
        match body {
            Body::Reasoning => out.reasoning.push_str(text),
            Body::Content => out.content.push_str(text),
            Body::Call(index) => out.calls.push(ToolCallDelta {
                index: *index,
                function: FunctionDelta { name: None, arguments: text.to_string() },
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
                        Self::hermes_call(&block, true, self.calls, &mut out);
                    }
                    None => {
                        let keep = if end { 0 } else { partial_suffix(pending, CLOSE) };
                        let upto = pending.len() - keep;
                        body.push_str(&pending[..upto]);
                        pending.drain(..upto);
                        if end {
                            let block = std::mem::take(body);
                            *call = None;
                            Self::hermes_call(&block, false, self.calls, &mut out);
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

    /// One `<tool_call>` block (`closed` by its tag, or by the end of the output): a call
    /// where it is `{"name", "arguments"}` JSON, else content as written.
    fn hermes_call(block: &str, closed: bool, index: usize, out: &mut Parts) {
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
                if closed {
                    out.content.push_str(CLOSE);
                }
            }
        }
    }

    /// Harmony output: the text between two of its special tokens is a header or a body,
    /// the tokens' places in the text (`ids` at `offsets`) say which. A token whose place the
    /// released text has not reached yet waits for it.
    fn harmony(&mut self, text: &str, ids: &[u32], offsets: &[usize]) -> Parts {
        let mut out = Parts::default();
        let Mode::Harmony { tokens: t, marks, .. } = &mut self.mode else { unreachable!() };
        let structural = [t.start, t.end, t.message, t.channel, t.constrain, t.return_, t.call];
        marks.extend(ids.iter().zip(offsets).filter(|(id, _)| structural.contains(id)).map(|(&id, &at)| (at, id)));
        let mut rest = text;
        let mut left = rest.chars().count();
        loop {
            let Mode::Harmony { marks, read, .. } = &mut self.mode else { unreachable!() };
            match marks.front().copied() {
                Some((at, id)) if at <= *read + left => {
                    marks.pop_front();
                    let n = at.saturating_sub(*read);
                    let split = rest.char_indices().nth(n).map_or(rest.len(), |(b, _)| b);
                    let (before, after) = rest.split_at(split);
                    *read += n;
                    left -= n;
                    rest = after;
                    self.harmony_text(before, &mut out);
                    self.harmony_token(id, &mut out);
                }
                _ => {
                    *read += left;
                    self.harmony_text(rest, &mut out);
                    return out;
                }
            }
        }
    }

    /// Text of a harmony header or body.
    fn harmony_text(&mut self, text: &str, out: &mut Parts) {
        let Mode::Harmony { state, args, .. } = &mut self.mode else { unreachable!() };
        match state {
            HarmonyState::Header(header) => header.push_str(text),
            HarmonyState::Body(body) => {
                if matches!(body, Body::Call(_)) {
                    args.push_str(text);
                }
                let body = body.clone();
                self.route(&body, text, out);
            }
        }
    }

    /// One of harmony's special tokens, at its place in the text.
    fn harmony_token(&mut self, id: u32, out: &mut Parts) {
        let Mode::Harmony { tokens: t, state, seen, .. } = &mut self.mode else { unreachable!() };
        let t = *t;
        *seen = true;
        let header = match state {
            HarmonyState::Body(_) => {
                if [t.end, t.return_, t.call, t.start].contains(&id) {
                    *state = HarmonyState::Header(String::new());
                }
                return;
            }
            HarmonyState::Header(header) => header,
        };
        if id == t.channel {
            header.push_str("<|channel|>");
        } else if id == t.constrain {
            header.push_str(" <|constrain|>");
        } else if id == t.start {
            header.clear();
        }
        if id != t.message {
            return;
        }
        let header = std::mem::take(header);
        let body = match Self::harmony_body(&header) {
            Some(name) if self.calls_allowed && (self.parallel || self.calls == 0) => {
                let index = self.calls;
                self.calls += 1;
                out.calls.push(call_start(index, &name, String::new()));
                Body::Call(index)
            }
            // A call `tool_choice: "none"` does not take is text like any other; one past
            // the first without parallel calls is left out of the message.
            Some(_) if !self.calls_allowed => Body::Content,
            Some(_) => Body::Skipped,
            None if header.contains("<|channel|>analysis") => Body::Reasoning,
            None => Body::Content,
        };
        let Mode::Harmony { state, args, .. } = &mut self.mode else { unreachable!() };
        args.clear();
        *state = HarmonyState::Body(body);
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
                all.extend(p.push(&piece.iter().collect::<String>(), &[], &[]));
            }
            all.extend(p.finish());
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
        let mut all = p.push(text, &[], &[]);
        all.extend(p.finish());
        assert_eq!(all.calls.len(), 1);
        let mut p = MessageParser::new(OutputFormat::Hermes, None);
        assert_eq!(p.push(text, &[], &[]).content, text);
    }

    #[test]
    fn hermes_whitespace_beside_calls_is_no_content_and_bad_blocks_stay_text() {
        let tools = tools(ToolChoice::Auto, true);
        let text = "\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n";
        for cut in [1, text.len()] {
            let mut p = MessageParser::new(OutputFormat::Hermes, Some(&tools));
            let mut all = Parts::default();
            for piece in text.as_bytes().chunks(cut) {
                all.extend(p.push(std::str::from_utf8(piece).unwrap(), &[], &[]));
            }
            all.extend(p.finish());
            assert_eq!((all.content.as_str(), all.calls.len()), ("", 1), "cut {cut}");
        }
        // Whitespace alone with no call is the content.
        let mut p = MessageParser::new(OutputFormat::Hermes, Some(&tools));
        assert!(p.push("\n ", &[], &[]).is_empty());
        assert_eq!(p.finish().content, "\n ");
        // A block that is not a call is text as written, its tags included.
        let mut p = MessageParser::new(OutputFormat::Hermes, Some(&tools));
        let mut all = p.push("<tool_call>not json</tool_call> ok", &[], &[]);
        all.extend(p.finish());
        assert_eq!((all.content.as_str(), all.calls.len()), ("<tool_call>not json</tool_call> ok", 0));
    }

    #[test]
    fn only_templates_that_write_json_calls_are_read_as_hermes() {
        let qwen3 = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_moe/chat_template.jinja"),
        )
        .unwrap();
        assert_eq!(OutputFormat::detect(None, Some(&qwen3)), OutputFormat::Hermes);
        let hermes = r#"<tool_call>\n{\"arguments\": <args-dict>, \"name\": <function-name>}\n</tool_call>"#;
        assert_eq!(OutputFormat::detect(None, Some(hermes)), OutputFormat::Hermes);
        // Qwen3-Coder and GLM-4.5 write other forms inside the same tags.
        let coder = "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}";
        let glm = "<tool_call>{{ tc.name }}\n<arg_key>{{ k }}</arg_key>\n<arg_value>{{ v }}</arg_value>\n</tool_call>";
        assert_eq!(OutputFormat::detect(None, Some(coder)), OutputFormat::Plain);
        assert_eq!(OutputFormat::detect(None, Some(glm)), OutputFormat::Plain);
        assert_eq!(OutputFormat::detect(None, Some("{{ messages }}")), OutputFormat::Plain);
    }

    #[test]
    fn required_and_named_calls_come_from_json() {
        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Required, true)));
        assert!(p.push("[{\"name\":\"f\",\"parameters\":{\"a\":[1]}}", &[], &[]).is_empty());
        let parts = p.push("]", &[], &[]);
        assert!(parts.is_empty());
        let done = p.finish();
        assert_eq!(done.calls[0].function.arguments, "{\"a\":[1]}");
        assert!(p.called());
        // Cut short: content, no call.
        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Required, true)));
        p.push("[{\"name\":", &[], &[]);
        assert_eq!(p.finish().content, "[{\"name\":");

        let mut p = MessageParser::new(OutputFormat::Plain, Some(&tools(ToolChoice::Named("f".into()), true)));
        let first = p.push("{\"a\"", &[], &[]);
        assert_eq!(
            (first.calls[0].function.name.as_deref(), first.calls[0].function.arguments.as_str()),
            (Some("f"), "{\"a\"")
        );
        assert_eq!(p.push(":1}", &[], &[]).calls[0].function.arguments, ":1}");
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
            let whole = parse(format, tools, &tk, &ids, None, false);
            assert_eq!(parse(format, tools, &tk, &ids, None, true), whole, "streamed as whole: {text:?}");
            whole
        };
        let call = "<|channel|>analysis<|message|>The user wants Paris.<|end|><|start|>assistant<|channel|>commentary \
                    to=functions.get_weather <|constrain|>json<|message|>{\"location\":\"Paris\"}";
        let (parts, called) = run(&harmony_call(&named).unwrap(), Some(&named), call);
        assert_eq!(parts.reasoning, "The user wants Paris.");
        assert_eq!(parts.content, "");
        assert_eq!(parts.calls, vec![(Some("get_weather".to_string()), "{\"location\":\"Paris\"}".to_string())]);
        assert!(!called, "a named tool_choice finishes with `stop`");
        // With `tool_choice: "none"`, a call the model writes anyway is text like any other.
        let ids = tk.encode_raw(call).unwrap();
        let (parts, _) = parse(format, None, &tk, &ids, None, false);
        assert_eq!((parts.content.as_str(), parts.calls.len()), ("{\"location\":\"Paris\"}", 0));
        let required = Tools { choice: ToolChoice::Required, ..named.clone() };
        let (_, called) = run(&harmony_call(&required).unwrap(), Some(&required), call);
        assert!(called);
        // A stop string cuts the text: the special tokens after the cut are never reached.
        let cut = tk.decode(&ids).unwrap().find("Paris").unwrap();
        for streamed in [false, true] {
            let (parts, called) = parse(format, Some(&required), &tk, &ids, Some(cut), streamed);
            assert_eq!((parts.reasoning.as_str(), parts.content.as_str()), ("The user wants ", ""));
            assert!(parts.calls.is_empty() && !called);
        }
        // A stop string inside a call's arguments: the call is reported as far as it got, but
        // the model did not finish calling.
        let cut = tk.decode(&ids).unwrap().find("Paris\"}").unwrap();
        let (parts, called) = parse(format, Some(&required), &tk, &ids, Some(cut), false);
        assert_eq!(parts.calls, vec![(Some("get_weather".to_string()), "{\"location\":\"".to_string())]);
        assert!(!called);
        // Output without any harmony token (a user's grammar that writes none) is content.
        let ids = tk.encode_raw("yes").unwrap();
        assert_eq!(parse(format, None, &tk, &ids, None, true).0.content, "yes");
        // Output cut short in a header leaves the header out of the message.
        let ids = tk.encode_raw("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>fin").unwrap();
        let (parts, _) = parse(format, None, &tk, &ids, None, true);
        assert_eq!((parts.reasoning.as_str(), parts.content.as_str()), ("Hm.", ""));

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

    /// A message's parts: calls as their name and arguments.
    #[derive(Debug, PartialEq)]
    struct Message {
        content: String,
        reasoning: String,
        calls: Vec<(Option<String>, String)>,
    }

    /// The message `ids` make as a choice releases them: their text (special tokens left
    /// out, cut to `keep` characters where a stop string cuts it), whole or a token at a
    /// time; and whether the model called.
    fn parse(
        format: OutputFormat,
        tools: Option<&Tools>,
        tk: &Tokenizer,
        ids: &[u32],
        keep: Option<usize>,
        streamed: bool,
    ) -> (Message, bool) {
        let offsets = super::super::choice::text_offsets(ids, Some(tk));
        let text: Vec<char> = tk.decode(ids).unwrap().chars().take(keep.unwrap_or(usize::MAX)).collect();
        let mut p = MessageParser::new(format, tools);
        let mut parts = Parts::default();
        if streamed {
            // Each token with its text: up to where the next one's starts.
            for (i, &id) in ids.iter().enumerate() {
                let from = offsets[i].min(text.len());
                let to = offsets.get(i + 1).map_or(text.len(), |&o| o.min(text.len()));
                let piece: String = text[from..to].iter().collect();
                parts.extend(p.push(&piece, &[id], &offsets[i..=i]));
            }
        } else {
            parts.extend(p.push(&text.iter().collect::<String>(), ids, &offsets));
        }
        parts.extend(p.finish());
        let calls = Parts::merged_calls(parts.calls).into_iter().map(|c| (c.function.name, c.function.arguments));
        (Message { content: parts.content, reasoning: parts.reasoning, calls: calls.collect() }, p.called())
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
