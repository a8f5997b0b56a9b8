//! Checkpoint layouts load to the same model: sharded vs single file, transformers 4.x vs
//! 5.x `config.json`, bf16 vs f32 storage.

use std::path::{Path, PathBuf};

use anyhow::Result;
use switchyard_kernels::DType;
use switchyard_model::checkpoint::{Checkpoint, Tensor, write_safetensors};
use switchyard_model::{Chunk, Model, SeqCache};

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(arch)
}

fn logits(dir: &Path) -> Result<Vec<f32>> {
    let model = Model::load(dir)?;
    let tokens = [0u32, 17, 300, 42, 99, 7, 250, 18, 3];
    let mut cache = SeqCache::reserve(&model.kv_pool(1)?, tokens.len()).expect("a pool of its own");
    Ok(model.logits(&mut [Chunk { tokens: &tokens, cache: &mut cache }], None)?.remove(0))
}

/// Copies the non-weight files of a fixture and writes its tensors (converted by `map`) as
/// one `model.safetensors`.
fn rewrite(arch: &str, map: impl Fn(Tensor) -> Tensor) -> Result<tempfile::TempDir> {
    let src = fixture(arch);
    let tmp = tempfile::tempdir()?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f))?;
    }
    let ckpt = Checkpoint::open(&src)?;
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    let tensors: Vec<Tensor> = names.iter().map(|n| ckpt.get(n).map(&map)).collect::<Result<_, _>>()?;
    write_safetensors(&tmp.path().join("model.safetensors"), &tensors)?;
    Ok(tmp)
}

#[test]
fn sharded_and_single_file_agree() -> Result<()> {
    let sharded = fixture("qwen3_moe");
    assert!(sharded.join("model.safetensors.index.json").exists(), "the qwen3_moe fixture is the sharded one");
    let single = rewrite("qwen3_moe", |t| t)?;
    assert_eq!(logits(&sharded)?, logits(single.path())?);
    Ok(())
}

#[test]
fn f32_and_f16_storage_give_the_same_numbers() -> Result<()> {
    let want = logits(&fixture("mixtral"))?;
    for dtype in [DType::F32, DType::F16] {
        let dir =
            rewrite("mixtral", |t| Tensor::from_f32(t.name(), dtype, t.shape().to_vec(), &t.to_f32_vec().unwrap()))?;
        let got = logits(dir.path())?;
        // bf16 values are exact in f32; f16 rounds some of them, so allow a little.
        let tol = if dtype == DType::F32 { 1e-5 } else { 5e-2 };
        let diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < tol, "{dtype:?}: max logit difference {diff}");
    }
    Ok(())
}

#[test]
fn transformers_4x_config_layout_loads_the_same_model() -> Result<()> {
    for arch in ["gpt_oss", "qwen2_moe", "mixtral"] {
        let dir = rewrite(arch, |t| t)?;
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let obj = config.as_object_mut().unwrap();
        // 5.x → 4.x: `rope_parameters` splits into `rope_theta` + `rope_scaling`, `dtype` → `torch_dtype`.
        let mut rope = obj.remove("rope_parameters").unwrap();
        let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
        obj.insert("rope_theta".into(), theta);
        if rope["rope_type"] != "default" {
            let kind = rope.as_object_mut().unwrap().remove("rope_type").unwrap();
            rope.as_object_mut().unwrap().insert("type".into(), kind);
            obj.insert("rope_scaling".into(), rope);
        }
        let dtype = obj.remove("dtype").unwrap();
        obj.insert("torch_dtype".into(), dtype);
        std::fs::write(&path, serde_json::to_string(&config)?)?;
        assert_eq!(logits(&fixture(arch))?, logits(dir.path())?, "{arch}");
    }
    Ok(())
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    use switchyard_model::chat::{ChatMessage, ChatTemplate};
    use switchyard_model::tokenizer::Tokenizer;
    for arch in ["mixtral", "qwen3_moe"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(arch);
        let template = ChatTemplate::from_dir(&dir).unwrap().expect("the fixture has a chat template");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("chat_expected.json")).unwrap()).unwrap();
        for case in expected["cases"].as_array().unwrap() {
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
            let prompt = template.render(&messages, true).unwrap();
            assert_eq!(prompt, case["prompt"].as_str().unwrap(), "{arch}");
            let ids = tokenizer.encode_raw(&prompt).unwrap();
            assert_eq!(serde_json::json!(ids), case["prompt_ids"], "{arch}");
        }
    }
    // The Mistral-style template refuses out-of-order roles with its own message.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
    let template = ChatTemplate::from_dir(&dir).unwrap().unwrap();
    let bad: Vec<ChatMessage> =
        serde_json::from_value(serde_json::json!([{"role": "assistant", "content": "hi"}])).unwrap();
    let err = template.render(&bad, true).unwrap_err().to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}

