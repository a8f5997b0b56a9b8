//! `switchyard generate` end to end: the real binary on the committed transformers fixtures,
//! and its one-line errors for bad input.

mod common;

use anyhow::Result;
use common::{expected, fixture, fixtures, stdout_of, switchyard};
use serde_json::Value;

fn generate_json(args: &[&str]) -> Value {
    let out = switchyard(args);
    assert!(out.status.success(), "switchyard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn stderr_of_failure(args: &[&str]) -> String {
    let out = switchyard(args);
    assert!(!out.status.success(), "switchyard {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "error should be one line: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
    err
}

/// `generate` with `extra` arguments reproduces transformers' greedy tokens and
/// log-probabilities on the first case of every fixture.
fn reproduces_transformers(extra: &[&str]) {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"] {
        let exp = expected(arch);
        let case = &exp["cases"][0];
        let dir = fixtures().join(arch);
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--max-tokens",
            "20",
            "--logprobs",
            "3",
            "--json",
        ];
        args.extend_from_slice(extra);
        let got = generate_json(&args);
        assert_eq!(got["prompt_ids"], case["prompt_ids"], "{arch}");
        let tokens = got["tokens"].as_array().unwrap();
        let ids: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
        let want: Vec<u64> = case["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids, want, "{arch} {extra:?}: tokens");
        for (t, lp) in tokens.iter().zip(case["logprobs"].as_array().unwrap()) {
            assert!((t["logprob"].as_f64().unwrap() - lp.as_f64().unwrap()).abs() < 1e-3, "{arch}: logprob");
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3);
            assert!(t["text"].is_string());
        }
        assert_eq!(got["finish_reason"], case["finish_reason"], "{arch}");
        assert!(got["text"].is_string());
    }
}

#[test]
fn json_output_reproduces_transformers_for_every_architecture() {
    reproduces_transformers(&[]);
}

/// On a GPU, `--device cuda:0` reproduces transformers as the CPU does.
#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn device_cuda_reproduces_transformers() {
    reproduces_transformers(&["--device", "cuda:0"]);
}

/// Without a GPU (none visible here, whatever the machine has), or in a build without the
/// CUDA backend, `--device cuda:0` refuses in one line that says what is missing.
#[test]
fn device_cuda_without_a_gpu_says_what_is_missing() {
    let dir = fixtures().join("mixtral");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1,2", "--device", "cuda:0"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert!(!out.status.success(), "no GPU is visible, yet --device cuda:0 succeeded");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "error should be one line: {err}");
    assert!(
        err.contains("no CUDA on this machine") || err.contains("this build has no CUDA backend"),
        "a failing --device cuda:0 must say CUDA is missing, not: {err}"
    );
}

#[test]
fn unknown_device_is_named() {
    let dir = fixtures().join("mixtral");
    let err =
        stderr_of_failure(&["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", "1", "--device", "tpu:0"]);
    assert!(err.contains("unknown device `tpu:0`"), "{err}");
}

#[test]
fn prompt_ids_give_the_same_tokens_as_text() {
    let dir = fixtures().join("olmoe");
    let exp = expected("olmoe");
    let ids: Vec<String> = exp["cases"][1]["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    let by_ids =
        generate_json(&["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", &ids.join(","), "--json"]);
    let by_text = generate_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        exp["cases"][1]["prompt"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(by_ids["tokens"], by_text["tokens"]);
}

#[test]
fn same_seed_same_sample() {
    let dir = fixtures().join("mixtral");
    let run = |seed: &str| {
        generate_json(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "def f(x):",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--max-tokens",
            "24",
            "--ignore-eos",
            "--json",
        ])["tokens"]
            .clone()
    };
    assert_eq!(run("42"), run("42"));
    assert_ne!(run("42"), run("43"), "different seeds should (almost surely) sample differently");
}

/// Copies a fixture so a test can break it.
fn copy_fixture(arch: &str) -> Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for entry in std::fs::read_dir(fixtures().join(arch))? {
        let entry = entry?;
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name()))?;
    }
    Ok(tmp)
}

