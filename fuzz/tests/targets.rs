//! The fuzz targets: every parser of input from outside, fed mutated copies of valid inputs.
//! Each may refuse an input with an error; none may panic. See the crate doc for longer runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message as _;
use switchyard_fuzz::{iterations, run};
use switchyard_kernels::{DType, Device};
use switchyard_model::chat::{ChatMessage, ChatTemplate};
use switchyard_model::checkpoint::write_safetensors;
use switchyard_model::{Checkpoint, ModelSpec, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn fixture_files(name: &str) -> Vec<Vec<u8>> {
    let mut found: Vec<PathBuf> =
        std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path().join(name)).filter(|p| p.exists()).collect();
    found.sort();
    found.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn safetensors_headers() {
    // Small files, so that most mutations land in the header: every dtype the loader reads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 2.0).collect();
    let mut corpus = Vec::new();
    let packed: Vec<u8> = (0..24u8).map(|i| i.wrapping_mul(37)).collect();
    for dtypes in [[DType::F32, DType::BF16], [DType::F16, DType::BF16], [DType::BF16, DType::F32]] {
        let tensors = vec![
            Tensor::from_f32("model.embed_tokens.weight", dtypes[0], vec![4, 6], &values),
            Tensor::from_f32("model.norm.weight", dtypes[1], vec![24], &values),
            Tensor::from_bytes("model.layers.0.mlp.experts.gate_up_proj_scales", DType::U8, vec![2, 12], &packed),
            Tensor::from_bytes("model.layers.0.self_attn.q_proj.weight", DType::F8E4M3, vec![4, 6], &packed),
        ];
        write_safetensors(&path, &tensors).unwrap();
        corpus.push(std::fs::read(&path).unwrap());
    }
    run("safetensors", &corpus, iterations(10000), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let Ok(ckpt) = Checkpoint::open(dir.path()) else { return false };
        let names: Vec<String> = ckpt.names().map(str::to_string).collect();
        for name in names {
            if let Ok(t) = ckpt.get(&name) {
                let _ = t.to_f32_vec();
                let _ = t.raw_bytes().len();
            }
        }
        true
    });
}

#[test]
fn config_json() {
    run("config", &fixture_files("config.json"), iterations(20000), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else { return false };
        let parsed = serde_json::from_str::<serde_json::Value>(text).is_ok();
        let _ = ModelSpec::from_json(text);
        parsed
    });
}

fn conversations() -> Vec<Vec<u8>> {
    [
        r#"[{"role": "user", "content": "def f(x):"}]"#,
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]"#,
        r#"[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]"#,
        r#"[{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn chat_conversations() {
    // What a client sends goes through the checkpoint's template: any conversation either
    // renders or is an error.
    let templates: Vec<ChatTemplate> = fixture_files("chat_template.jinja")
        .into_iter()
        .map(|t| ChatTemplate::new(String::from_utf8(t).unwrap(), "<s>".into(), "</s>".into()).unwrap())
        .collect();
    assert!(!templates.is_empty());
    run("chat", &conversations(), iterations(20000), |bytes| {
        let Ok(messages) = serde_json::from_slice::<Vec<ChatMessage>>(bytes) else { return false };
        for template in &templates {
            let _ = template.render(&messages, true);
        }
        true
    });
}

#[test]
fn chat_template_sources() {
    // A checkpoint's own template and tokenizer config: parsed (not rendered: a template may
    // legitimately loop as long as its author likes).
    let mut corpus = fixture_files("chat_template.jinja");
    corpus.extend(fixture_files("tokenizer_config.json"));
    run("chat-template", &corpus, iterations(10000), |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else { return false };
        let parsed = ChatTemplate::new(text.to_string(), String::new(), String::new()).is_ok();
        if let Ok(config) = serde_json::from_str::<serde_json::Value>(text)
            && let Some(source) = config.get("chat_template").and_then(|t| t.as_str())
        {
            let _ = ChatTemplate::new(source.to_string(), String::new(), String::new());
        }
        parsed
    });
}

#[test]
fn dispatch_requests() {
    // An expert node holding every expert of the Mixtral fixture answers mutated dispatches.
    use switchyard_expert_node::store::{Catalog, ExpertStore};
    use switchyard_proto::v1::DispatchRequest;
    let model = fixtures().join("mixtral");
    let catalog = Arc::new(Catalog::open(&model, None).unwrap());
    let spec = catalog.spec().clone();
    let all: BTreeSet<(u32, u32)> =
        spec.moe_layers().flat_map(|l| (0..spec.num_experts as u32).map(move |e| (l as u32, e))).collect();
    let (mut store, _held) = ExpertStore::new(catalog.clone(), Device::Cpu).unwrap();
    store.install(&all, catalog.read(&all).unwrap()).unwrap();
    let hidden = spec.hidden_size;
    let corpus: Vec<Vec<u8>> = [1usize, 3]
        .iter()
        .map(|&rows| {
            let x: Vec<f32> = (0..rows * hidden).map(|i| (i % 7) as f32 * 0.1).collect();
            let request = DispatchRequest {
                id: 1,
                epoch: 1,
                layer: 0,
                activations: Some(switchyard_proto::tensor::from_f32(&x, hidden)),
                tokens: (0..rows as u32).flat_map(|t| [t, t]).collect(),
                experts: (0..rows as u32).flat_map(|t| [t % 8, (t + 1) % 8]).collect(),
                weights: vec![0.5; 2 * rows],
                ..Default::default()
            };
            request.encode_to_vec()
        })
        .collect();
    run("dispatch", &corpus, iterations(20000), |bytes| {
        let Ok(request) = DispatchRequest::decode(bytes) else { return false };
        let _ = store.dispatch(&request);
        true
    });
}

