//! `switchyard bench serve`: N concurrent streaming clients against a running OpenAI API,
//! reporting requests/s, output tokens/s, time to first token and inter-token latency
//! (p50/p99), and each concurrency's output throughput against one request at a time.
//! With `--shared-prefix-tokens N` it then measures what prefix caching saves: the time to
//! first token of prompts that share N leading tokens with one sent before, against prompts
//! of the same length that share nothing, one request at a time. With `--structured` it
//! measures what constrained decoding costs: each concurrency again with a JSON schema
//! (`guided_json`), its inter-token latency and throughput against the unconstrained run.

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
    /// Also measure the shared-prefix workload: prompts of this many token ids shared (an
    /// agent's system prompt and history), each followed by 16 ids of its own, against
    /// prompts as long that share nothing.
    #[arg(long)]
    shared_prefix_tokens: Option<usize>,
    /// Also measure each concurrency with its output constrained to a JSON schema (a list of
    /// `{"name", "score", "tags"}` objects), against the same requests unconstrained.
    #[arg(long)]
    structured: bool,
}

/// The schema of `--structured`: long enough output that requests run to `max_tokens`.
fn bench_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"results": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "score": {"type": "number"},
                "tags": {"type": "array", "items": {"enum": ["fast", "slow", "new", "old"]}},
            },
            "required": ["name", "score", "tags"],
            "additionalProperties": false,
        }}},
        "required": ["results"],
        "additionalProperties": false,
    })
}

/// Ids after the shared prefix, distinct per request.
const OWN_TOKENS: usize = 16;

type Http = Client<HttpConnector, Full<Bytes>>;

struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
    /// Prompt tokens the server took from its prefix cache.
    cached: usize,
}

/// `n` token ids derived from `seed`'s bytes (distinct seeds, distinct ids).
fn token_ids(seed: &str, n: usize) -> Vec<u32> {
    let seed = seed.bytes().fold(17u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..n as u32).map(|i| (seed.wrapping_add(i.wrapping_mul(2_654_435_761))) % 1000 + 3).collect()
}

/// The prompt of a request of the concurrency table.
fn prompt_of(args: &Args, text: String) -> Value {
    match args.prompt_tokens {
        Some(n) => json!(token_ids(&text, n)),
        None => json!(text),
    }
}

/// One streaming completion; returns its timings.
async fn one(http: &Http, args: &Args, model: &str, prompt: Value) -> Result<Sample> {
    one_with(http, args, model, prompt, &Value::Null).await
}

/// [`one`] with `extra` fields in the request body.
async fn one_with(http: &Http, args: &Args, model: &str, prompt: Value, extra: &Value) -> Result<Sample> {
    let mut body = json!({
        "model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
        "stream": true, "ignore_eos": true, "logprobs": 0, "stream_options": {"include_usage": true},
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
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
    let (mut pending, mut stamps, mut cached) = (String::new(), Vec::new(), 0);
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
            if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                cached = n as usize;
            }
            // Every token comes with its log-probability, text or not.
            let tokens = v["choices"][0]["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
            stamps.extend(std::iter::repeat_n(start.elapsed(), tokens));
        }
    }
    let ttft = *stamps.first().context("the stream carried no token")?;
    let gaps = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(Sample { ttft, gaps, tokens: stamps.len(), cached })
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
        one(&http, &args, &model, prompt_of(&args, args.prompt.clone())).await?;
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
            let run = concurrent(&http, &args, &model, c, &Value::Null).await?;
            let base = *base.get_or_insert(run.tps);
            println!(
                "| {c:>11} | {:>10.2} | {:>15.1} | {:>13.1}x | {:>5.1} ms | {:>5.1} ms | {:>4.1} ms | {:>4.1} ms |",
                run.requests_per_s,
                run.tps,
                run.tps / base,
                percentile(&run.ttft, 0.5),
                percentile(&run.ttft, 0.99),
                percentile(&run.itl, 0.5),
                percentile(&run.itl, 0.99),
            );
        }
        if args.structured {
            structured(&http, &args, &model).await?;
        }
        if let Some(n) = args.shared_prefix_tokens {
            shared_prefix(&http, &args, &model, n).await?;
        }
        Ok(())
    })
}

/// What one concurrency level measured.
struct Run {
    requests_per_s: f64,
    tps: f64,
    ttft: Vec<Duration>,
    itl: Vec<Duration>,
}

