//! `switchyard bench`: prefill and decode throughput of the single-process engine, each as a
//! fraction of the memory-bandwidth floor (the time it takes just to stream the weights the
//! step must read, at this machine's measured read bandwidth).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use switchyard_kernels::cpu::{self, Precision};
use switchyard_model::random::{RandomShape, write_random_checkpoint};
use switchyard_model::sampling::{Rng, argmax};
use switchyard_model::{Chunk, Model, SeqCache};

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
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = args.cache_dir.clone();
            if !dir.join("model.safetensors").exists() {
                let mut p = Progress::new("writing");
                tracing::info!("writing random benchmark checkpoint to {}", dir.display());
                write_random_checkpoint(&dir, &RandomShape::bench(), 0, &mut |d, t| p.update(d, t))?;
                p.finish();
            }
            dir
        }
    };
    let mut p = Progress::new("loading");
    let mut model = Model::load_with(&dir, &|_, _| true, &mut |d, t| p.update(d, t))
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
            let mut cache = SeqCache::new(&model.spec);
            model.exec.take();
            let start = Instant::now();
            model.forward(&mut [Chunk { tokens: &prompt, cache: &mut cache }])?;
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
    let s = &model.spec;
    for &batch in &args.batch {
        let mut caches: Vec<SeqCache> = (0..batch).map(|_| SeqCache::new(s)).collect();
        let mut next: Vec<u32> = Vec::with_capacity(batch);
        for cache in caches.iter_mut() {
            let ctx = random_tokens(args.context);
            let logits = model.forward(&mut [Chunk { tokens: &ctx, cache }])?;
            next.push(argmax(&logits[0]));
        }
        let step = |next: &mut Vec<u32>, caches: &mut [SeqCache]| -> Result<()> {
            let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut chunks: Vec<Chunk<'_>> =
                caches.iter_mut().zip(&ids).map(|(cache, id)| Chunk { tokens: id, cache }).collect();
            let logits = model.forward(&mut chunks)?;
            *next = logits.iter().map(|l| argmax(l)).collect();
            Ok(())
        };
        step(&mut next, &mut caches)?; // warm-up
        model.exec.take();
        let start = Instant::now();
        for _ in 0..args.steps {
            step(&mut next, &mut caches)?;
        }
        rows.push(Row {
            phase: "decode",
            batch,
            tokens: batch * args.steps,
            seconds: start.elapsed().as_secs_f64(),
            bytes: model.exec.take(),
            steps: args.steps,
        });
    }

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
    Ok(())
}
