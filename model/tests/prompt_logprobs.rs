//! Prompt log-probabilities (`echo` with `logprobs`, vLLM's `prompt_logprobs`) against
//! transformers: every fixture's `prompt_logprobs.json` (recorded by
//! `tools/record_prompt_logprobs.py`, one transformers pass over each prompt) must be
//! reproduced within 1e-3, whether the prefill runs whole or in chunks of a few tokens, alone
//! or batched with other sequences.
//!
//! As in `parity.rs`, every test runs on the CPU and (`..._on_cuda`, ignored unless asked
//! for) on `cuda:0`.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;
use switchyard_kernels::Device;
use switchyard_model::{Engine, EngineOptions, FinishReason, GenerateRequest, PromptLogprob, SamplingParams, Sequence};

const TOLERANCE: f32 = 1e-3;
/// Ranks and the order of alternatives are compared only where the nearest other token is
/// farther than this (float noise between two implementations is ~1e-5).
const TIE: f32 = 1e-4;
const KV_BYTES: usize = 64 << 20;
/// Alternatives recorded per position.
const TOP: usize = 5;

#[derive(Deserialize)]
struct Recorded {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    ranks: Vec<usize>,
    rank_margins: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
}

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
}

/// Every fixture with recorded prompt log-probabilities, and its cases.
fn fixtures() -> Result<Vec<(String, PathBuf, Vec<Case>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir())? {
        let dir = entry?.path();
        let file = dir.join("prompt_logprobs.json");
        if !file.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        let recorded: Recorded = serde_json::from_str(&text)?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        out.push((name, dir, recorded.cases));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(out.len() >= 5, "expected prompt_logprobs.json in every fixture, found {}", out.len());
    Ok(out)
}

/// The fixtures whose model runs on `device`: MLA (DeepSeek) attention runs on the CPU only.
fn fixtures_on(device: Device) -> Result<Vec<(String, PathBuf, Vec<Case>)>> {
    let mut out = Vec::new();
    for (name, dir, cases) in fixtures()? {
        if device == Device::Cpu || switchyard_model::ModelSpec::from_dir(&dir)?.mla.is_none() {
            out.push((name, dir, cases));
        }
    }
    Ok(out)
}

fn load_engine(dir: &Path, device: Device) -> Result<Engine> {
    let options = EngineOptions { device, kv_bytes: Some(KV_BYTES), ..Default::default() };
    Ok(Engine::load(dir, &options, &mut |_, _| {})?)
}

fn request(ids: &[u32], max_tokens: usize, prompt_logprobs: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: ids.to_vec(),
        max_tokens,
        sampling: SamplingParams::default(),
        top_logprobs: 0,
        ignore_eos: true,
        prompt_logprobs,
        cache_salt: None,
    }
}

/// `got` against transformers' numbers for `case`.
fn check(what: &str, case: &Case, got: &[PromptLogprob]) -> Result<()> {
    ensure!(
        got.len() == case.ids.len() - 1,
        "{what}: {} prompt log-probabilities for {} tokens",
        got.len(),
        case.ids.len()
    );
    for (p, g) in got.iter().enumerate() {
        let at = format!("{what}, prompt token {}", p + 1);
        ensure!(g.id == case.ids[p + 1], "{at}: scored token {} instead of {}", g.id, case.ids[p + 1]);
        ensure!(
            (g.logprob - case.logprobs[p]).abs() <= TOLERANCE,
            "{at}: logprob {} but transformers gives {}",
            g.logprob,
            case.logprobs[p]
        );
        if case.rank_margins[p] > TIE {
            ensure!(g.rank == case.ranks[p], "{at}: rank {} but transformers gives {}", g.rank, case.ranks[p]);
        }
        let want = &case.top_logprobs[p];
        ensure!(g.top_logprobs.len() == TOP, "{at}: {} alternatives, asked for {TOP}", g.top_logprobs.len());
        for (i, (t, &(id, lp))) in g.top_logprobs.iter().zip(want).enumerate() {
            ensure!((t.logprob - lp).abs() <= TOLERANCE, "{at}: alternative {i} has {} not {lp}", t.logprob);
            let clear = |j: usize| want.get(j).is_none_or(|&(_, v)| (v - lp).abs() > TIE);
            if clear(i + 1) && (i == 0 || clear(i - 1)) {
                ensure!(t.id == id, "{at}: alternative {i} is token {} not {id}", t.id);
            }
        }
    }
    Ok(())
}

