//! [`Tokenizing`]: prompts to token ids off the async runtime. Tokenizing (and rendering a
//! chat template) costs time in proportion to the prompt, seconds for megabytes, so it runs on
//! tokio's blocking threads, at most `--tokenizer-threads` at a time, and a prompt over
//! `--max-prompt-bytes` is refused before any of that work. The runtime's workers stay free
//! for `/health`, streaming and the gRPC API.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use switchyard_model::chat::{ChatMessage, ChatTemplate, RenderOptions};
use switchyard_model::grammar::{Constraint, Grammar, Grammars};
use switchyard_model::tokenizer::{Fim, Tokenizer};
use tokio::sync::Semaphore;

/// Why a prompt could not be turned into token ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("`{field}` is {bytes} bytes; this server takes at most {limit} bytes of prompt per request")]
    TooLarge { field: &'static str, bytes: usize, limit: usize },
    #[error("the model has no tokenizer; send token ids")]
    NoTokenizer,
    #[error("the model has no chat template (chat_template.jinja or tokenizer_config.json); use /v1/completions")]
    NoTemplate,
    #[error("{message}")]
    Failed { field: &'static str, message: String },
}

impl TokenizeError {
    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TokenizeError::TooLarge { field, .. } | TokenizeError::Failed { field, .. } => field,
            TokenizeError::NoTokenizer => "prompt",
            TokenizeError::NoTemplate => "messages",
        }
    }
}

/// The tokenizer and chat template with a bounded pool of blocking threads to run them on.
pub struct Tokenizing {
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub template: Option<Arc<ChatTemplate>>,
    /// The vocabulary for structured output, or why this model has none.
    pub grammars: Result<Arc<Grammars>, String>,
    /// One permit per tokenization allowed to run at once.
    permits: Arc<Semaphore>,
    pub max_prompt_bytes: usize,
}

impl Tokenizing {
    pub fn new(
        tokenizer: Option<Arc<Tokenizer>>,
        template: Option<ChatTemplate>,
        threads: usize,
        max_prompt_bytes: usize,
    ) -> Self {
        Tokenizing {
            tokenizer,
            template: template.map(Arc::new),
            grammars: Err("the model has no tokenizer".into()),
            permits: Arc::new(Semaphore::new(threads.max(1))),
            max_prompt_bytes,
        }
    }

    /// Refuses `bytes` of prompt in `field` if over the limit.
    pub fn check_size(&self, field: &'static str, bytes: usize) -> Result<(), TokenizeError> {
        if bytes > self.max_prompt_bytes {
            return Err(TokenizeError::TooLarge { field, bytes, limit: self.max_prompt_bytes });
        }
        Ok(())
    }

    /// Token ids of each text (with the tokenizer's special tokens when `special`); the texts
    /// together must be within the size limit.
    pub async fn encode(&self, texts: Vec<String>, special: bool) -> Result<Vec<Vec<u32>>, TokenizeError> {
        self.check_size("prompt", texts.iter().map(String::len).sum())?;
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let tk = self.tokenizer.clone().ok_or(TokenizeError::NoTokenizer)?;
        self.off_runtime(move || {
            texts
                .iter()
                .map(|t| if special { tk.encode(t) } else { tk.encode_raw(t) })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TokenizeError::Failed { field: "prompt", message: e.to_string() })
        })
        .await
    }

    /// The fill-in-the-middle format of the model's tokenizer, if it has one.
    pub fn fim(&self) -> Option<Fim> {
        self.tokenizer.as_ref()?.fim()
    }

    /// Sets the vocabulary structured output compiles grammars against.
    pub fn with_grammars(mut self, grammars: Result<Grammars, String>) -> Self {
        self.grammars = grammars.map(Arc::new);
        self
    }

    /// Token ids of a chat, rendered through the checkpoint's template (with the generation
    /// prompt, the tools and reasoning effort of `options`); the messages' text and the tools
    /// must be within the size limit.
    pub async fn chat(&self, messages: Vec<ChatMessage>, options: RenderOptions) -> Result<Vec<u32>, TokenizeError> {
        let tool_bytes = options.tools.as_ref().map_or(0, |t| t.to_string().len());
        self.check_size("messages", messages.iter().map(message_bytes).sum::<usize>() + tool_bytes)?;
        let template = self.template.clone().ok_or(TokenizeError::NoTemplate)?;
        let tk = self.tokenizer.clone().ok_or(TokenizeError::NoTokenizer)?;
        self.off_runtime(move || {
            let failed =
                |e: switchyard_model::ModelError| TokenizeError::Failed { field: "messages", message: e.to_string() };
            let text = template.render_with(&messages, true, &options).map_err(failed)?;
            tk.encode_raw(&text).map_err(failed)
        })
        .await
    }

    /// Text of token ids (for `/detokenize`), off the runtime too.
    pub async fn decode(&self, ids: Vec<u32>) -> Result<String, TokenizeError> {
        let tk = self.tokenizer.clone().ok_or(TokenizeError::NoTokenizer)?;
        self.off_runtime(move || {
            tk.decode(&ids).map_err(|e| TokenizeError::Failed { field: "tokens", message: e.to_string() })
        })
        .await
    }

    /// `grammar` (sent in `field`) compiled against the vocabulary, on the same bounded
    /// threads as tokenizing: a large JSON schema or Lark grammar costs milliseconds to
    /// compile, and its text counts against the prompt size limit.
    pub async fn compile(&self, grammar: Grammar, field: &'static str) -> Result<Constraint, TokenizeError> {
        self.check_size(field, grammar.source_bytes())?;
        let grammars = self.grammars.clone().map_err(|why| TokenizeError::Failed {
            field,
            message: format!("structured output is unavailable for this model: {why}"),
        })?;
        self.off_runtime(move || {
            grammars.compile(&grammar).map_err(|e| TokenizeError::Failed { field, message: format!("`{field}`: {e}") })
        })
        .await
    }

    /// Runs `job` on a blocking thread once a permit is free. If the caller goes away the job
    /// still finishes (it cannot be interrupted) and holds its permit until then.
    async fn off_runtime<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, TokenizeError> + Send + 'static,
    ) -> Result<T, TokenizeError> {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let started = Instant::now();
            let out = job();
            metrics::histogram!(crate::metric_names::TOKENIZE_TIME).record(started.elapsed().as_secs_f64());
            out
        });
        handle
            .await
            .map_err(|e| TokenizeError::Failed { field: "prompt", message: format!("tokenizing failed: {e}") })?
    }
}

/// Bytes of text in a chat message (its strings, however nested): what rendering and
/// tokenizing it costs.
fn message_bytes(m: &ChatMessage) -> usize {
    fn text(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(text).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.len() + text(v)).sum(),
            _ => 8,
        }
    }
    m.role.len() + text(&m.content) + m.extra.iter().map(|(k, v)| k.len() + text(v)).sum::<usize>()
}
