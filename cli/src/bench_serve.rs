//! `switchyard bench serve`: N concurrent streaming clients against a running OpenAI API,
//! reporting requests/s, output tokens/s, time to first token and inter-token latency
//! (p50/p99), and each concurrency's output throughput against one request at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name (default: the first one `/v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// API key, when the server has tenants.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    api_key: Option<String>,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests each client sends one after another.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Tokens each request generates (end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Prompt of every request (each client appends its number so prompts differ).
    #[arg(long, default_value = "def fibonacci(n):")]
    prompt: String,
    /// Send prompts of this many token ids instead of text (for checkpoints without a
    /// tokenizer, such as `switchyard bench`'s random one).
    #[arg(long)]
    prompt_tokens: Option<usize>,
}

type Http = Client<HttpConnector, Full<Bytes>>;

struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

/// One streaming completion; returns its timings.
async fn one(http: &Http, args: &Args, model: &str, prompt: String) -> Result<Sample> {
    let prompt = match args.prompt_tokens {
        // Distinct ids per request, derived from the prompt text's bytes.
        Some(n) => {
            let seed = prompt.bytes().fold(17u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            json!(
                (0..n as u32)
                    .map(|i| (seed.wrapping_add(i.wrapping_mul(2_654_435_761))) % 1000 + 3)
                    .collect::<Vec<_>>()
            )
        }
        None => json!(prompt),
    };
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
        "stream": true, "ignore_eos": true, "logprobs": 0,
    });
    let mut req = hyper::Request::post(format!("{}/v1/completions", args.url.trim_end_matches('/')))
        .header("content-type", "application/json");
    if let Some(key) = &args.api_key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let start = Instant::now();
    let resp = http.request(req.body(Full::new(Bytes::from(body.to_string())))?).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        bail!("{status}: {}", String::from_utf8_lossy(&text));
    }
    let mut body = resp.into_body();
    let (mut pending, mut stamps) = (String::new(), Vec::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else { continue };
            if payload == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(payload).context("an SSE chunk that is not JSON")?;
            // Every token comes with its log-probability, text or not.
            let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
            stamps.extend(std::iter::repeat_n(start.elapsed(), tokens));
        }
    }
    let ttft = *stamps.first().context("the stream carried no token")?;
    let gaps = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Sample { ttft, gaps, tokens: args.max_tokens })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub fn run(args: Args) -> Result<()> {
    crate::launch::runtime()?.block_on(async {
        let http: Http = Client::builder(TokioExecutor::new()).build_http();
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                let uri = format!("{}/v1/models", args.url.trim_end_matches('/'));
                let mut req = hyper::Request::get(uri);
                if let Some(key) = &args.api_key {
                    req = req.header("authorization", format!("Bearer {key}"));
                }
                let resp = http
                    .request(req.body(Full::default())?)
                    .await
                    .with_context(|| format!("cannot reach {}", args.url))?;
                let v: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
                v["data"][0]["id"].as_str().context("/v1/models lists no model")?.to_string()
            }
        };
        // Warm-up: one request pages everything in.
        one(&http, &args, &model, args.prompt.clone()).await?;
        println!(
            "server: {} model {model}, {} tokens per request, {} requests per client",
            args.url, args.max_tokens, args.requests_per_client
        );
        println!();
        println!(
            "| concurrency | requests/s | output tokens/s | vs 1 at a time | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |"
        );
        println!(
            "|------------:|-----------:|----------------:|---------------:|---------:|---------:|--------:|--------:|"
        );
        let mut base = None;
        for &c in &args.concurrency {
            let start = Instant::now();
            let mut clients = tokio::task::JoinSet::new();
            for i in 0..c {
                let (http, args2, model) = (http.clone(), args.clone(), model.clone());
                clients.spawn(async move {
                    let mut out = Vec::new();
                    for r in 0..args2.requests_per_client {
                        out.push(one(&http, &args2, &model, format!("{} # {i}.{r}", args2.prompt)).await?);
                    }
                    Ok::<_, anyhow::Error>(out)
                });
            }
            let mut samples = Vec::new();
            while let Some(done) = clients.join_next().await {
                samples.extend(done??);
            }
            let secs = start.elapsed().as_secs_f64();
            let tokens: usize = samples.iter().map(|s| s.tokens).sum();
            let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
            let mut itl: Vec<Duration> = samples.iter().flat_map(|s| s.gaps.iter().copied()).collect();
            ttft.sort();
            itl.sort();
            let tps = tokens as f64 / secs;
            let base = *base.get_or_insert(tps);
            println!(
                "| {c:>11} | {:>10.2} | {tps:>15.1} | {:>13.1}x | {:>5.1} ms | {:>5.1} ms | {:>4.1} ms | {:>4.1} ms |",
                samples.len() as f64 / secs,
                tps / base,
                percentile(&ttft, 0.5),
                percentile(&ttft, 0.99),
                percentile(&itl, 0.5),
                percentile(&itl, 0.99),
            );
        }
        Ok(())
    })
}