/// Runs `seqs` to the end, `budget` tokens a step (small budgets cut prefills into chunks).
fn run(engine: &Engine, seqs: &mut [Sequence], budget: usize) -> Result<()> {
    while seqs.iter().any(|s| !s.is_finished()) {
        let mut running: Vec<&mut Sequence> = seqs.iter_mut().collect();
        engine.step(&mut running, budget)?;
    }
    Ok(())
}

on_each_device! {
    /// `max_tokens` 0 with prompt log-probabilities: one prefill, nothing generated.
    prompt_logprobs_match_transformers, prompt_logprobs_match_transformers_on_cuda, |device| {
        for (name, dir, cases) in fixtures_on(device)? {
            let engine = load_engine(&dir, device)?;
            for (i, case) in cases.iter().enumerate() {
                let g = engine.generate(&request(&case.ids, 0, Some(TOP)))?;
                ensure!(g.tokens.is_empty(), "{name} case {i}: max_tokens 0 generated {:?}", g.tokens);
                ensure!(g.finish_reason == FinishReason::Length);
                check(&format!("{name} case {i}"), case, &g.prompt_logprobs)?;
            }
        }
        Ok(())
    }
}

on_each_device! {
    /// The same numbers when the prefill is cut into chunks of 1, 3 and 7 tokens, with every
    /// prompt of a fixture prefilled in one batch beside a sequence that asks for none.
    chunked_prefill_gives_the_same_prompt_logprobs, chunked_prefill_gives_the_same_prompt_logprobs_on_cuda, |device| {
        for (name, dir, cases) in fixtures_on(device)? {
            let engine = load_engine(&dir, device)?;
            for budget in [1, 3, 7] {
                let mut seqs = vec![engine.start(request(&cases[0].ids, 4, None))?];
                for case in &cases {
                    seqs.push(engine.start(request(&case.ids, 1, Some(TOP)))?);
                }
                run(&engine, &mut seqs, budget)?;
                ensure!(seqs[0].prompt_logprobs.is_empty(), "{name}: a sequence that asked for none got some");
                ensure!(seqs[0].tokens.len() == 4);
                for (i, (case, seq)) in cases.iter().zip(&seqs[1..]).enumerate() {
                    ensure!(seq.tokens.len() == 1, "{name} case {i}: max_tokens 1 generated {}", seq.tokens.len());
                    check(&format!("{name} case {i}, chunks of {budget}"), case, &seq.prompt_logprobs)?;
                }
            }
        }
        Ok(())
    }
}

#[test]
fn prompt_logprobs_are_handed_out_once_when_the_prompt_is_fed() -> Result<()> {
    let (_, dir, cases) = fixtures()?.remove(0);
    let engine = load_engine(&dir, Device::Cpu)?;
    let case = &cases[0];
    let mut seq = engine.start(request(&case.ids, 2, Some(0)))?;
    engine.step(&mut [&mut seq], 2)?;
    ensure!(seq.take_prompt_logprobs().is_none(), "handed out before the prompt is fed");
    while !seq.is_decoding() {
        engine.step(&mut [&mut seq], 2)?;
    }
    let got = seq.take_prompt_logprobs().context("nothing once the prompt is fed")?;
    ensure!(got.len() == case.ids.len() - 1 && got.iter().all(|p| p.top_logprobs.is_empty()));
    ensure!(seq.take_prompt_logprobs().is_none(), "handed out twice");
    Ok(())
}
