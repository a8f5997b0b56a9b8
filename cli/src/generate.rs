//! `switchyard generate`: load a checkpoint, generate for one prompt, print the text or one
//! JSON object with every token's log-probability.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use switchyard_kernels::cpu::Precision;
use switchyard_model::engine::TopLogprob;
use switchyard_model::{Engine, FinishReason, GenerateRequest, SamplingParams};

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed; the same seed gives the same tokens.
    #[arg(long)]
    seed: Option<u64>,
    /// Report the K most likely alternatives of every generated token.
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Multiply prompt-sized batches (32+ rows) with bf16-rounded activations on the CPU's
    /// BF16 dot-product unit: faster prefill, log-probabilities within ~1e-2 instead of ~1e-5.
    #[arg(long)]
    bf16_prefill: bool,
    /// Compute device (`cpu`; `cuda:N` needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Serialize)]
struct Output {
    prompt_ids: Vec<u32>,
    tokens: Vec<TokenOut>,
    text: String,
    finish_reason: FinishReason,
}

#[derive(Serialize)]
struct TokenOut {
    id: u32,
    text: String,
    logprob: f32,
    top_logprobs: Vec<TopLogprob>,
}

pub fn run(args: Args) -> Result<()> {
    args.device.parse::<switchyard_kernels::Device>()?.ensure_available()?;
    if !args.model.is_dir() {
        bail!("model directory {} does not exist", args.model.display());
    }
    let mut progress = Progress::new("loading");
    let mut engine = Engine::load(&args.model, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    progress.finish();
    if args.bf16_prefill {
        engine.model.exec.precision = Precision::Bf16Products;
    }

    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => engine.tokenizer()?.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("pass --prompt or --prompt-ids"),
    };
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        top_logprobs: args.logprobs,
        ignore_eos: args.ignore_eos,
    };
    let generation = engine.generate(&req)?;

    let tokenizer = engine.tokenizer.as_ref();
    let ids: Vec<u32> = generation.tokens.iter().map(|t| t.id).collect();
    let text = match tokenizer {
        Some(t) => t.decode(&ids)?,
        None => String::new(),
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let out = Output {
            prompt_ids: generation.prompt_ids,
            tokens: generation
                .tokens
                .into_iter()
                .map(|t| TokenOut {
                    id: t.id,
                    text: tokenizer.map(|tk| tk.token_text(t.id)).unwrap_or_default(),
                    logprob: t.logprob,
                    top_logprobs: t.top_logprobs,
                })
                .collect(),
            text,
            finish_reason: generation.finish_reason,
        };
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "{text}")?;
    }
    Ok(())
}