/// Tools, tool calls (their arguments sent as OpenAI's clients send them: JSON text) and tool
/// results, through the Hermes-style template of the qwen3_moe fixture and the harmony template
/// of the gpt-oss one, render as transformers renders the same conversation with `tools=` and
/// the arguments as objects.
#[test]
fn tools_and_tool_calls_render_as_transformers_renders_them() {
    use switchyard_model::chat::{ChatMessage, ChatTemplate, RenderOptions};
    use switchyard_model::tokenizer::Tokenizer;
    for (arch, file) in [("qwen3_moe", "tools_expected.json"), ("gpt_oss_harmony", "harmony_expected.json")] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(arch);
        let template = ChatTemplate::from_dir(&dir).unwrap().expect("the fixture has a chat template");
        assert!(template.reads("tools"), "{arch}");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert!(cases.len() >= 3);
        for (i, case) in cases.iter().enumerate() {
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages_openai"].clone()).unwrap();
            let options = RenderOptions {
                tools: Some(case["tools"].clone()).filter(|t| !t.is_null()),
                reasoning_effort: case["reasoning_effort"].as_str().map(String::from),
            };
            let prompt = template.render_with(&messages, true, &options).unwrap();
            assert_eq!(prompt, case["text"].as_str().unwrap(), "{arch} case {i}");
            let ids = tokenizer.encode_raw(&prompt).unwrap();
            assert_eq!(serde_json::json!(ids), case["ids"], "{arch} case {i}");
        }
    }
}

#[test]
fn the_embedded_code_model_renders_a_chat_as_comments_above_code() {
    use switchyard_model::chat::{ChatMessage, ChatTemplate};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/switchyard-code-moe");
    let template = ChatTemplate::from_dir(&dir).unwrap().expect("the embedded model has a chat template");
    let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
        {"role": "system", "content": "Answer in Python."},
        {"role": "user", "content": "Sum a list.\nSkip None."},
        {"role": "assistant", "content": "def total(xs):\n    return sum(x for x in xs if x is not None)"},
        {"role": "user", "content": [{"type": "text", "text": "Now the "}, {"type": "text", "text": "mean."}]},
    ]))
    .unwrap();
    let prompt = template.render(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "# Answer in Python.\n# Sum a list.\n# Skip None.\ndef total(xs):\n    return sum(x for x in xs if x is not None)\n# Now the mean.\n"
    );
}

/// A NaN in the embedding row of a prompt token, or in `lm_head`, fails the forward pass
/// with the place named, and leaves the sequence's cache where it was: the same cache then
/// runs a clean prompt.
#[test]
fn non_finite_activations_fail_the_pass_and_leave_the_cache() -> Result<()> {
    use switchyard_model::{ModelError, NonFiniteAt};
    let poison = |name: &'static str, index: usize| {
        move |t: Tensor| {
            if t.name() != name {
                return t;
            }
            let mut v = t.to_f32_vec().unwrap();
            v[index] = f32::NAN;
            Tensor::from_f32(t.name(), t.dtype(), t.shape().to_vec(), &v)
        }
    };
    let hidden = 64;
    for (dir, want) in [
        (
            rewrite("mixtral", poison("model.embed_tokens.weight", 300 * hidden + 3))?,
            NonFiniteAt::Embedding { token_ids: vec![300] },
        ),
        (rewrite("mixtral", poison("lm_head.weight", 5 * hidden))?, NonFiniteAt::Logits),
    ] {
        let model = Model::load(dir.path())?;
        let mut cache = SeqCache::reserve(&model.kv_pool(1)?, 16).expect("a pool of its own");
        let tokens = [0u32, 300, 17, 300];
        match model.logits(&mut [Chunk { tokens: &tokens, cache: &mut cache }], None) {
            Err(ModelError::NonFinite { at }) => assert_eq!(at, want),
            other => panic!("expected a NonFinite error at {want}, got {other:?}"),
        }
        assert_eq!(cache.len(), 0, "a failed pass must not advance the cache");
        if want == NonFiniteAt::Logits {
            continue;
        }
        model.logits(&mut [Chunk { tokens: &[0, 17], cache: &mut cache }], None)?;
        assert_eq!(cache.len(), 2);
    }
    Ok(())
}
