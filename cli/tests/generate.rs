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

#[test]
fn bad_quantized_checkpoints_get_one_line_errors() -> Result<()> {
    use switchyard_model::checkpoint::{Checkpoint, Tensor, write_safetensors};

    // A quantization method Switchyard does not read.
    let tmp = copy_fixture("qwen3_moe_fp8")?;
    let model = tmp.path().to_str().unwrap();
    let config = std::fs::read_to_string(tmp.path().join("config.json"))?;
    std::fs::write(
        tmp.path().join("config.json"),
        config.replace("\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\""),
    )?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(
        err.contains("quantization method `gptq` is not supported") && err.contains("mxfp4") && err.contains("fp8"),
        "{err}"
    );
    std::fs::write(tmp.path().join("config.json"), &config)?;

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
    let plain: serde_json::Value = serde_json::from_str(&config)?;
    let mut plain = plain.as_object().unwrap().clone();
    plain.remove("quantization_config");
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&plain)?)?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("is fp8-quantized but config.json declares no quantization_config"), "{err}");

    // MXFP4 rows must be whole 32-value blocks.
    let tmp = copy_fixture("gpt_oss_mxfp4")?;
    let model = tmp.path().to_str().unwrap();
    let config = std::fs::read_to_string(tmp.path().join("config.json"))?;
    std::fs::write(
        tmp.path().join("config.json"),
        config.replace("\"intermediate_size\": 96", "\"intermediate_size\": 80"),
    )?;
    let err = stderr_of_failure(&["generate", "--model", model, "--prompt", "x"]);
    assert!(err.contains("MXFP4 rows of 80 values") && err.contains("down_proj_blocks"), "{err}");
    Ok(())
}