#[test]
fn raft_messages() {
    use raft::prelude::{Entry, Message, MessageType};
    use switchyard_coordinator::peer::{decode_message, encode_message};
    let mut corpus = Vec::new();
    for (kind, entries) in
        [(MessageType::MsgHeartbeat, 0), (MessageType::MsgAppend, 3), (MessageType::MsgRequestVote, 0)]
    {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.to = 2;
        m.from = 1;
        m.term = 7;
        m.log_term = 6;
        m.index = 41;
        m.commit = 40;
        let entries: Vec<Entry> = (0..entries)
            .map(|i| Entry {
                term: 7,
                index: 42 + i,
                data: format!(r#"{{"Drain":{{"node":{i}}}}}"#).into_bytes().into(),
                ..Default::default()
            })
            .collect();
        m.set_entries(entries.into());
        corpus.push(encode_message(&m));
    }
    run("raft", &corpus, iterations(20000), |bytes| decode_message(bytes).is_ok());
}

#[test]
fn openai_request_bodies() {
    use switchyard_router::http::openai::{ChatRequest, CompletionRequest};
    let corpus: Vec<Vec<u8>> = [
        r#"{"model": "m", "prompt": "def f(x):", "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "logprobs": 2, "n": 2, "seed": 3}"#,
        r#"{"model": "m", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}"#,
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "logprobs": true, "top_logprobs": 3}"#,
        r#"{"model": "m", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "y"}]}], "stop": "z"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run("openai", &corpus, iterations(20000), |bytes| {
        let completion = serde_json::from_slice::<CompletionRequest>(bytes).is_ok();
        let chat = serde_json::from_slice::<ChatRequest>(bytes).is_ok();
        completion || chat
    });
}

/// Structured output: JSON schemas, regular expressions, choices and Lark grammars as clients
/// send them, compiled against a real vocabulary and followed for a few tokens. A grammar may
/// be refused; none may panic or hang the engine.
#[test]
fn structured_output_grammars() {
    use switchyard_model::grammar::{Grammar, Grammars};
    let dir = fixtures().join("qwen3_moe");
    let tokenizer = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    let grammars = Grammars::from_tokenizer_json(&tokenizer, 512, &[1]).unwrap();
    let corpus: Vec<Vec<u8>> = [
        r#"j{"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"enum": [1, "x", null]}}, "required": ["a"], "additionalProperties": false}"#,
        r#"j{"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 500}, "minItems": 1, "maxItems": 3}"#,
        r##"j{"anyOf": [{"type": "number"}, {"type": "string", "pattern": "^[a-z]+$"}], "$defs": {"x": {"$ref": "#/$defs/x"}}}"##,
        r"r[A-Z]{2,3}-[0-9]{1,4}(\.[a-f]+)?",
        r#"c["yes", "no", "maybe not"]"#,
        r#"lstart: "a" b+ | %json {"type": "boolean"}
b: /[0-9]{1,3}/"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run("grammar", &corpus, iterations(1500), |bytes| {
        let Some((&kind, rest)) = bytes.split_first() else { return false };
        let Ok(text) = std::str::from_utf8(rest) else { return false };
        let grammar = match kind {
            b'j' => match serde_json::from_str(text) {
                Ok(schema) => Grammar::JsonSchema(schema),
                Err(_) => return false,
            },
            b'r' => Grammar::Regex(text.into()),
            b'c' => match serde_json::from_str(text) {
                Ok(options) => Grammar::Choice(options),
                Err(_) => return false,
            },
            b'l' => Grammar::Lark(text.into()),
            _ => return false,
        };
        let Ok(mut constraint) = grammars.compile(&grammar) else { return false };
        for step in 0..8u32 {
            let mut logits: Vec<f32> = (0..512).map(|i| ((i * 37 + step * 11) % 97) as f32).collect();
            if constraint.apply(&mut logits).is_err() {
                break;
            }
            let best = (0..512).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
            if constraint.commit(best as u32).is_err() || constraint.is_complete() {
                break;
            }
        }
        true
    });
}
