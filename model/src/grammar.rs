//! Structured output: the tokens a sequence may generate next under a grammar — a JSON
//! schema, any JSON object, a regular expression, a choice of strings or a Lark grammar —
//! computed by llguidance from the tokenizer's vocabulary.
//!
//! [`Grammars`] is built once per tokenizer (the token trie); [`Grammars::compile`] turns a
//! request's [`Grammar`] into a [`Constraint`], which a [`Sequence`](crate::Sequence) carries.
//! The engine asks a constraint for its next mask while the forward pass that produces the
//! logits runs ([`Constraint::prepare`], on the engine's mask threads), applies it to the
//! logits before sampling and commits each picked token. A constraint whose grammar is
//! complete ends its sequence; one that can no longer continue fails it with the reason.
//!
//! What one mask may cost is bounded by llguidance's default limits (lexer fuel and Earley
//! items per token, grammar size), so a hostile grammar fails its own request with an error
//! rather than stalling the batch; and the grammar's text counts against the prompt size
//! limit.

use std::sync::Arc;

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

/// What a request's output must follow.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON value valid under this JSON schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (which may embed `%json { schema }`).
    Lark(String),
}

/// An llguidance error as a client sees it: its first line, at most 300 bytes (its verbose
/// errors go on with the parser's state, and a caught panic with a backtrace).
fn short(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// `schema` laid out compactly where it does not say otherwise (in its `x-guidance`): no
/// whitespace between tokens (`,` and `:` alone), so a model cannot pad its answer with
/// whitespace forever.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance")
            .or_insert_with(|| json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}));
    }
    schema
}

impl Grammar {
    /// The size of the grammar as sent: what compiling it costs grows with it.
    pub fn source_bytes(&self) -> usize {
        match self {
            Grammar::JsonSchema(schema) => schema.to_string().len(),
            Grammar::JsonObject => 0,
            Grammar::Regex(text) | Grammar::Lark(text) => text.len(),
            Grammar::Choice(options) => options.iter().map(String::len).sum(),
        }
    }

    /// The grammar as the body of one Lark rule, to embed in a larger grammar; `None` for a
    /// Lark grammar (it has its own `start`).
    pub fn lark_body(&self) -> Option<String> {
        Some(match self {
            Grammar::JsonSchema(schema) => format!("%json {}", compact(schema.clone())),
            Grammar::JsonObject => format!("%json {}", compact(json!({"type": "object"}))),
            Grammar::Regex(rx) => format!("/{}/", llguidance::regex_to_lark(rx, "")),
            Grammar::Choice(options) => {
                let quoted: Vec<String> =
                    options.iter().map(|o| serde_json::to_string(o).expect("strings serialize")).collect();
                quoted.join(" | ")
            }
            Grammar::Lark(_) => return None,
        })
    }

    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Choice(_) => TopLevelGrammar::from_grammar(GrammarWithLexer::from_lark(format!(
                "start: {}",
                self.lark_body().expect("a choice has a body")
            ))),
            Grammar::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
        }
    }
}

/// The vocabulary as llguidance sees it, and its grammar compiler; shared by every request.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

impl Grammars {
    /// From the text of a Hugging Face `tokenizer.json` (byte-level or byte-fallback
    /// vocabularies), for a model of `vocab_size` logits whose end-of-sequence tokens are
    /// `eos`. Ids the tokenizer does not name (padding rows of the embedding) are never allowed.
    pub fn from_tokenizer_json(tokenizer_json: &str, vocab_size: usize, eos: &[u32]) -> Result<Self, String> {
        let parsed: Value = serde_json::from_str(tokenizer_json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&parsed)
            .map_err(|e| format!("structured output cannot read this tokenizer's vocabulary: {e}"))?;
        words.resize(words.len().max(vocab_size), Vec::new());
        let first_eos = *eos.first().ok_or("structured output needs an end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, first_eos), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("structured output: {e}"))?;
        factory.quiet();
        Ok(Grammars { factory: Arc::new(factory) })
    }

    /// The constraint for one sequence; a grammar llguidance refuses (a schema feature it does
    /// not implement, an invalid regular expression, a Lark syntax error) is refused with its
    /// words.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(grammar.to_llguidance()).map_err(short)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(short(e));
        }
        Ok(Constraint { matcher, next: None })
    }
}

/// One sequence's grammar state: what it has generated so far, and the mask of the tokens
/// it may generate next once [`Constraint::prepare`] computed it.
pub struct Constraint {
    matcher: Matcher,
    next: Option<Result<SimpleVob, String>>,
}

