//! `tokenizer.json` through the `tokenizers` crate, plus the special tokens of
//! `tokenizer_config.json` and `generation_config.json`.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds
    /// (transformers' `add_special_tokens=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` exactly as written: a rendered chat template already holds its
    /// special tokens (`add_special_tokens=False`).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Text of one token, special tokens included.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The ids that end generation: `generation_config.json`'s `eos_token_id` (an id or a list),
/// else `tokenizer_config.json`'s `eos_token`, else config.json's.
pub fn eos_token_ids(dir: &Path, tokenizer: Option<&Tokenizer>, config_eos: &[u32]) -> Result<Vec<u32>> {
    let gen_path = dir.join("generation_config.json");
    if let Some(v) = read_json(&gen_path)? {
        let ids: Vec<u32> = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
            _ => vec![],
        };
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    if let (Some(tok), Some(v)) = (tokenizer, read_json(&dir.join("tokenizer_config.json"))?) {
        let eos = match v.get("eos_token") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str),
            _ => None,
        };
        if let Some(id) = eos.and_then(|s| tok.token_id(s)) {
            return Ok(vec![id]);
        }
    }
    Ok(config_eos.to_vec())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::InvalidJson { file: path.to_path_buf(), message: e.to_string() })
}
