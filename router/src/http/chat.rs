//! What a chat request means for the served model: the template's inputs (tools, reasoning
//! effort) and the grammar a tool choice or response format takes in the model's own output
//! format; and a finished choice read back as the assistant's message.

use switchyard_model::chat::RenderOptions;
use switchyard_model::grammar::Grammar;

use super::HttpState;
use super::api::AssistantMessage;
use super::choice::Collected;
use super::error::ApiError;
use super::message::{MessageParser, OutputFormat, Parts};
use super::openai::ChatRequest;
use super::structured::{self, ToolChoice, Tools};

/// What the chat template gets beside the messages: the tools where it renders them, and
/// `reasoning_effort`, refused where the template does not read it. A model that cannot
/// decide to call a tool in a form this server parses is refused `tool_choice: "auto"`.
pub fn render_options(state: &HttpState, r: &ChatRequest, tools: Option<&Tools>) -> Result<RenderOptions, ApiError> {
    let template = state.tokenizing.template.as_deref();
    let reads = |name: &str| template.is_some_and(|t| t.reads(name));
    let reasoning_effort = match r.reasoning_effort.as_deref() {
        None => None,
        Some(effort) if !["low", "medium", "high"].contains(&effort) => {
            return Err(ApiError::invalid(
                format!("`reasoning_effort` must be `low`, `medium` or `high`, got {effort:?}"),
                Some("reasoning_effort"),
            ));
        }
        Some(_) if !reads("reasoning_effort") => {
            return Err(ApiError::invalid(
                "`reasoning_effort` is not read by this model's chat template, so it would change nothing",
                Some("reasoning_effort"),
            ));
        }
        Some(effort) => Some(effort.to_string()),
    };
    if let Some(t) = tools
        && t.choice == ToolChoice::Auto
        && !(reads("tools") && state.output_format.parses_calls())
    {
        return Err(ApiError::invalid(
            "`tool_choice` `auto` needs a model whose chat template renders `tools` and whose tool calls this \
             server parses (Hermes `<tool_call>` blocks or gpt-oss's harmony format); this one has none: use \
             `required` or name a function in `tool_choice`",
            Some("tool_choice"),
        ));
    }
    // With `tool_choice` `none`, tools only change what the model reads.
    if let Some(t) = tools
        && t.choice == ToolChoice::None
        && !t.tools.is_empty()
        && !reads("tools")
    {
        return Err(ApiError::invalid(
            "`tools` are not rendered by this model's chat template, so with `tool_choice` `none` they would \
             change nothing",
            Some("tools"),
        ));
    }
    let tools = tools.filter(|_| reads("tools")).map(|_| r.tools.clone().unwrap_or_default());
    Ok(RenderOptions { tools, reasoning_effort })
}

/// The grammar of a `required` or named `tool_choice`: for gpt-oss a commentary message to
/// the function, else the plain JSON forms.
pub fn tool_grammar(state: &HttpState, tools: &Tools) -> Option<Grammar> {
    match state.output_format {
        OutputFormat::Harmony(_) => structured::harmony_call(tools),
        _ => tools.json_grammar(),
    }
}

/// A request's grammar as the model writes it: for gpt-oss, the final channel's text (after
/// any reasoning); else as it is.
pub fn output_grammar(state: &HttpState, grammar: Grammar) -> Grammar {
    match state.output_format {
        OutputFormat::Harmony(_) => structured::harmony_final(&grammar),
        _ => grammar,
    }
}

/// A whole chat choice as the assistant's message (content, reasoning, tool calls) and its
/// finish reason (`tool_calls` where the model chose to call).
pub fn assistant_message(state: &HttpState, tools: Option<&Tools>, c: &Collected) -> (AssistantMessage, &'static str) {
    let mut parser = MessageParser::new(state.output_format, tools);
    let ids: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
    let mut parts = parser.push(&c.text, &ids, &c.offsets);
    parts.extend(parser.finish());
    let calls = Parts::merged_calls(parts.calls);
    // No content beside calls or reasoning is `null` (the parser leaves out whitespace-only
    // content beside calls).
    let content =
        (!parts.content.is_empty() || (calls.is_empty() && parts.reasoning.is_empty())).then_some(parts.content);
    let message = AssistantMessage {
        role: "assistant",
        content,
        reasoning_content: Some(parts.reasoning).filter(|r| !r.is_empty()),
        tool_calls: Some(calls).filter(|c| !c.is_empty()),
    };
    (message, finish_reason(&parser, c.finish))
}

/// `tool_calls` where a choice that stopped by itself holds a call the model chose.
pub fn finish_reason(parser: &MessageParser, finish: &'static str) -> &'static str {
    if parser.called() && finish == "stop" { "tool_calls" } else { finish }
}