impl Clone for Constraint {
    /// A constraint in the same state, independent from here on (each choice of a request
    /// follows the grammar on its own).
    fn clone(&self) -> Self {
        Constraint { matcher: self.matcher.deep_clone(), next: self.next.clone() }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// Computes the mask of the next token, if not yet computed (the slow part: tens of
    /// microseconds to milliseconds, which the engine overlaps with the forward pass).
    pub fn prepare(&mut self) {
        if self.next.is_none() {
            self.next = Some(self.matcher.compute_mask().map_err(short));
        }
    }

    /// Sets every logit the grammar does not allow next to minus infinity. Fails when the
    /// grammar cannot continue, or when no token it allows is left possible by the logits
    /// (other controls may have banned them all).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = match self.next.as_ref().expect("prepared") {
            Ok(mask) => mask,
            Err(e) => return Err(format!("the output cannot continue under its grammar: {e}")),
        };
        // A word of the mask at a time: whole words allowed or banned are the common case.
        let mut any = false;
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (b, logit) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *logit = f32::NEG_INFINITY;
                } else if *logit > f32::NEG_INFINITY {
                    any = true;
                }
            }
        }
        if !any {
            return Err("no token the grammar allows next is possible: other controls (bad_words, logit_bias, \
                 min_tokens, stop_token_ids) ban every one"
                .into());
        }
        Ok(())
    }

    /// Advances past the picked token.
    pub fn commit(&mut self, id: u32) -> Result<(), String> {
        self.next = None;
        self.matcher
            .consume_token(id)
            .map_err(|e| format!("the output cannot continue under its grammar: {}", short(e)))
    }

    /// Whether the grammar is complete and allows nothing more: the sequence ends here.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 bytes as tokens (in GPT-2's printable mapping), a few
    /// merged words, and an end-of-sequence token.
    fn tokenizer_json() -> (String, u32) {
        let mut map = Vec::new();
        let mut extra = 0x100u32;
        for b in 0..=255u8 {
            let c = b as char;
            let printable = matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}');
            map.push(if printable {
                c
            } else {
                extra += 1;
                char::from_u32(extra - 1).unwrap()
            });
        }
        let mut vocab = serde_json::Map::new();
        for (i, c) in map.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        for (i, w) in ["yes", "no", "{\"", "\":", "true", "false"].iter().enumerate() {
            vocab.insert(w.to_string(), json!(256 + i));
        }
        let eos = 262;
        let text = json!({
            "added_tokens": [{"id": eos, "content": "<|eos|>", "special": true}],
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": []},
        });
        (text.to_string(), eos)
    }

    fn grammars() -> (Grammars, usize, u32) {
        let (text, eos) = tokenizer_json();
        // The model has more logits than the tokenizer has tokens.
        (Grammars::from_tokenizer_json(&text, 300, &[eos]).unwrap(), 300, eos)
    }

    fn allowed(c: &mut Constraint, vocab: usize) -> Vec<u32> {
        let mut logits = vec![0.0; vocab];
        c.apply(&mut logits).unwrap();
        (0..vocab as u32).filter(|&i| logits[i as usize] == 0.0).collect()
    }

    #[test]
    fn a_choice_allows_only_its_strings_then_ends() {
        let (g, vocab, eos) = grammars();
        let mut c = g.compile(&Grammar::Choice(vec!["yes".into(), "no".into()])).unwrap();
        let first = allowed(&mut c, vocab);
        assert!(first.contains(&256) && first.contains(&257) && first.contains(&(b'y' as u32)));
        assert!(!first.contains(&(b'x' as u32)) && !first.contains(&eos) && first.iter().all(|&t| t < 262));
        c.commit(256).unwrap();
        assert!(c.is_complete() || allowed(&mut c, vocab) == vec![eos]);
    }

    #[test]
    fn a_json_schema_forces_its_shape_and_unknown_features_are_named() {
        let (g, vocab, _) = grammars();
        let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                            "additionalProperties": false});
        let mut c = g.compile(&Grammar::JsonSchema(schema)).unwrap();
        assert_eq!(allowed(&mut c, vocab), vec![b'{' as u32, 258], "only `{{` opens the object");
        for t in [258, b'o' as u32, b'k' as u32, 259] {
            c.commit(t).unwrap();
        }
        let next = allowed(&mut c, vocab);
        assert!(next.contains(&260) && next.contains(&261) && !next.contains(&(b' ' as u32)), "{next:?}");
        c.commit(260).unwrap();
        c.commit(b'}' as u32).unwrap();
        assert!(c.is_complete() || allowed(&mut c, vocab) == vec![262]);
        // A token outside the mask is refused when committed.
        let mut c = g.compile(&Grammar::JsonObject).unwrap();
        assert!(c.commit(b'x' as u32).is_err());

        let err = g.compile(&Grammar::JsonSchema(json!({"type": "string", "format": "no-such-format"})));
        assert!(err.is_err());
        let err = g.compile(&Grammar::Regex("a(".into())).unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn clones_follow_the_grammar_independently() {
        let (g, vocab, _) = grammars();
        let mut a = g.compile(&Grammar::Regex("ab|cd".into())).unwrap();
        let mut b = a.clone();
        a.commit(b'a' as u32).unwrap();
        b.commit(b'c' as u32).unwrap();
        assert_eq!(allowed(&mut a, vocab), vec![b'b' as u32]);
        assert_eq!(allowed(&mut b, vocab), vec![b'd' as u32]);
    }

    #[test]
    fn banning_every_allowed_token_is_an_error_not_garbage() {
        let (g, vocab, _) = grammars();
        let mut c = g.compile(&Grammar::Regex("x".into())).unwrap();
        let mut logits = vec![0.0; vocab];
        logits[b'x' as usize] = f32::NEG_INFINITY;
        assert!(c.apply(&mut logits).unwrap_err().contains("ban every one"));
    }
}
