//! `switchyard bench`: prefill and decode throughput of the single-process engine, each as a
//! fraction of the memory-bandwidth floor (the time it takes just to stream the weights the
//! step must read, at this machine's measured read bandwidth).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use switchyard_kernels::cpu::{self, Precision};
use switchyard_model::kv_cache::blocks_for;
use switchyard_model::moe::Experts;
use switchyard_model::random::{RandomFormat, RandomShape, write_random_checkpoint};
use switchyard_model::sampling::Rng;
use switchyard_model::{Chunk, Model, SeqCache};
use switchyard_proto::tls::{Role, TlsFlags};
use switchyard_router::{Cluster, RemoteExperts};

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint to measure; without it a random Mixtral-shaped bf16 checkpoint (hidden 1024,
    /// 8 layers, 32 experts top-4, expert width 512) is written to --cache-dir.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Where the random benchmark checkpoint is kept between runs.
    #[arg(long, env = "SWITCHYARD_BENCH_DIR", default_value = "target/bench-checkpoint")]
    cache_dir: PathBuf,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Decode batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Context each decoding sequence starts with.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Also measure decode with the experts on this many expert nodes (child processes on
    /// loopback, comma-separated counts), against the single process.
    #[arg(long, value_delimiter = ',')]
    expert_nodes: Vec<usize>,
    /// Where the model runs: `cpu`, or `cuda:N` (a build with `--features cuda`): the table
    /// is then against the GPU's HBM roofline.
    #[arg(long, default_value = "cpu")]
    device: switchyard_kernels::Device,
    /// The random checkpoint written when no --model is given: `small` (Mixtral layout,
    /// hidden 1024, 8 layers), `gpt-oss-20b` (its shapes: in the Mixtral layout, 42 GB in
    /// bf16; with `--quant mxfp4`, gpt-oss itself, 13.8 GB) or `deepseek-v3` (DeepSeek-V3's
    /// latent attention widths over 16 heads, hidden 2048, 3 layers, 16 experts top-4).
    #[arg(long, default_value = "small")]
    shape: String,
    /// How the random checkpoint stores its weights: `none` (bf16), `fp8` (e4m3 with 128x128
    /// block scales on attention and experts; `small`, `deepseek-v3`) or `mxfp4` (gpt-oss's
    /// MXFP4 experts; `gpt-oss-20b`).
    #[arg(long, default_value = "none")]
    quant: String,
    /// With a latent-attention (DeepSeek) model: the context at which decode is measured with
    /// the absorbed form against the expanded one.
    #[arg(long, default_value_t = 4096)]
    mla_context: usize,
    /// With `--device cuda:N`: a Python with torch and transformers; runs
    /// tools/bench_transformers.py on the same checkpoint and GPU after switchyard, and adds
    /// its figures to the table.
    #[arg(long)]
    transformers: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Concurrent streaming clients against a running server's OpenAI API.
    Serve(crate::bench_serve::Args),
    /// The coordinators under load: failover time after a SIGKILLed expert node, and node
    /// load before and after balancing a skewed workload.
    Cluster(crate::bench_cluster::Args),
    /// The coordinators' placement planner at datacenter size, against the raft election
    /// timeout.
    Planner(crate::bench_planner::Args),
}

struct Row {
    phase: &'static str,
    batch: usize,
    tokens: usize,
    seconds: f64,
    bytes: usize,
    steps: usize,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Some(BenchCommand::Serve(serve)) => return crate::bench_serve::run(serve),
        Some(BenchCommand::Cluster(cluster)) => return crate::bench_cluster::run(cluster),
        Some(BenchCommand::Planner(planner)) => return crate::bench_planner::run(planner),
        None => {}
    }
    let device = args.device.ensure_available()?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let (shape, format, dir) = match (args.shape.as_str(), args.quant.as_str()) {
                ("small", "none") => (RandomShape::bench(), RandomFormat::Bf16, args.cache_dir.clone()),
                ("small", "fp8") => (RandomShape::bench(), RandomFormat::Fp8, args.cache_dir.join("small-fp8")),
                ("gpt-oss-20b", "none") => {
                    (RandomShape::gpt_oss_20b(), RandomFormat::Bf16, args.cache_dir.join("gpt-oss-20b"))
                }
                ("gpt-oss-20b", "mxfp4") => {
                    (RandomShape::gpt_oss_20b_native(), RandomFormat::Mxfp4, args.cache_dir.join("gpt-oss-20b-mxfp4"))
                }
                ("deepseek-v3", "none") => {
                    (RandomShape::deepseek_v3_small(), RandomFormat::Bf16, args.cache_dir.join("deepseek-v3"))
                }
                ("deepseek-v3", "fp8") => {
                    (RandomShape::deepseek_v3_small(), RandomFormat::Fp8, args.cache_dir.join("deepseek-v3-fp8"))
                }
                (shape @ ("small" | "gpt-oss-20b" | "deepseek-v3"), quant) => bail!(
                    "--quant {quant} is not offered with --shape {shape}: `small` and `deepseek-v3` take none or \
                     fp8, `gpt-oss-20b` none or mxfp4"
                ),
                (other, _) => bail!("unknown --shape `{other}`: expected `small`, `gpt-oss-20b` or `deepseek-v3`"),
            };
            if !dir.join("config.json").exists() {
                let p = Progress::new("writing");
                tracing::info!("writing random benchmark checkpoint to {}", dir.display());
                write_random_checkpoint(&dir, &shape, format, 0, &mut |d, t| p.update(d, t))?;
                p.finish();
            } else if !dir.join("tokenizer.json").exists() {
                // Written by a version that made no tokenizer.
                switchyard_model::random::write_random_tokenizer(&dir, &shape.config_json(format))?;
            }
            dir
        }
    };
    if device != switchyard_kernels::Device::Cpu {
        #[cfg(feature = "cuda")]
        return crate::bench_gpu::run(&crate::bench_gpu::Plan {
            dir: &dir,
            device,
            prefill_tokens: args.prefill_tokens,
            batches: &args.batch,
            context: args.context,
            steps: args.steps,
            transformers: args.transformers.as_deref(),
        });
    }
    if args.transformers.is_some() {
        bail!("--transformers compares on a GPU: pass --device cuda:N");
    }
    let p = Progress::new("loading");
    let mut model = Model::load_with(&dir, device, &|_, _| true, &mut |d, t| p.update(d, t))
        .with_context(|| format!("cannot load {}", dir.display()))?;
    p.finish();
    let bandwidth = cpu::bandwidth::read_bandwidth(1 << 30, 5);
    let s = &model.spec;
    let mut rng = Rng::new(1);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % s.vocab_size as u64) as u32).collect() };

    let mut rows = Vec::new();
    // Prefill: one warm-up pass pages every weight in, then the timed pass; once with exact
    // f32 products, once with the BF16 dot-product unit.
    let prompt = random_tokens(args.prefill_tokens);
    for (precision, phase) in [(Precision::F32, "prefill f32"), (Precision::Bf16Products, "prefill bf16")] {
        model.exec.precision = precision;
        for timed in [false, true] {
            let mut cache = new_caches(&model, &[prompt.len()])?.remove(0);
            model.exec.take();
            let start = Instant::now();
            model.greedy(&mut [Chunk { tokens: &prompt, cache: &mut cache }], None)?;
            if timed {
                rows.push(Row {
                    phase,
                    batch: 1,
                    tokens: prompt.len(),
                    seconds: start.elapsed().as_secs_f64(),
                    bytes: model.exec.take(),
                    steps: 1,
                });
            }
        }
    }
    model.exec.precision = Precision::F32;
    let contexts: Vec<Vec<Vec<u32>>> =
        args.batch.iter().map(|&b| (0..b).map(|_| random_tokens(args.context)).collect()).collect();
    let mut single = Vec::new();
    for ctx in &contexts {
        let (seconds, bytes) = decode(&model, None, ctx, args.steps)?;
        single.push(seconds);
        rows.push(Row {
            phase: "decode",
            batch: ctx.len(),
            tokens: ctx.len() * args.steps,
            seconds,
            bytes,
            steps: args.steps,
        });
    }
    let mut cluster_rows = Vec::new();
    // Each node count twice, plaintext and mutual TLS: what the encryption costs a round trip.
    let certs = tempfile::tempdir()?;
    let authority = match args.expert_nodes.is_empty() {
        true => None,
        false => Some(crate::certs::Authority::create(certs.path())?),
    };
    for &n in &args.expert_nodes {
        for tls in [None, authority.as_ref()] {
            cluster_rows.extend(cluster_decode(&dir, &model, n, tls, &contexts, &single, args.steps)?);
        }
    }
    let s = &model.spec;
    println!(
        "model: {} {}, hidden {}, {} layers, {} experts top-{}, expert width {}, {:.2} GB of weights",
        s.arch.model_type(),
        dir.display(),
        s.hidden_size,
        s.num_layers,
        s.num_experts,
        s.experts_per_token,
        s.expert_intermediate_size,
        model.weight_bytes() as f64 / 1e9
    );
    println!(
        "machine: {} threads, {} kernels, measured read bandwidth {:.1} GB/s",
        rayon::current_num_threads(),
        cpu::isa(),
        bandwidth / 1e9
    );
    println!();
    println!("| phase        | batch | tokens/s | weights read/step | floor/step | measured/step | of floor |");
    println!("|--------------|------:|---------:|------------------:|-----------:|--------------:|---------:|");
    for r in &rows {
        let per_step = r.seconds / r.steps as f64;
        let bytes_per_step = r.bytes as f64 / r.steps as f64;
        let floor = bytes_per_step / bandwidth;
        let label = if r.phase.starts_with("prefill") { r.tokens.to_string() } else { r.batch.to_string() };
        println!(
            "| {:<12} | {:>5} | {:>8.1} | {:>14.1} MB | {:>7.2} ms | {:>10.2} ms | {:>7.1}% |",
            r.phase,
            label,
            r.tokens as f64 / r.seconds,
            bytes_per_step / 1e6,
            floor * 1e3,
            per_step * 1e3,
            100.0 * floor / per_step
        );
    }
    if model.spec.mla.is_some() {
        let tokens = random_tokens(args.mla_context + 1);
        crate::bench_mla::run(&mut model, args.mla_context, args.steps.min(16), &tokens)?;
    }
    if !cluster_rows.is_empty() {
        println!();
        println!("decode with the experts on expert nodes (loopback gRPC), against the single process:");
        println!();
        println!(
            "| expert nodes | transport  | batch | tokens/s | vs single process | layer round trip | of which outside compute |"
        );
        println!(
            "|-------------:|------------|------:|---------:|------------------:|-----------------:|-------------------------:|"
        );
        for r in &cluster_rows {
            println!(
                "| {:>12} | {:<10} | {:>5} | {:>8.1} | {:>16.1}% | {:>13.0} µs | {:>21.0} µs |",
                r.nodes,
                r.transport,
                r.batch,
                r.tokens_per_s,
                100.0 * r.vs_single,
                r.layer_micros,
                r.overhead_micros
            );
        }
    }
    Ok(())
}

