//! The CUDA backend against the CPU backend, the reference semantics: the same operation on
//! the same inputs gives the same result (to 1e-4 of the largest value where sums run in
//! another order; exactly for ids, copies and `combine_rows`), and the same wrong arguments
//! are refused with the same kind of error.
//!
//! Every test needs a CUDA GPU and is `#[ignore]`d, so a machine without one reports them as
//! skipped, never as passed; on a GPU machine `cargo nextest run --features switchyard/cuda
//! --run-ignored only` runs them. Run on purpose, a test fails when device 0 cannot be opened.
#![cfg(feature = "cuda")]

use std::mem::discriminant;
use std::sync::OnceLock;

use half::bf16;
use switchyard_kernels::backend::{Attention, Combine, Gate, KvLayout, SeqSpan};
use switchyard_kernels::cpu::Precision;
use switchyard_kernels::{Backend, CpuBackend, CudaBackend, Device, Format, KernelError, Tensor, Weight};

/// Device 0, opened once for every test (opening compiles the kernels).
fn gpu() -> &'static CudaBackend {
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    GPU.get_or_init(|| CudaBackend::open(0).unwrap_or_else(|e| panic!("opening cuda:0: {e}")))
}

/// `n` deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn up(b: &dyn Backend, v: &[f32], rows: usize, cols: usize) -> Tensor {
    b.upload(v, rows, cols).unwrap_or_else(|e| panic!("upload on {}: {e}", b.device()))
}

fn down(b: &dyn Backend, t: &Tensor) -> Vec<f32> {
    b.download(t).unwrap_or_else(|e| panic!("download on {}: {e}", b.device()))
}

/// Checks `got` is `want` to `rel` of `want`'s largest magnitude.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}: element {i} is {g} on CUDA, {w} on the CPU (scale {scale})");
    }
}

/// Runs `f` on both backends and checks the results agree to `rel`.
fn parity(what: &str, rel: f32, f: impl Fn(&dyn Backend) -> Vec<f32>) {
    let want = f(&CpuBackend);
    let got = f(gpu());
    assert_close(what, &got, &want, rel);
}

/// Runs `f` on both backends and checks both refuse it with the same kind of error.
fn refused(what: &str, f: impl Fn(&dyn Backend) -> Result<(), KernelError>) {
    let on_cpu = f(&CpuBackend).expect_err(&format!("{what}: the CPU accepted it"));
    let on_gpu = f(gpu()).expect_err(&format!("{what}: CUDA accepted it"));
    assert_eq!(discriminant(&on_cpu), discriminant(&on_gpu), "{what}: the CPU says `{on_cpu}`, CUDA `{on_gpu}`");
}

fn bf16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn linear_matches_cpu_on_the_kernel_and_cublas_paths() {
    // k = 64 reads weights in 16-byte packs; k = 36 is not whole bf16 packs.
    for (n, k) in [(24, 64), (10, 36)] {
        for format in [Format::BF16, Format::F16, Format::F32] {
            for bias in [None, Some(values(n, 7))] {
                let w = Weight::from_f32(format, n, k, &values(n * k, 3), bias.clone()).unwrap();
                for m in [1, 5, 40] {
                    let x = values(m * k, 11 + m as u64);
                    let what = format!("linear {} [{m}, {k}] x [{n}, {k}], bias {}", format.name(), bias.is_some());
                    parity(&what, 1e-4, |b| {
                        let w = b.upload_weight(&w).unwrap();
                        down(b, &b.linear(&up(b, &x, m, k), &w, Precision::F32).unwrap())
                    });
                    // bf16 products: cuBLAS from 32 rows, against bf16-rounded activations.
                    let want =
                        CpuBackend.linear(&up(&CpuBackend, &bf16_rounded(&x), m, k), &w, Precision::F32).unwrap();
                    let g = gpu();
                    let gw = g.upload_weight(&w).unwrap();
                    let got = down(g, &g.linear(&up(g, &x, m, k), &gw, Precision::Bf16Products).unwrap());
                    if format == Format::BF16 && m >= 32 {
                        assert_close(&format!("{what}, bf16 products"), &got, want.as_host().unwrap(), 1e-4);
                    } else {
                        let f32_want = CpuBackend.linear(&up(&CpuBackend, &x, m, k), &w, Precision::F32).unwrap();
                        assert_close(&format!("{what}, bf16 products"), &got, f32_want.as_host().unwrap(), 1e-4);
                    }
                }
            }
        }
    }
}