/// `c` clients, each sending `requests_per_client` requests one after another (with `extra`
/// in each body).
async fn concurrent(http: &Http, args: &Args, model: &str, c: usize, extra: &Value) -> Result<Run> {
    let start = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..c {
        let (http, args2, model, extra) = (http.clone(), args.clone(), model.to_string(), extra.clone());
        clients.spawn(async move {
            let mut out = Vec::new();
            for r in 0..args2.requests_per_client {
                let prompt = prompt_of(&args2, format!("{} # {i}.{r}", args2.prompt));
                out.push(one_with(&http, &args2, &model, prompt, &extra).await?);
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
    Ok(Run { requests_per_s: samples.len() as f64 / secs, tps: tokens as f64 / secs, ttft, itl })
}

/// Each concurrency again, unconstrained and with the output constrained to [`bench_schema`],
/// in alternating rounds (so that drift on a busy machine falls on both alike).
async fn structured(http: &Http, args: &Args, model: &str) -> Result<()> {
    const ROUNDS: usize = 2;
    let schema = json!({"guided_json": bench_schema()});
    println!();
    println!("structured output: the same requests with a JSON schema (`guided_json`), {ROUNDS} alternating rounds");
    println!();
    println!(
        "| concurrency | tokens/s free | tokens/s schema | schema vs free | ITL p50 free | ITL p50 schema | ITL ratio |"
    );
    println!(
        "|------------:|--------------:|----------------:|---------------:|-------------:|---------------:|----------:|"
    );
    for &c in &args.concurrency {
        let (mut free, mut constrained) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            free.push(concurrent(http, args, model, c, &Value::Null).await?);
            constrained.push(concurrent(http, args, model, c, &schema).await?);
        }
        let pooled = |runs: &[Run]| {
            let tps = runs.iter().map(|r| r.tps).sum::<f64>() / runs.len() as f64;
            let mut itl: Vec<Duration> = runs.iter().flat_map(|r| r.itl.iter().copied()).collect();
            itl.sort();
            (tps, percentile(&itl, 0.5))
        };
        let ((tps_free, itl_free), (tps_schema, itl_schema)) = (pooled(&free), pooled(&constrained));
        println!(
            "| {c:>11} | {tps_free:>13.1} | {tps_schema:>15.1} | {:>13.2}x | {itl_free:>9.2} ms | {itl_schema:>11.2} ms | {:>8.2}x |",
            tps_schema / tps_free.max(1e-9),
            itl_schema / itl_free.max(1e-9),
        );
    }
    Ok(())
}

/// The shared-prefix workload: `requests_per_client` prompts of `n` shared ids and
/// [`OWN_TOKENS`] of their own, after one that sent the prefix first, against as many prompts
/// of the same length that share nothing; one request at a time, in turns.
async fn shared_prefix(http: &Http, args: &Args, model: &str, n: usize) -> Result<()> {
    let shared = token_ids("shared prefix", n);
    let with_shared =
        |i: usize| json!(shared.iter().copied().chain(token_ids(&format!("own {i}"), OWN_TOKENS)).collect::<Vec<_>>());
    one(http, args, model, with_shared(0)).await?;
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    for i in 1..=args.requests_per_client {
        misses.push(one(http, args, model, json!(token_ids(&format!("unshared {i}"), n + OWN_TOKENS))).await?);
        hits.push(one(http, args, model, with_shared(i)).await?);
    }
    println!();
    println!("shared prefix: {n} tokens shared + {OWN_TOKENS} of each request's own, {} requests each", hits.len());
    println!();
    println!("| prompts            | prompt tokens | cached tokens | TTFT p50 | TTFT p99 | TTFT p50 vs unshared |");
    println!("|--------------------|--------------:|--------------:|---------:|---------:|---------------------:|");
    let ttft = |s: &[Sample]| {
        let mut t: Vec<Duration> = s.iter().map(|s| s.ttft).collect();
        t.sort();
        (percentile(&t, 0.5), percentile(&t, 0.99))
    };
    let base = ttft(&misses).0;
    for (name, samples) in [("share nothing", &misses), ("share the prefix", &hits)] {
        let (median, p99) = ttft(samples);
        let cached = samples.iter().map(|s| s.cached).sum::<usize>() / samples.len().max(1);
        println!(
            "| {name:<18} | {:>13} | {cached:>13} | {median:>5.1} ms | {p99:>5.1} ms | {:>19.1}x |",
            n + OWN_TOKENS,
            base / median.max(1e-9)
        );
    }
    Ok(())
}
