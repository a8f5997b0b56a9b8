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

    /// The fill-in-the-middle format of the first family whose three tokens this tokenizer
    /// has, if any.
    pub fn fim(&self) -> Option<Fim> {
        FIM_FAMILIES.iter().copied().find(|f| [f.prefix, f.suffix, f.middle].iter().all(|t| self.token_id(t).is_some()))
    }
}

/// A fill-in-the-middle prompt format: the three special tokens of a model family and the
/// order its models were trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fim {
    pub prefix: &'static str,
    pub suffix: &'static str,
    pub middle: &'static str,
    /// Suffix before prefix (SPM), as Codestral was trained; else prefix, suffix, middle (PSM).
    pub suffix_first: bool,
}

/// The families Switchyard knows, by their tokens:
/// - `<|fim_prefix|>` (Qwen2.5-Coder, Qwen3-Coder, the embedded code model),
/// - `<fim_prefix>` (StarCoder, StarCoder2, SantaCoder),
/// - `<｜fim▁begin｜>` (DeepSeek-Coder: begin, hole where the middle goes, end),
/// - `[PREFIX]` (Codestral: suffix first, then prefix; the model writes the middle next).
pub const FIM_FAMILIES: [Fim; 4] = [
    Fim { prefix: "<|fim_prefix|>", suffix: "<|fim_suffix|>", middle: "<|fim_middle|>", suffix_first: false },
    Fim { prefix: "<fim_prefix>", suffix: "<fim_suffix>", middle: "<fim_middle>", suffix_first: false },
    Fim {
        prefix: "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
        suffix: "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
        middle: "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
        suffix_first: false,
    },
    Fim { prefix: "[PREFIX]", suffix: "[SUFFIX]", middle: "[MIDDLE]", suffix_first: true },
];

impl Fim {
    /// The prompt that asks for the text between `prefix` and `suffix`; tokenized with the
    /// tokenizer's own special tokens (BOS where it adds one).
    pub fn prompt(&self, prefix: &str, suffix: &str) -> String {
        if self.suffix_first {
            format!("{}{suffix}{}{prefix}", self.suffix, self.prefix)
        } else {
            format!("{}{prefix}{}{suffix}{}", self.prefix, self.suffix, self.middle)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(dir: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir)
    }

    #[test]
    fn fim_prompts_follow_each_family_s_order() {
        let [qwen, starcoder, deepseek, codestral] = FIM_FAMILIES;
        assert_eq!(qwen.prompt("a(", ")\n"), "<|fim_prefix|>a(<|fim_suffix|>)\n<|fim_middle|>");
        assert_eq!(starcoder.prompt("a(", ")"), "<fim_prefix>a(<fim_suffix>)<fim_middle>");
        assert_eq!(
            deepseek.prompt("a(", ")"),
            "<\u{ff5c}fim\u{2581}begin\u{ff5c}>a(<\u{ff5c}fim\u{2581}hole\u{ff5c}>)<\u{ff5c}fim\u{2581}end\u{ff5c}>"
        );
        assert_eq!(codestral.prompt("a(", ")"), "[SUFFIX])[PREFIX]a(");
    }

    #[test]
    fn the_embedded_code_model_has_fim_tokens_and_the_fixtures_do_not() {
        let code = Tokenizer::from_dir(&repo("models/switchyard-code-moe")).unwrap();
        let fim = code.fim().expect("the embedded model was trained with FIM tokens");
        assert_eq!(fim, FIM_FAMILIES[0]);
        // The FIM tokens are single special tokens, after the BOS the tokenizer adds.
        let ids = code.encode(&fim.prompt("x = ", "\n")).unwrap();
        let special: Vec<u32> =
            [fim.prefix, fim.suffix, fim.middle].iter().map(|t| code.token_id(t).unwrap()).collect();
        assert_eq!(ids.iter().filter(|id| special.contains(id)).count(), 3);
        assert_eq!(ids[1], special[0]);
        assert_eq!(*ids.last().unwrap(), special[2]);
        let fixture = Tokenizer::from_dir(&repo("tests/fixtures/qwen3_moe")).unwrap();
        assert_eq!(fixture.fim(), None);
    }
}