#[test]
fn bad_input_gets_one_line_errors() -> Result<()> {
    let err = stderr_of_failure(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(err.contains("/nonexistent/model") && err.contains("does not exist"), "{err}");

    let tmp = copy_fixture("mixtral")?;
    let model = tmp.path().to_str().unwrap();
    let config = std::fs::read_to_string(tmp.path().join("config.json"))?;
    std::fs::write(tmp.path().join("config.json"), config.replace("\"mixtral\"", "\"llama\""))?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("unsupported model_type `llama`"), "{err}");

    std::fs::write(tmp.path().join("config.json"), &config)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt-ids", "1,9999"]);
    assert!(err.contains("9999") && err.contains("vocabulary"), "{err}");

    let long: Vec<String> = (0..300).map(|i| (i % 500 + 3).to_string()).collect();
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt-ids", &long.join(",")]);
    assert!(err.contains("300 tokens") && err.contains("256"), "{err}");

    // A truncated safetensors file.
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st)?;
    std::fs::write(&st, &bytes[..bytes.len() / 2])?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("model.safetensors"), "{err}");
    Ok(())
}

#[test]
fn missing_or_misshapen_tensors_are_named() -> Result<()> {
    use switchyard_model::checkpoint::{Checkpoint, Tensor, write_safetensors};
    let tmp = copy_fixture("gpt_oss")?;
    let ckpt = Checkpoint::open(tmp.path())?;
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    let all: Vec<Tensor> = names.iter().map(|n| ckpt.get(n)).collect::<Result<_, _>>()?;
    drop(ckpt);
    let model = tmp.path().to_str().unwrap();

    let victim = "model.layers.1.self_attn.sinks";
    let without: Vec<Tensor> = all.iter().filter(|t| t.name() != victim).cloned().collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &without)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains(victim) && err.contains("missing"), "{err}");

    let reshaped: Vec<Tensor> = all
        .iter()
        .map(|t| {
            if t.name() == "model.layers.0.self_attn.q_proj.weight" {
                Tensor::from_f32(t.name(), t.dtype(), vec![32, 128], &t.to_f32_vec().unwrap())
            } else {
                t.clone()
            }
        })
        .collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &reshaped)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("[32, 128]") && err.contains("[64, 64]"),
        "{err}"
    );
    Ok(())
}

#[test]
fn quantized_checkpoints_reproduce_transformers() {
    for arch in ["gpt_oss_mxfp4", "qwen3_moe_fp8"] {
        let exp = expected(arch);
        for (c, case) in exp["cases"].as_array().unwrap().iter().enumerate() {
            let out = stdout_of(&[
                "generate",
                "--model",
                &fixture(arch),
                "--prompt",
                case["prompt"].as_str().unwrap(),
                "--max-tokens",
                "20",
                "--json",
            ]);
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            let ids: Vec<u64> = got["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
            let want: Vec<u64> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            assert_eq!(ids, want, "{arch} case {c}");
            for (t, lp) in got["tokens"].as_array().unwrap().iter().zip(case["logprobs"].as_array().unwrap()) {
                let diff = (t["logprob"].as_f64().unwrap() - lp.as_f64().unwrap()).abs();
                assert!(diff < 1e-3, "{arch} case {c}: logprob off by {diff}");
            }
        }
    }
}

/// Replaces `from` by `to` in `dir`'s config.json.
fn replace_in_config(dir: &std::path::Path, from: &str, to: &str) -> Result<()> {
    let path = dir.join("config.json");
    let config = std::fs::read_to_string(&path)?;
    assert!(config.contains(from), "config.json has no {from}");
    std::fs::write(&path, config.replace(from, to))?;
    Ok(())
}

#[test]
fn bad_quantized_checkpoints_get_one_line_errors() -> Result<()> {
    use switchyard_model::checkpoint::{Checkpoint, Tensor, write_safetensors};

    // A quantization method Switchyard does not read.
    let tmp = copy_fixture("qwen3_moe_fp8")?;
    let model = tmp.path().to_str().unwrap();
    replace_in_config(tmp.path(), "\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\"")?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(
        err.contains("quantization method `gptq` is not supported") && err.contains("mxfp4") && err.contains("fp8"),
        "{err}"
    );
    replace_in_config(tmp.path(), "\"quant_method\": \"gptq\"", "\"quant_method\": \"fp8\"")?;

    // A scale tensor of the wrong shape: named, with both shapes and the format.
    let ckpt = Checkpoint::open(tmp.path())?;
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    let all: Vec<Tensor> = names.iter().map(|n| ckpt.get(n)).collect::<Result<_, _>>()?;
    drop(ckpt);
    let victim = "model.layers.0.self_attn.q_proj.weight_scale_inv";
    let reshaped: Vec<Tensor> = all
        .iter()
        .map(|t| if t.name() == victim { Tensor::from_f32(victim, t.dtype(), vec![9], &[1.0; 9]) } else { t.clone() })
        .collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &reshaped)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(
        err.contains(victim) && err.contains("[9]") && err.contains("[3, 3]") && err.contains("FP8 with 24x24 blocks"),
        "{err}"
    );

    // FP8 weights in a checkpoint whose config declares no quantization.
    write_safetensors(&tmp.path().join("model.safetensors"), &all)?;
    let plain: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json"))?)?;
    let mut plain = plain.as_object().unwrap().clone();
    plain.remove("quantization_config");
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&plain)?)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("is fp8-quantized but config.json declares no quantization_config"), "{err}");

    // MXFP4 rows must be whole 32-value blocks.
    let tmp = copy_fixture("gpt_oss_mxfp4")?;
    let model = tmp.path().to_str().unwrap();
    replace_in_config(tmp.path(), "\"intermediate_size\": 96", "\"intermediate_size\": 80")?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("MXFP4 rows of 80 values") && err.contains("down_proj_blocks"), "{err}");
    Ok(())
}

