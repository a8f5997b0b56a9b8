//! `switchyard bench` on a model with multi-head latent attention (DeepSeek): what the latent
//! KV cache saves against a per-head cache of the same model, and decode at a long context
//! with the absorbed form (attention over the latent rows) against the expanded one (keys and
//! values rebuilt per head from every cached row each step), measured in one run.

use std::time::Instant;

use anyhow::{Result, bail};
use switchyard_kernels::backend::MlaForm;
use switchyard_model::kv_cache::KvPool;
use switchyard_model::{Chunk, Model};

/// Prompt tokens per prefill pass while filling the context.
const PREFILL_CHUNK: usize = 512;

pub(crate) fn run(model: &mut Model, context: usize, steps: usize, tokens: &[u32]) -> Result<()> {
    let s = model.spec.clone();
    let Some(m) = s.mla else { bail!("{} has no latent attention", s.arch.model_type()) };
    if tokens.len() <= context {
        bail!("{} tokens for a context of {context}", tokens.len());
    }
    let latent = KvPool::layout_for(&s).floats_per_token() * 4;
    let per_head = s.num_layers * s.num_heads * (m.qk_head_dim() + m.v_head_dim) * 4;

    // One sequence holds the context; both forms then decode from it.
    let expanded_steps = steps.clamp(1, 3);
    let mut cache = crate::bench::new_caches(model, &[context + steps + expanded_steps + 2])?.remove(0);
    let p = crate::progress::Progress::new("filling the context");
    for (i, chunk) in tokens[..context].chunks(PREFILL_CHUNK).enumerate() {
        model.greedy(&mut [Chunk { tokens: chunk, cache: &mut cache }], None)?;
        p.update((i + 1) * PREFILL_CHUNK, context);
    }
    p.finish();
    let mut next = tokens[context];
    let mut decode = |model: &mut Model, form: MlaForm, n: usize| -> Result<f64> {
        model.mla_form = form;
        let start = Instant::now();
        for _ in 0..n {
            next = model.greedy(&mut [Chunk { tokens: &[next], cache: &mut cache }], None)?[0].0;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let absorbed = decode(model, MlaForm::Absorbed, steps)?;
    let expanded = decode(model, MlaForm::Expanded, expanded_steps)?;
    model.mla_form = MlaForm::Auto;

    println!();
    println!(
        "latent attention: {} heads, kv_lora_rank {} + rope {}, heads of {} + {} (keys) and {} (values)",
        s.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    );
    println!();
    let cache_head = format!("KV cache per token ({} layers, f32)", s.num_layers);
    println!("| {cache_head:<50} |    bytes | vs latent |");
    println!("|{}|---------:|----------:|", "-".repeat(52));
    println!("| {:<50} | {latent:>8} | {:>8.1}x |", "latent rows (kv_lora_rank + rope), shared by heads", 1.0);
    println!(
        "| {:<50} | {per_head:>8} | {:>8.1}x |",
        "keys and values per head (heads x (qk + v))",
        per_head as f64 / latent as f64
    );
    println!();
    let decode_head = format!("decode at {context} positions, batch 1");
    println!("| {decode_head:<36} | steps | tokens/s | vs expanded |");
    println!("|{}|------:|---------:|------------:|", "-".repeat(38));
    for (what, n, rate) in [
        ("absorbed (latent rows, FlashMLA's)", steps, absorbed),
        ("expanded (keys and values per head)", expanded_steps, expanded),
    ] {
        println!("| {what:<36} | {n:>5} | {rate:>8.2} | {:>10.1}x |", rate / expanded);
    }
    Ok(())
}
