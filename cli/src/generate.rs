//! `switchyard generate`: generate for one prompt, with the whole model in this process or on
//! a cluster's router (`--router`), and print the text or one JSON object with every token's
//! log-probability. Both ways print the same thing.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use switchyard_kernels::cpu::Precision;
use switchyard_model::engine::TopLogprob;
use switchyard_model::kv_cache::{KvPool, blocks_for};
use switchyard_model::{Engine, EngineOptions, FinishReason, GenerateRequest, SamplingParams};
use switchyard_proto::v1;

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory in Hugging Face layout (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "SWITCHYARD_MODEL", required_unless_present = "router", conflicts_with = "router")]
    model: Option<PathBuf>,
    /// Generate on a running cluster: the router's gRPC address (`host:port`) instead of a
    /// local model.
    #[arg(long, env = "SWITCHYARD_ROUTER")]
    router: Option<String>,
    /// With `--router`: the API key of a tenant, where the router has `--tenants`.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true, requires = "router")]
    api_key: Option<String>,
    /// Prompt text, tokenized with the checkpoint's tokenizer.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Sampling temperature; 0 (or anything below 1e-5) is greedy.
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
    /// Compute device: `cpu`, or `cuda:N` (a build with `--features cuda`): the whole model,
    /// its experts and the KV cache in that GPU's memory.
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
    let out = match &args.router {
        Some(router) => remote(&args, router)?,
        None => local(&args)?,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut stdout, &out)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout, "{}", out.text)?;
    }
    Ok(())
}

fn sampling(args: &Args) -> SamplingParams {
    SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed }
}

fn local(args: &Args) -> Result<Output> {
    let device = args.device.parse::<switchyard_kernels::Device>()?.ensure_available()?;
    let model = args.model.as_ref().expect("clap requires --model without --router");
    if !model.is_dir() {
        bail!("model directory {} does not exist", model.display());
    }
    let precision = if args.bf16_prefill { Precision::Bf16Products } else { Precision::F32 };
    let progress = Progress::new(&format!("loading onto {device}"));
    // One KV block for now: the cache is sized to the request once it is tokenized.
    let block = KvPool::block_floats(&switchyard_model::ModelSpec::from_dir(model)?) * 4;
    let options = EngineOptions { device, kv_bytes: Some(block), precision, prefix_caching: false };
    let mut engine = Engine::load(model, &options, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("cannot load {}", model.display()))?;
    progress.finish();

    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => engine.tokenizer()?.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("pass --prompt or --prompt-ids"),
    };
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: args.max_tokens,
        sampling: sampling(args),
        top_logprobs: args.logprobs,
        ignore_eos: args.ignore_eos,
        prompt_logprobs: None,
        cache_salt: None,
    };
    engine.validate(&req)?;
    // A KV cache just large enough for this request.
    let spec = &engine.model.spec;
    engine.set_kv_bytes(blocks_for(Engine::kv_tokens(&req)) * KvPool::block_floats(spec) * 4)?;
    let generation = engine.generate(&req)?;

    let tokenizer = engine.tokenizer.as_ref();
    let ids: Vec<u32> = generation.tokens.iter().map(|t| t.id).collect();
    let text = match tokenizer {
        Some(t) => t.decode(&ids)?,
        None => String::new(),
    };
    Ok(Output {
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
    })
}

/// Runs the request on the router at `router` through its `Generate` stream.
fn remote(args: &Args, router: &str) -> Result<Output> {
    if args.bf16_prefill || args.device != "cpu" {
        bail!("--bf16-prefill and --device apply to a local model; the router's own flags decide them");
    }
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => v1::generate_request::Prompt::Text(text.clone()),
        (None, Some(ids)) => v1::generate_request::Prompt::TokenIds(v1::TokenIds { ids: ids.clone() }),
        (None, None) => bail!("pass --prompt or --prompt-ids"),
    };
    let s = sampling(args);
    let request = v1::GenerateRequest {
        prompt: Some(prompt),
        max_tokens: u32::try_from(args.max_tokens).context("--max-tokens is too large")?,
        temperature: s.temperature,
        top_p: Some(s.top_p),
        top_k: s.top_k as u32,
        seed: s.seed,
        top_logprobs: args.logprobs as u32,
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    crate::launch::runtime()?.block_on(async {
        let mut client = crate::cluster::router_client(router).await?;
        let mut request = tonic::Request::new(request);
        if let Some(key) = &args.api_key {
            let value = format!("Bearer {key}").parse().context("--api-key is not valid in a gRPC header")?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut stream = client.generate(request).await.map_err(status_error)?.into_inner();
        let mut out = Output {
            prompt_ids: Vec::new(),
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
        };
        while let Some(msg) = stream.message().await.map_err(status_error)? {
            match msg.event {
                Some(v1::generate_response::Event::Started(s)) => out.prompt_ids = s.prompt_ids,
                Some(v1::generate_response::Event::Token(t)) => out.tokens.push(TokenOut {
                    id: t.id,
                    text: t.text,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top_logprobs
                        .into_iter()
                        .map(|x| TopLogprob { id: x.id, logprob: x.logprob })
                        .collect(),
                }),
                Some(v1::generate_response::Event::Finished(f)) => {
                    out.text = f.text;
                    out.finish_reason = match v1::FinishReason::try_from(f.reason) {
                        Ok(v1::FinishReason::Stop) => FinishReason::Stop,
                        _ => FinishReason::Length,
                    };
                    return Ok(out);
                }
                None => {}
            }
        }
        bail!("the router closed the stream before the generation finished")
    })
}

/// A gRPC status as an error that names its code.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