/// Positive temperatures too small to divide logits by (1e-40 overflows every logit to an
/// infinity) pick exactly what temperature 0 picks, with the same log-probabilities.
#[test]
fn tiny_temperatures_are_greedy() {
    let dir = fixtures().join("mixtral");
    for logprobs in ["0", "2"] {
        let run = |temperature: &str| {
            generate_json(&[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "def f(x):",
                "--temperature",
                temperature,
                "--seed",
                "7",
                "--logprobs",
                logprobs,
                "--max-tokens",
                "12",
                "--ignore-eos",
                "--json",
            ])["tokens"]
                .clone()
        };
        let greedy = run("0");
        for t in ["1e-40", "1e-45", "1e-38"] {
            assert_eq!(run(t), greedy, "temperature {t} with --logprobs {logprobs}");
        }
    }
}

/// Every tensor of `arch`'s fixture, by name order, and a writable copy of the fixture.
fn fixture_tensors(arch: &str) -> Result<(tempfile::TempDir, Vec<switchyard_model::Tensor>)> {
    let tmp = copy_fixture(arch)?;
    let ckpt = switchyard_model::Checkpoint::open(tmp.path())?;
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    // Owned copies: the file they were read from is rewritten while they live.
    let all = names
        .iter()
        .map(|n| {
            let t = ckpt.get(n)?;
            Ok(switchyard_model::Tensor::from_f32(n, t.dtype(), t.shape().to_vec(), &t.to_f32_vec()?))
        })
        .collect::<Result<_>>()?;
    Ok((tmp, all))
}

/// Writes `all` as `dir`'s checkpoint, each tensor's values passed through `edit`.
fn write_edited(
    dir: &std::path::Path,
    all: &[switchyard_model::Tensor],
    edit: impl Fn(&str, &mut [f32]),
) -> Result<()> {
    let edited: Vec<switchyard_model::Tensor> = all
        .iter()
        .map(|t| {
            let mut v = t.to_f32_vec().unwrap();
            edit(t.name(), &mut v);
            switchyard_model::Tensor::from_f32(t.name(), t.dtype(), t.shape().to_vec(), &v)
        })
        .collect();
    switchyard_model::checkpoint::write_safetensors(&dir.join("model.safetensors"), &edited)?;
    Ok(())
}