/// Times `steps` decode steps of a batch that starts from `contexts`, with the experts on
/// `experts` (`None`: the model's own, on its device). Returns seconds and weight bytes read
/// (by this process).
pub(crate) fn decode(
    model: &Model,
    experts: Option<&dyn Experts>,
    contexts: &[Vec<u32>],
    steps: usize,
) -> Result<(f64, usize)> {
    let lengths: Vec<usize> = contexts.iter().map(|c| c.len() + steps + 2).collect();
    let mut caches = new_caches(model, &lengths)?;
    // Greedy, picked where the logits are.
    let greedy = |chunks: &mut [Chunk<'_>]| -> Result<Vec<u32>> {
        Ok(model.greedy(chunks, experts)?.into_iter().map(|(id, _)| id).collect())
    };
    let mut next: Vec<u32> = Vec::with_capacity(contexts.len());
    for (cache, ctx) in caches.iter_mut().zip(contexts) {
        next.extend(greedy(&mut [Chunk { tokens: ctx, cache }])?);
    }
    let mut step = |next: &mut Vec<u32>| -> Result<()> {
        let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut chunks: Vec<Chunk<'_>> =
            caches.iter_mut().zip(&ids).map(|(cache, id)| Chunk { tokens: id, cache }).collect();
        *next = greedy(&mut chunks)?;
        Ok(())
    };
    step(&mut next)?; // warm-up
    model.exec.take();
    let start = Instant::now();
    for _ in 0..steps {
        step(&mut next)?;
    }
    Ok((start.elapsed().as_secs_f64(), model.exec.take()))
}

