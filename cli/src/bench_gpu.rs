//! `switchyard bench --device cuda:N`: prefill and decode on one GPU, each against the HBM
//! roofline (the weight bytes the step must read over the device's measured read bandwidth),
//! and beside transformers (PyTorch, eager) running the same checkpoint on the same GPU in
//! the same run (`tools/bench_transformers.py`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use switchyard_kernels::Device;
use switchyard_kernels::cpu::Precision;
use switchyard_model::sampling::Rng;
use switchyard_model::{Chunk, Model};

use crate::progress::Progress;

/// What the GPU run measures.
pub struct Plan<'a> {
    pub dir: &'a Path,
    pub device: Device,
    pub prefill_tokens: usize,
    pub batches: &'a [usize],
    pub context: usize,
    pub steps: usize,
    /// A Python with torch and transformers, to run the same measurements with transformers.
    pub transformers: Option<&'a Path>,
}

struct Row {
    phase: &'static str,
    batch: usize,
    tokens_per_s: f64,
    /// Weight bytes per step, and the share of the roofline reached.
    bytes_per_step: f64,
    of_roofline: f64,
}

#[derive(Deserialize)]
struct Peer {
    phase: String,
    batch: usize,
    tokens_per_s: f64,
}

pub fn run(plan: &Plan<'_>) -> Result<()> {
    let Device::Cuda(ordinal) = plan.device else { bail!("the GPU benchmark needs --device cuda:N") };
    let p = Progress::new(&format!("loading onto {}", plan.device));
    let mut model = Model::load_with(plan.dir, plan.device, &|_, _| true, &mut |d, t| p.update(d, t))
        .with_context(|| format!("cannot load {}", plan.dir.display()))?;
    p.finish();
    // bf16 weights against bf16-rounded activations on the tensor cores from 32 rows on, as
    // transformers runs a bf16 checkpoint.
    model.exec.precision = Precision::Bf16Products;
    let spec = model.spec.clone();
    let bandwidth = model.exec.ops().read_bandwidth(4 << 30, 10)?;
    let mut rng = Rng::new(1);
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % spec.vocab_size as u64) as u32).collect() };

    let mut rows = Vec::new();
    let prompt = random_tokens(plan.prefill_tokens);
    for timed in [false, true] {
        let mut cache = crate::bench::new_caches(&model, &[prompt.len()])?.remove(0);
        model.exec.take();
        let start = Instant::now();
        model.greedy(&mut [Chunk { tokens: &prompt, cache: &mut cache }], None)?;
        let seconds = start.elapsed().as_secs_f64();
        if timed {
            let bytes = model.exec.take() as f64;
            rows.push(Row {
                phase: "prefill",
                batch: prompt.len(),
                tokens_per_s: prompt.len() as f64 / seconds,
                bytes_per_step: bytes,
                of_roofline: bytes / bandwidth / seconds,
            });
        }
    }
    for &batch in plan.batches {
        tracing::info!(batch, "decode");
        let contexts: Vec<Vec<u32>> = (0..batch).map(|_| random_tokens(plan.context)).collect();
        let (seconds, bytes) = crate::bench::decode(&model, None, &contexts, plan.steps)?;
        let bytes = bytes as f64 / plan.steps as f64;
        rows.push(Row {
            phase: "decode",
            batch,
            tokens_per_s: (batch * plan.steps) as f64 / seconds,
            bytes_per_step: bytes,
            of_roofline: bytes / bandwidth / (seconds / plan.steps as f64),
        });
    }
    let name = model.exec.ops().describe();
    let weight_bytes = model.weight_bytes();
    // Free the device before transformers loads the same checkpoint.
    drop(model);

    let peers = match plan.transformers {
        Some(python) => transformers(python, plan, ordinal)?,
        None => Vec::new(),
    };
    println!(
        "model: {} {}, hidden {}, {} layers, {} experts top-{}, expert width {}, {:.2} GB of weights",
        spec.arch.model_type(),
        plan.dir.display(),
        spec.hidden_size,
        spec.num_layers,
        spec.num_experts,
        spec.experts_per_token,
        spec.expert_intermediate_size,
        weight_bytes as f64 / 1e9
    );
    println!("device: {name}, measured read bandwidth {:.0} GB/s", bandwidth / 1e9);
    println!();
    println!(
        "| phase   | batch | switchyard tok/s | weights read/step | of roofline | transformers tok/s | vs transformers |"
    );
    println!(
        "|---------|------:|-----------------:|------------------:|------------:|-------------------:|----------------:|"
    );
    for r in &rows {
        let peer = peers.iter().find(|p| p.phase == r.phase && p.batch == r.batch);
        let (peer_tps, ratio) = match peer {
            Some(p) => (format!("{:.1}", p.tokens_per_s), format!("{:.2}x", r.tokens_per_s / p.tokens_per_s)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {:<7} | {:>5} | {:>16.1} | {:>14.1} MB | {:>10.1}% | {:>18} | {:>15} |",
            r.phase,
            r.batch,
            r.tokens_per_s,
            r.bytes_per_step / 1e6,
            100.0 * r.of_roofline,
            peer_tps,
            ratio
        );
    }
    Ok(())
}

/// Runs `tools/bench_transformers.py` with `python` on the same checkpoint and shapes; one
/// JSON object per measurement on its stdout.
fn transformers(python: &Path, plan: &Plan<'_>, ordinal: usize) -> Result<Vec<Peer>> {
    let script = script_path()?;
    tracing::info!("running transformers on the same checkpoint: {}", script.display());
    let batches: Vec<String> = plan.batches.iter().map(usize::to_string).collect();
    let out = Command::new(python)
        .arg(&script)
        .args(["--model", &plan.dir.display().to_string()])
        .args(["--device", &format!("cuda:{ordinal}")])
        .args(["--prefill-tokens", &plan.prefill_tokens.to_string()])
        .args(["--batch", &batches.join(",")])
        .args(["--context", &plan.context.to_string()])
        .args(["--steps", &plan.steps.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("{} {} failed ({})", python.display(), script.display(), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("unreadable transformers result `{l}`")))
        .collect()
}

/// `tools/bench_transformers.py`, next to the binary's source tree or the working directory.
fn script_path() -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("tools/bench_transformers.py"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_transformers.py"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("tools/bench_transformers.py not found: run from the repository root")
}