/// NaNs in weights that are not scanned at load time stop generation with an error that
/// says where the activations broke, instead of exiting 0 with noise or an empty text.
#[test]
fn non_finite_activations_are_named() -> Result<()> {
    let (tmp, all) = fixture_tensors("mixtral")?;
    let model = tmp.path().to_str().unwrap();
    let run = || stderr_of_failure(&["generate", "--model", model, "--prompt-ids", "3,5,9", "--max-tokens", "4"]);

    // Row 5 of the embedding table: the token id is named.
    write_edited(tmp.path(), &all, |name, v| {
        if name == "model.embed_tokens.weight" {
            v[5 * 64 + 10] = f32::NAN;
        }
    })?;
    let err = run();
    assert!(err.contains("token id 5") && err.contains("model.embed_tokens.weight"), "{err}");

    // Layer 0's query projection: its attention.
    write_edited(tmp.path(), &all, |name, v| {
        if name == "model.layers.0.self_attn.q_proj.weight" {
            v.fill(f32::INFINITY);
        }
    })?;
    let err = run();
    assert!(err.contains("layer 0's attention output"), "{err}");

    // Every expert of layer 1: its MoE block.
    write_edited(tmp.path(), &all, |name, v| {
        if name.starts_with("model.layers.1.block_sparse_moe.experts.") && name.ends_with(".w2.weight") {
            v[0] = f32::NAN;
        }
    })?;
    let err = run();
    assert!(err.contains("layer 1's MoE output"), "{err}");

    // One row of lm_head: the logits.
    write_edited(tmp.path(), &all, |name, v| {
        if name == "lm_head.weight" {
            v[7 * 64] = f32::NAN;
        }
    })?;
    let err = run();
    assert!(err.contains("NaN or infinite values in the logits"), "{err}");
    Ok(())
}

/// Norms, gates and biases are small enough to scan as they load: a NaN or an infinity in one
/// is named before any generation.
#[test]
fn non_finite_small_tensors_are_named_at_load() -> Result<()> {
    for (arch, victim) in [
        ("mixtral", "model.layers.1.post_attention_layernorm.weight"),
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),
        ("mixtral", "model.norm.weight"),
        ("gpt_oss", "model.layers.1.self_attn.sinks"),
        ("gpt_oss", "model.layers.0.self_attn.k_proj.bias"),
        ("gpt_oss", "model.layers.1.mlp.router.bias"),
        ("gpt_oss", "model.layers.0.mlp.experts.down_proj_bias"),
        ("qwen3_moe", "model.layers.0.self_attn.q_norm.weight"),
    ] {
        let (tmp, all) = fixture_tensors(arch)?;
        // qwen3_moe is sharded: write one file and drop the index.
        let _ = std::fs::remove_file(tmp.path().join("model.safetensors.index.json"));
        write_edited(tmp.path(), &all, |name, v| {
            if name == victim {
                v[1] = f32::NEG_INFINITY;
            }
        })?;
        let err = stderr_of_failure(&["generate", "--model", tmp.path().to_str().unwrap(), "--prompt", "x"]);
        // A fused tensor of experts is named with the expert's index.
        assert!(
            err.contains(&format!("tensor `{victim}")) && err.contains("holds 1 NaN or infinite value(s)"),
            "{arch}: {err}"
        );
    }
    Ok(())
}

/// Out-of-range config values are refused at load, naming the field and the value.
#[test]
fn config_values_out_of_range_are_named() -> Result<()> {
    let tmp = copy_fixture("mixtral")?;
    let model = tmp.path().to_str().unwrap();
    let config: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json"))?)?;
    for (field, value, message) in [
        ("rms_norm_eps", serde_json::json!(-1), "config.json: `rms_norm_eps` must be a finite number > 0, got -1"),
        ("max_position_embeddings", serde_json::json!(0), "`max_position_embeddings` must be at least 1, got 0"),
        ("eos_token_id", serde_json::json!(99999), "`eos_token_id` must be below vocab_size (512), got 99999"),
        ("eos_token_id", serde_json::json!([1, 512]), "`eos_token_id` must be below vocab_size (512), got 512"),
        ("num_experts_per_tok", serde_json::json!(9), "`num_experts_per_tok` must be between 1 and the number"),
        ("head_dim", serde_json::json!(15), "`head_dim` must be even"),
        ("num_key_value_heads", serde_json::json!(3), "`num_key_value_heads` must divide num_attention_heads (4)"),
    ] {
        let mut c = config.clone();
        c.insert(field.to_string(), value);
        std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&c)?)?;
        let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
        assert!(err.contains(message), "{field}: {err}");
    }
    Ok(())
}