/// One cache per length (positions), from one KV pool on the model's device that holds
/// them all.
pub(crate) fn new_caches(model: &Model, lengths: &[usize]) -> Result<Vec<SeqCache>> {
    let pool = model.kv_pool(lengths.iter().map(|&n| blocks_for(n)).sum())?;
    lengths.iter().map(|&n| SeqCache::reserve(&pool, n).context("the KV pool holds every sequence")).collect()
}

struct ClusterRow {
    nodes: usize,
    /// `plaintext` or `mutual TLS`.
    transport: &'static str,
    batch: usize,
    tokens_per_s: f64,
    vs_single: f64,
    layer_micros: f64,
    overhead_micros: f64,
}

/// Starts `n` expert nodes splitting the experts of `dir`, and times the same decode as the
/// single process (`single[i]` seconds for `contexts[i]`) with the experts on them.
fn cluster_decode(
    dir: &Path,
    model: &Model,
    n: usize,
    tls: Option<&crate::certs::Authority>,
    contexts: &[Vec<Vec<u32>>],
    single: &[f64],
    steps: usize,
) -> Result<Vec<ClusterRow>> {
    let rt = crate::launch::runtime()?;
    let sets = crate::up::spread(model.spec.num_experts, n, 1);
    // Each node gets an equal share of the cores; they take turns with the router per layer.
    let threads = (rayon::current_num_threads() / n).max(1).to_string();
    tracing::info!("starting {n} expert nodes");
    let (mut procs, addresses) = rt.block_on(crate::up::start_nodes(
        dir,
        crate::up::Placement::Fixed(&sets),
        &["--threads".into(), threads],
        tls,
        &crate::launch::Output { quiet: true, log_dir: None },
    ))?;
    let measured = (|| -> Result<Vec<ClusterRow>> {
        let security = match tls {
            Some(authority) => authority.issue(Role::Router, "bench-router")?.load(Role::Router),
            None => TlsFlags::plaintext().load(Role::Router),
        }
        .map_err(anyhow::Error::msg)?;
        let cluster = rt.block_on(Cluster::connect(&addresses, &security, &model.spec, Duration::from_secs(60)))?;
        let remote = RemoteExperts::new(cluster, rt.handle().clone(), Duration::from_secs(60));
        let mut out = Vec::new();
        for (ctx, &base) in contexts.iter().zip(single) {
            let before = remote.stats.snapshot();
            let (seconds, _) = decode(model, Some(&remote), ctx, steps)?;
            let (layers, micros, compute) = remote.stats.snapshot().since(&before);
            out.push(ClusterRow {
                nodes: n,
                transport: if tls.is_some() { "mutual TLS" } else { "plaintext" },
                batch: ctx.len(),
                tokens_per_s: (ctx.len() * steps) as f64 / seconds,
                vs_single: base / seconds,
                layer_micros: micros / layers,
                overhead_micros: (micros - compute) / layers,
            });
        }
        Ok(out)
    })();
    rt.block_on(async {
        for p in &mut procs {
            p.stop().await;
        }
    });
    measured
}