/// `slots` random `[n, k]` experts in `format` (with biases if asked), slot 1 empty.
fn expert_slots(format: Format, n: usize, k: usize, slots: usize, with_bias: bool) -> Vec<Option<Weight>> {
    (0..slots)
        .map(|e| {
            let bias = with_bias.then(|| values(n, 40 + e as u64));
            (e != 1).then(|| Weight::from_f32(format, n, k, &values(n * k, 20 + e as u64), bias).unwrap())
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn grouped_linear_matches_cpu_with_empty_slots_and_uneven_counts() {
    let (n, k) = (24, 64);
    // Slot 1 holds no expert; slot 3 holds one that gets no rows; slot 2 has enough rows for
    // cuBLAS; slot 0 spans two tiles.
    let counts = [9, 0, 40, 0, 1];
    let total: usize = counts.iter().sum();
    let x = values(total * k, 5);
    for format in [Format::BF16, Format::F16, Format::F32] {
        for with_bias in [false, true] {
            let slots = expert_slots(format, n, k, counts.len(), with_bias);
            let run = |b: &dyn Backend, x: &[f32], precision| {
                let g =
                    b.group(slots.iter().map(|w| w.as_ref().map(|w| b.upload_weight(w).unwrap())).collect()).unwrap();
                down(b, &b.grouped_linear(&up(b, x, total, k), &g, &counts, precision).unwrap())
            };
            let what = format!("grouped_linear {}, bias {with_bias}", format.name());
            parity(&what, 1e-4, |b| run(b, &x, Precision::F32));
            // bf16 products: slot 2's 40 rows go to cuBLAS (bf16 weights: on bf16-rounded
            // activations; f32 weights: f32 GEMM), every other row to the grouped kernel.
            let mut reference = x.clone();
            if format == Format::BF16 {
                let rows = 9 * k..49 * k;
                reference[rows.clone()].copy_from_slice(&bf16_rounded(&x[rows]));
            }
            let want = run(&CpuBackend, &reference, Precision::F32);
            assert_close(&format!("{what}, bf16 products"), &run(gpu(), &x, Precision::Bf16Products), &want, 1e-4);
        }
    }
}

/// The quantized formats and the `[n, k]` shapes they are checked at: MXFP4 rows of 3 blocks
/// and of gpt-oss-20b's 90 (2880 values: not a power of two of blocks); FP8 with 3 × 5 blocks
/// (a 16-value pack spans several scales) on rows that are not whole packs (37, read value by
/// value) and that are (96), and with DeepSeek's 128 × 128 blocks; every FP8 shape has partial
/// edge blocks along both dimensions.
fn quantized_cases() -> Vec<(Format, usize, usize)> {
    vec![
        (Format::Mxfp4, 10, 96),
        (Format::Mxfp4, 24, 2880),
        (Format::Fp8 { block: [3, 5] }, 10, 37),
        (Format::Fp8 { block: [3, 5] }, 24, 96),
        (Format::Fp8 { block: [128, 128] }, 200, 320),
    ]
}

fn describe(format: Format) -> String {
    match format {
        Format::Fp8 { block } => format!("FP8 {block:?}"),
        f => f.name().to_string(),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn quantized_linear_matches_cpu() {
    for (format, n, k) in quantized_cases() {
        for bias in [None, Some(values(n, 7))] {
            let w = Weight::from_f32(format, n, k, &values(n * k, 3), bias.clone()).unwrap();
            for m in [1, 5, 40] {
                let x = values(m * k, 11 + m as u64);
                // Quantized weights never take cuBLAS: bf16 products change nothing, on 40
                // rows either.
                for precision in [Precision::F32, Precision::Bf16Products] {
                    let what = format!(
                        "linear {} [{m}, {k}] x [{n}, {k}], bias {}, {precision:?}",
                        describe(format),
                        bias.is_some()
                    );
                    parity(&what, 1e-4, |b| {
                        let w = b.upload_weight(&w).unwrap();
                        down(b, &b.linear(&up(b, &x, m, k), &w, precision).unwrap())
                    });
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn quantized_grouped_linear_matches_cpu() {
    // Slot 1 holds no expert, slot 3 one that gets no rows; the others get 9 (two tiles), 40,
    // 1 and 5 rows.
    let counts = [9, 0, 40, 0, 1, 5];
    let total: usize = counts.iter().sum();
    for (format, n, k) in quantized_cases() {
        let x = values(total * k, 5);
        for with_bias in [false, true] {
            let slots = expert_slots(format, n, k, counts.len(), with_bias);
            for precision in [Precision::F32, Precision::Bf16Products] {
                let what = format!("grouped_linear {} [{n}, {k}], bias {with_bias}, {precision:?}", describe(format));
                parity(&what, 1e-4, |b| {
                    let g = b
                        .group(slots.iter().map(|w| w.as_ref().map(|w| b.upload_weight(w).unwrap())).collect())
                        .unwrap();
                    down(b, &b.grouped_linear(&up(b, &x, total, k), &g, &counts, precision).unwrap())
                });
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn quantized_weights_are_refused_where_cuda_cannot_read_them() {
    let g = gpu();
    // The CUDA embedding reads dense tables only: refused by name, never a wrong row.
    for format in [Format::Mxfp4, Format::Fp8 { block: [2, 2] }] {
        let table = g.upload_weight(&Weight::from_f32(format, 4, 32, &values(4 * 32, 1), None).unwrap()).unwrap();
        assert_eq!(table.size_in_bytes(), Weight::from_f32(format, 4, 32, &[0.0; 128], None).unwrap().size_in_bytes());
        let e = g.embed(&table, &[0, 3]).unwrap_err();
        assert!(matches!(e, KernelError::Unsupported { .. }) && e.to_string().contains(format.name()), "{e}");
    }
    // Experts of one shape but two FP8 scale blocks, or two formats, share no group.
    let w = |format| Weight::from_f32(format, 6, 32, &values(6 * 32, 2), None).unwrap();
    let pairs = [
        (Format::Fp8 { block: [3, 5] }, Format::Fp8 { block: [5, 3] }),
        (Format::Mxfp4, Format::Fp8 { block: [3, 5] }),
        (Format::Mxfp4, Format::BF16),
    ];
    for (a, b_) in pairs {
        refused(&format!("group of {} and {}", describe(a), describe(b_)), |b| {
            b.group(vec![Some(b.upload_weight(&w(a))?), None, Some(b.upload_weight(&w(b_))?)]).map(drop)
        });
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn non_finite_rows_match_cpu() {
    // Rows wider than one block of threads, a NaN, both infinities and a large finite value.
    let (rows, cols) = (6, 1000);
    let mut v = values(rows * cols, 11);
    v[cols + 999] = f32::NAN;
    v[3 * cols] = f32::INFINITY;
    v[4 * cols + 500] = f32::NEG_INFINITY;
    v[5 * cols + 1] = f32::MAX;
    let want = CpuBackend.non_finite_rows(&up(&CpuBackend, &v, rows, cols)).unwrap();
    assert_eq!(want, vec![1, 3, 4]);
    assert_eq!(gpu().non_finite_rows(&up(gpu(), &v, rows, cols)).unwrap(), want);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn norms_match_cpu_over_rows_and_heads() {
    let (rows, heads, hd) = (5, 4, 32);
    let x = values(rows * heads * hd, 1);
    for d in [heads * hd, hd] {
        let w = values(d, 2);
        parity(&format!("rms_norm of rows of {d}"), 1e-4, |b| {
            down(b, &b.rms_norm(&up(b, &x, rows, heads * hd), &up(b, &w, 1, d), 1e-5).unwrap())
        });
        parity(&format!("rms_norm_inplace of rows of {d}"), 1e-4, |b| {
            let mut t = up(b, &x, rows, heads * hd);
            b.rms_norm_inplace(&mut t, &up(b, &w, 1, d), 1e-5).unwrap();
            down(b, &t)
        });
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn rope_and_activations_match_cpu() {
    let (rows, heads, hd) = (6, 3, 16);
    let x = values(rows * heads * hd, 1);
    let angles: Vec<f32> =
        (0..rows * hd / 2).map(|i| (i / (hd / 2)) as f32 * 0.1 * (1 + i % (hd / 2)) as f32).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    parity("rope", 1e-5, |b| {
        let mut t = up(b, &x, rows, heads * hd);
        b.rope(&mut t, &up(b, &cos, rows, hd / 2), &up(b, &sin, rows, hd / 2), heads).unwrap();
        down(b, &t)
    });
    let (g, u) = (values(rows * 40, 2), values(rows * 40, 3));
    parity("swiglu", 1e-5, |b| down(b, &b.swiglu(&up(b, &g, rows, 40), &up(b, &u, rows, 40)).unwrap()));
    let gate_up: Vec<f32> = values(rows * 40, 4).iter().map(|v| v * 10.0).collect();
    parity("clamped_swiglu", 1e-5, |b| down(b, &b.clamped_swiglu(&up(b, &gate_up, rows, 40), 1.702, 7.0).unwrap()));
    let gates = values(rows, 5);
    parity("scale_rows_sigmoid", 1e-5, |b| {
        let mut y = up(b, &g, rows, 40);
        b.scale_rows_sigmoid(&mut y, &up(b, &gates, rows, 1)).unwrap();
        down(b, &y)
    });
    parity("add and clip", 0.0, |b| {
        let mut y = up(b, &g, rows, 40);
        b.add(&mut y, &up(b, &u, rows, 40)).unwrap();
        b.clip(&mut y, 0.5).unwrap();
        down(b, &y)
    });
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn gathers_and_embeddings_are_exact_copies() {
    let x = values(7 * 12, 1);
    parity("gather_rows", 0.0, |b| down(b, &b.gather_rows(&up(b, &x, 7, 12), &[6, 0, 0, 3]).unwrap()));
    parity("gather_rows of none", 0.0, |b| down(b, &b.gather_rows(&up(b, &x, 7, 12), &[]).unwrap()));
    for format in [Format::BF16, Format::F16, Format::F32] {
        let table = Weight::from_f32(format, 50, 24, &values(50 * 24, 2), None).unwrap();
        parity(&format!("embed {}", format.name()), 0.0, |b| {
            down(b, &b.embed(&b.upload_weight(&table).unwrap(), &[49, 0, 7, 7]).unwrap())
        });
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn top_k_gates_pick_the_same_experts() {
    let gates = [Gate::SoftmaxTopK { renormalize: true }, Gate::SoftmaxTopK { renormalize: false }, Gate::TopKSoftmax];
    for (tokens, experts, ks) in [(9, 64, &[1, 4, 8][..]), (3, 256, &[32][..])] {
        // Distinct logits 0.05 apart (37 is prime to the expert count), but row 0's best two,
        // experts 3 and 5, tie.
        let mut logits: Vec<f32> =
            (0..tokens * experts).map(|i| ((i % experts * 37 + i / experts * 11) % experts) as f32 * 0.05).collect();
        let best = experts as f32 * 0.05 + 1.0;
        logits[3] = best;
        logits[5] = best;
        for &k in ks {
            for gate in gates {
                let what = format!("top-{k} of {experts} by {gate:?}");
                let want = CpuBackend.top_k_gate(&up(&CpuBackend, &logits, tokens, experts), k, gate).unwrap();
                let got = gpu().top_k_gate(&up(gpu(), &logits, tokens, experts), k, gate).unwrap();
                assert_eq!(got.ids, want.ids, "{what}: ids");
                assert_eq!(got.ids[0], 3, "{what}: ties go to the lower id");
                assert_close(&what, &got.weights, &want.weights, 1e-5);
            }
        }
    }
    // Beyond the device gate's limits: refused, not truncated.
    let wide = up(gpu(), &values(2 * 300, 1), 2, 300);
    assert!(matches!(gpu().top_k_gate(&wide, 2, gates[0]), Err(KernelError::Unsupported { .. })));
    let many = up(gpu(), &values(2 * 64, 1), 2, 64);
    assert!(matches!(gpu().top_k_gate(&many, 33, gates[0]), Err(KernelError::Unsupported { .. })));
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn combine_rows_adds_in_entry_order_exactly_as_the_cpu() {
    let y = values(10 * 24, 1);
    // Token 0: three entries (one source twice); token 1: none; token 2: one.
    let c = Combine { start: vec![0, 3, 3, 4], src: vec![9, 2, 9, 0], weight: vec![0.7, 0.2, 0.1, 1.0] };
    parity("combine_rows", 0.0, |b| down(b, &b.combine_rows(&up(b, &y, 10, 24), &c).unwrap()));
}

/// One forward pass's KV writes over every layer, then layer 1's attention with and without
/// a window and sinks; returns the attention outputs.
fn kv_pass(b: &dyn Backend, arena: &mut Tensor, layout: KvLayout, spans: &[SeqSpan<'_>], seed: u64) -> Vec<f32> {
    let heads = 4;
    let batch = b.kv_batch(layout, arena, spans).unwrap();
    let (tokens, width) = (batch.tokens(), layout.kv_heads * layout.head_dim);
    for layer in 0..layout.layers {
        let k = up(b, &values(tokens * width, seed + 2 * layer as u64), tokens, width);
        let v = up(b, &values(tokens * width, seed + 2 * layer as u64 + 1), tokens, width);
        b.kv_write(arena, &batch, layer, &k, &v).unwrap();
    }
    let q = up(b, &values(tokens * heads * layout.head_dim, seed + 10), tokens, heads * layout.head_dim);
    let sinks = up(b, &values(heads, seed + 11), 1, heads);
    let mut out = Vec::new();
    for (sliding_window, sinks) in [(None, None), (Some(5), Some(&sinks)), (Some(1), None), (None, Some(&sinks))] {
        let p = Attention { layer: 1, heads, scale: 0.3, sliding_window, sinks };
        out.extend(down(b, &b.attention(&q, arena, &batch, p).unwrap()));
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn kv_cache_and_attention_match_cpu_for_sequences_sharing_an_arena() {
    let layout = KvLayout::per_head(2, 2, 40);
    let (a, b_) = ([5u32, 2], [0u32]);
    let mut arenas = Vec::new();
    for b in [&CpuBackend as &dyn Backend, gpu()] {
        let mut arena = b.kv_arena(layout, 8).unwrap();
        // A prompt of 20 tokens (two blocks) and one of 3 in one pass, then a decode step of
        // the first and two more tokens of the second.
        let prefill =
            [SeqSpan { tokens: 20, first_pos: 0, blocks: &a }, SeqSpan { tokens: 3, first_pos: 0, blocks: &b_ }];
        let decode =
            [SeqSpan { tokens: 1, first_pos: 20, blocks: &a }, SeqSpan { tokens: 2, first_pos: 3, blocks: &b_ }];
        let mut out = kv_pass(b, &mut arena, layout, &prefill, 1);
        out.extend(kv_pass(b, &mut arena, layout, &decode, 100));
        arenas.push((out, down(b, &arena)));
    }
    let ((want, want_arena), (got, got_arena)) = (&arenas[0], &arenas[1]);
    assert_eq!(got_arena, want_arena, "the arena after the writes");
    assert_close("attention", got, want, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn greedy_picks_the_same_ids_with_ties_to_the_lower() {
    let v = 1000;
    let mut logits: Vec<f32> = values(5 * v, 1).iter().map(|x| x * 8.0).collect();
    logits[3 * v + 17] = 20.0;
    logits[3 * v + 700] = 20.0;
    logits[4 * v..].fill(0.0);
    let want = CpuBackend.greedy(&up(&CpuBackend, &logits, 5, v)).unwrap();
    let got = gpu().greedy(&up(gpu(), &logits, 5, v)).unwrap();
    let ids = |p: &[(u32, f32)]| p.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&want));
    assert_eq!((got[3].0, got[4].0), (17, 0));
    for ((_, g), (_, w)) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "log-probability {g} on CUDA, {w} on the CPU");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn wrong_sizes_are_refused_on_both_backends() {
    let w = |rows, cols| Weight::from_f32(Format::BF16, rows, cols, &values(rows * cols, 1), None).unwrap();
    let t = |b: &dyn Backend, rows, cols| up(b, &values(rows * cols, 2), rows, cols);
    refused("upload of 5 values as [2, 3]", |b| b.upload(&[0.0; 5], 2, 3).map(drop));
    refused("linear of [2, 3] by [4, 5]", |b| {
        b.linear(&t(b, 2, 3), &b.upload_weight(&w(4, 5))?, Precision::F32).map(drop)
    });
    refused("embed of id 3 of 3", |b| b.embed(&b.upload_weight(&w(3, 4))?, &[0, 3]).map(drop));
    refused("rms_norm of [2, 5] by 3", |b| b.rms_norm(&t(b, 2, 5), &t(b, 1, 3), 1e-5).map(drop));
    refused("rms_norm_inplace of [2, 5] by 3", |b| b.rms_norm_inplace(&mut t(b, 2, 5), &t(b, 1, 3), 1e-5));
    refused("rope with short sin", |b| b.rope(&mut t(b, 2, 8), &t(b, 2, 2), &t(b, 1, 2), 2));
    refused("rope with the wrong heads", |b| b.rope(&mut t(b, 2, 8), &t(b, 2, 2), &t(b, 2, 2), 3));
    refused("add of [2, 3] to [3, 2]", |b| b.add(&mut t(b, 3, 2), &t(b, 2, 3)));
    refused("swiglu of [2, 3] by [2, 4]", |b| b.swiglu(&t(b, 2, 3), &t(b, 2, 4)).map(drop));
    refused("clamped_swiglu of 3 columns", |b| b.clamped_swiglu(&t(b, 2, 3), 1.702, 7.0).map(drop));
    refused("scale_rows_sigmoid by 2 gates for 3 rows", |b| b.scale_rows_sigmoid(&mut t(b, 3, 2), &t(b, 2, 1)));
    refused("gather_rows of row 2 of 2", |b| b.gather_rows(&t(b, 2, 3), &[0, 2]).map(drop));
    refused("top-0 gate", |b| b.top_k_gate(&t(b, 2, 8), 0, Gate::TopKSoftmax).map(drop));
    refused("top-9 gate of 8", |b| b.top_k_gate(&t(b, 2, 8), 9, Gate::TopKSoftmax).map(drop));
    refused("group of two shapes", |b| {
        b.group(vec![Some(b.upload_weight(&w(4, 5))?), Some(b.upload_weight(&w(4, 6))?)]).map(drop)
    });
    let grouped = |b: &dyn Backend, x: Tensor, counts: &[usize]| {
        let g = b.group(vec![Some(b.upload_weight(&w(4, 6))?), None])?;
        b.grouped_linear(&x, &g, counts, Precision::F32).map(drop)
    };
    refused("grouped_linear with 3 counts for 2 slots", |b| grouped(b, t(b, 2, 6), &[2, 0, 0]));
    refused("grouped_linear of rows for an empty slot", |b| grouped(b, t(b, 2, 6), &[1, 1]));
    refused("grouped_linear of 3 rows for 2 counted", |b| grouped(b, t(b, 3, 6), &[2, 0]));
    refused("grouped_linear of 5 columns", |b| grouped(b, t(b, 2, 5), &[2, 0]));
    let bad_source = Combine { start: vec![0, 2], src: vec![0, 5], weight: vec![1.0, 1.0] };
    refused("combine_rows from row 5 of 2", |b| b.combine_rows(&t(b, 2, 3), &bad_source).map(drop));
    let bad_start = Combine { start: vec![1, 2], src: vec![0, 1], weight: vec![1.0, 1.0] };
    refused("combine_rows starting at 1", |b| b.combine_rows(&t(b, 2, 3), &bad_start).map(drop));
    let short = Combine { start: vec![0, 2], src: vec![0], weight: vec![1.0] };
    refused("combine_rows of 2 entries listing 1", |b| b.combine_rows(&t(b, 2, 3), &short).map(drop));

    let layout = KvLayout::per_head(2, 2, 8);
    let (two, far) = ([0u32, 1], [7u32]);
    let span = [SeqSpan { tokens: 3, first_pos: 0, blocks: &two }];
    refused("kv_batch past its blocks", |b| {
        let arena = b.kv_arena(layout, 2)?;
        b.kv_batch(layout, &arena, &[SeqSpan { tokens: 1, first_pos: 40, blocks: &two }]).map(drop)
    });
    refused("kv_batch of block 7 of 2", |b| {
        let arena = b.kv_arena(layout, 2)?;
        b.kv_batch(layout, &arena, &[SeqSpan { tokens: 1, first_pos: 0, blocks: &far }]).map(drop)
    });
    refused("kv_batch of an arena of another layout", |b| {
        let arena = b.kv_arena(KvLayout { head_dim: 4, ..layout }, 2)?;
        b.kv_batch(layout, &arena, &span).map(drop)
    });
    let kv = |b: &dyn Backend, layer, k_cols, v_cols| {
        let mut arena = b.kv_arena(layout, 2)?;
        let batch = b.kv_batch(layout, &arena, &span)?;
        b.kv_write(&mut arena, &batch, layer, &t(b, 3, k_cols), &t(b, 3, v_cols))
    };
    refused("kv_write of layer 2 of 2", |b| kv(b, 2, 16, 16));
    refused("kv_write of narrow keys", |b| kv(b, 0, 8, 16));
    refused("kv_write of narrow values", |b| kv(b, 0, 16, 12));
    refused("kv_write into another arena", |b| {
        let arena = b.kv_arena(layout, 2)?;
        let batch = b.kv_batch(layout, &arena, &span)?;
        b.kv_write(&mut b.kv_arena(layout, 3)?, &batch, 0, &t(b, 3, 16), &t(b, 3, 16))
    });
    let attend = |b: &dyn Backend, q_cols, heads, sinks: usize| {
        let arena = b.kv_arena(layout, 2)?;
        let batch = b.kv_batch(layout, &arena, &span)?;
        let sinks = t(b, 1, sinks);
        let p = Attention { layer: 1, heads, scale: 0.3, sliding_window: None, sinks: Some(&sinks) };
        b.attention(&t(b, 3, q_cols), &arena, &batch, p).map(drop)
    };
    refused("attention of narrow queries", |b| attend(b, 24, 4, 4));
    refused("attention of 3 heads over 2 KV heads", |b| attend(b, 24, 3, 3));
    refused("attention with 3 sinks for 4 heads", |b| attend(b, 32, 4, 3));
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn tensors_of_another_device_are_refused() {
    let (cpu, g) = (&CpuBackend, gpu());
    let (on_cpu, on_gpu) = (up(cpu, &[1.0; 6], 2, 3), up(g, &[1.0; 6], 2, 3));
    let wrong = |r: Result<Tensor, KernelError>| matches!(r, Err(KernelError::WrongDevice { .. }));
    assert!(wrong(g.swiglu(&on_cpu, &on_cpu)));
    assert!(wrong(cpu.swiglu(&on_gpu, &on_gpu)));
    assert!(wrong(g.swiglu(&on_gpu, &on_cpu)));
    let w = Weight::from_f32(Format::F32, 4, 3, &[0.5; 12], Some(vec![1.0; 4])).unwrap();
    assert!(wrong(g.linear(&on_gpu, &w, Precision::F32)));
    assert!(wrong(cpu.linear(&on_cpu, &g.upload_weight(&w).unwrap(), Precision::F32)));
    assert!(matches!(g.download(&on_cpu), Err(KernelError::WrongDevice { .. })));
    // A batch made by the CPU has no device tables.
    let layout = KvLayout::per_head(1, 1, 4);
    let blocks = [0u32];
    let span = [SeqSpan { tokens: 1, first_pos: 0, blocks: &blocks }];
    let cpu_batch = cpu.kv_batch(layout, &cpu.kv_arena(layout, 1).unwrap(), &span).unwrap();
    let mut arena = g.kv_arena(layout, 1).unwrap();
    let k = up(g, &[1.0; 4], 1, 4);
    assert!(matches!(g.kv_write(&mut arena, &cpu_batch, 0, &k, &k), Err(KernelError::WrongDevice { .. })));
}

#[test]
#[ignore = "needs a CUDA GPU: cargo nextest run --features switchyard/cuda --run-ignored only"]
fn device_reports_itself() {
    let g = gpu();
    assert_eq!(g.device(), Device::Cuda(0));
    assert!(g.describe().starts_with("cuda:0 ("), "{}", g.describe());
    let (free, total) = g.memory().unwrap().expect("a CUDA device reports its memory");
    assert!(0 < free && free <= total);
    assert!(g.read_bandwidth(64 << 20, 2).unwrap() > 1e9);
    let t = g.zeros(3, 0).unwrap();
    assert_eq!((t.rows(), t.cols(), down(g, &t)), (3, 0, vec![]));
}