/// A safetensors file split into its header (JSON) and data section.
fn read_safetensors(path: &std::path::Path) -> Result<(serde_json::Map<String, Value>, Vec<u8>)> {
    let bytes = std::fs::read(path)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    Ok((serde_json::from_slice(&bytes[8..8 + n])?, bytes[8 + n..].to_vec()))
}

fn write_safetensors_raw(path: &std::path::Path, header: &serde_json::Map<String, Value>, data: &[u8]) -> Result<()> {
    let json = serde_json::to_vec(header)?;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes)?;
    Ok(())
}

/// A header whose entries disagree with the data is refused naming the file and the tensor
/// (after a gap: the tensor that follows it).
#[test]
fn corrupt_safetensors_headers_name_the_tensor() -> Result<()> {
    let tmp = copy_fixture("mixtral")?;
    let model = tmp.path().to_str().unwrap();
    let path = tmp.path().join("model.safetensors");
    let (header, data) = read_safetensors(&path)?;
    let offsets = |h: &serde_json::Map<String, Value>, name: &str| -> (u64, u64) {
        let o = &h[name]["data_offsets"];
        (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
    };
    let set = |h: &mut serde_json::Map<String, Value>, name: &str, key: &str, v: Value| {
        h.get_mut(name).unwrap().as_object_mut().unwrap().insert(key.to_string(), v);
    };
    let embed = "model.embed_tokens.weight"; // the second tensor in the data, after lm_head
    let expert = "model.layers.0.block_sparse_moe.experts.0.w1.weight"; // the third
    let check = |h: &serde_json::Map<String, Value>, d: &[u8], wants: &[&str]| -> Result<()> {
        write_safetensors_raw(&path, h, d)?;
        let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
        assert!(err.contains("model.safetensors"), "{err}");
        for w in wants {
            assert!(err.contains(w), "wanted {w:?} in: {err}");
        }
        Ok(())
    };

    // A dtype whose size disagrees with the offsets.
    let mut h = header.clone();
    set(&mut h, embed, "dtype", "F32".into());
    check(&h, &data, &[&format!("tensor `{embed}`"), "F32 of shape [512, 64] needs 131072 bytes", "hold 65536"])?;

    // A dtype the format does not define.
    let mut h = header.clone();
    set(&mut h, embed, "dtype", "Q7".into());
    check(&h, &data, &[&format!("tensor `{embed}`"), "unknown dtype `Q7`"])?;

    // Offsets past the end of the data.
    let mut h = header.clone();
    let end = data.len() as u64;
    set(&mut h, embed, "data_offsets", serde_json::json!([end, end + 65536]));
    check(&h, &data, &[&format!("tensor `{embed}`"), "do not lie in the data section"])?;

    // Four bytes of padding before the expert: the expert, after the gap, is named.
    let (begin, _) = offsets(&header, expert);
    let mut h = header.clone();
    for (_, info) in h.iter_mut().filter(|(k, _)| *k != "__metadata__") {
        let o = info["data_offsets"].as_array().unwrap().clone();
        let (b, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        if b >= begin {
            info["data_offsets"] = serde_json::json!([b + 4, e + 4]);
        }
    }
    let mut padded = data[..begin as usize].to_vec();
    padded.extend_from_slice(&[0; 4]);
    padded.extend_from_slice(&data[begin as usize..]);
    check(&h, &padded, &[&format!("tensor `{expert}`"), "4 unused bytes after tensor `model.embed_tokens.weight`"])?;

    // The embedding moved back into lm_head's bytes.
    let mut h = header.clone();
    let (b, e) = offsets(&header, embed);
    set(&mut h, embed, "data_offsets", serde_json::json!([b - 2, e - 2]));
    check(&h, &data, &[&format!("tensor `{embed}`"), "overlap tensor `lm_head.weight`"])?;
    Ok(())
}
