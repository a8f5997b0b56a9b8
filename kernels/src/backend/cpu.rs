//! [`CpuBackend`]: the forward pass's operations in host memory, on the kernels of
//! [`crate::cpu`] (rayon-parallel, AVX-512 where the CPU has it).

use rayon::prelude::*;

use super::{Attention, Backend, Combine, Gate, Grouped, KvBatch, KvLayout, Mla, MlaForm, SeqSpan, TopK, check};
use crate::cpu::{self, Precision, activation, attention, mla, norm, routing};
use crate::error::{KernelError, Result};
use crate::tensor::Data;
use crate::weight::WeightData;
use crate::{Device, Tensor, Weight, Weights};

/// The host: every tensor in RAM, weights read in place from their (memory-mapped) bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

fn host(rows: usize, cols: usize, values: Vec<f32>) -> Tensor {
    debug_assert_eq!(values.len(), rows * cols);
    Tensor::from_data(rows, cols, Data::HostF32(values))
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn describe(&self) -> String {
        format!("cpu ({}, {} threads)", cpu::isa(), rayon::current_num_threads())
    }

    fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Result<Tensor> {
        Tensor::host(rows, cols, values.to_vec())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<Tensor> {
        Ok(host(rows, cols, vec![0.0; rows * cols]))
    }

    fn download(&self, x: &Tensor) -> Result<Vec<f32>> {
        Ok(x.host_f32("download", "x")?.to_vec())
    }

    fn upload_weight(&self, w: &Weight) -> Result<Weight> {
        match &w.data {
            WeightData::Host { .. } => Ok(w.clone()),
            #[cfg(feature = "cuda")]
            WeightData::Cuda(_) => {
                Err(KernelError::WrongDevice { op: "upload_weight", arg: "w", expected: Device::Cpu, got: w.device() })
            }
        }
    }

    fn memory(&self) -> Result<Option<(usize, usize)>> {
        Ok(None)
    }

    fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        Ok(cpu::bandwidth::read_bandwidth(bytes, repeats))
    }

    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<Tensor> {
        check::embed(table, ids)?;
        let (view, _) = table.host_parts("embed", "table")?;
        let h = table.cols();
        let mut out = vec![0.0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h.max(1)).zip(ids) {
            view.to_f32_into(id as usize * h..(id as usize + 1) * h, row);
        }
        Ok(host(ids.len(), h, out))
    }

    fn linear(&self, x: &Tensor, w: &Weight, precision: Precision) -> Result<Tensor> {
        check::linear("linear", x, w)?;
        let (view, bias) = w.host_parts("linear", "weight")?;
        let (m, n, k) = (x.rows(), w.rows(), w.cols());
        let mut out = vec![0.0f32; m * n];
        cpu::linear_with(x.host_f32("linear", "x")?, view, bias, &mut out, [m, n, k], precision);
        Ok(host(m, n, out))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        check::norm("rms_norm", x, weight)?;
        let mut out = vec![0.0f32; x.len()];
        norm::rms_norm(x.host_f32("rms_norm", "x")?, weight.host_f32("rms_norm", "weight")?, eps, &mut out);
        Ok(host(x.rows(), x.cols(), out))
    }

    fn rms_norm_inplace(&self, x: &mut Tensor, weight: &Tensor, eps: f32) -> Result<()> {
        check::norm("rms_norm", x, weight)?;
        let w = weight.host_f32("rms_norm", "weight")?;
        norm::rms_norm_inplace(x.host_f32_mut("rms_norm", "x")?, w, eps);
        Ok(())
    }

    fn rope(&self, x: &mut Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<()> {
        let head_dim = check::rope(x, cos, sin, heads)?;
        let rows = x.rows();
        let (c, s) = (cos.host_f32("rope", "cos")?, sin.host_f32("rope", "sin")?);
        cpu::rope::apply_rope(x.host_f32_mut("rope", "x")?, rows, heads, head_dim, c, s);
        Ok(())
    }

    fn clip(&self, x: &mut Tensor, limit: f32) -> Result<()> {
        check::clip(limit)?;
        x.host_f32_mut("clip", "x")?.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
        Ok(())
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        check::same_shape("add", "y", x, y)?;
        let y = y.host_f32("add", "y")?;
        x.host_f32_mut("add", "x")?.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        check::same_shape("swiglu", "up", gate, up)?;
        let mut out = vec![0.0f32; gate.len()];
        activation::swiglu(gate.host_f32("swiglu", "gate")?, up.host_f32("swiglu", "up")?, &mut out);
        Ok(host(gate.rows(), gate.cols(), out))
    }

    fn clamped_swiglu(&self, gate_up: &Tensor, alpha: f32, limit: f32) -> Result<Tensor> {
        if !gate_up.cols().is_multiple_of(2) {
            return Err(KernelError::shape("clamped_swiglu", "gate_up", "an even number of columns", gate_up.shape()));
        }
        let mut out = vec![0.0f32; gate_up.len() / 2];
        activation::clamped_swiglu_interleaved(gate_up.host_f32("clamped_swiglu", "gate_up")?, alpha, limit, &mut out);
        Ok(host(gate_up.rows(), gate_up.cols() / 2, out))
    }

    fn scale_rows_sigmoid(&self, y: &mut Tensor, gate: &Tensor) -> Result<()> {
        gate.expect_len("scale_rows_sigmoid", "gate", y.rows())?;
        let g = gate.host_f32("scale_rows_sigmoid", "gate")?;
        let cols = y.cols().max(1);
        for (row, &g) in y.host_f32_mut("scale_rows_sigmoid", "y")?.chunks_exact_mut(cols).zip(g) {
            let s = activation::sigmoid(g);
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        check::gather(x, rows)?;
        let (src, h) = (x.host_f32("gather_rows", "x")?, x.cols());
        let mut out = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            out.extend_from_slice(&src[r as usize * h..(r as usize + 1) * h]);
        }
        Ok(host(rows.len(), h, out))
    }

    fn non_finite_rows(&self, x: &Tensor) -> Result<Vec<u32>> {
        let values = x.host_f32("non_finite_rows", "x")?;
        if x.cols() == 0 {
            return Ok(Vec::new());
        }
        // A fold rather than `any`: no branch per value, so the loop vectorises.
        Ok(values
            .chunks_exact(x.cols())
            .enumerate()
            .filter(|(_, row)| row.iter().fold(false, |bad, v| bad | !v.is_finite()))
            .map(|(r, _)| r as u32)
            .collect())
    }

    fn top_k_gate(&self, logits: &Tensor, k: usize, gate: Gate) -> Result<TopK> {
        check::top_k(logits, k)?;
        let e = logits.cols();
        let mut out =
            TopK { k, ids: Vec::with_capacity(logits.rows() * k), weights: Vec::with_capacity(logits.rows() * k) };
        for row in logits.host_f32("top_k_gate", "logits")?.chunks_exact(e) {
            match gate {
                Gate::SoftmaxTopK { renormalize } => {
                    let mut probs = row.to_vec();
                    routing::softmax(&mut probs);
                    let idx = routing::top_k(&probs, k);
                    let sum: f32 = if renormalize { idx.iter().map(|&i| probs[i]).sum() } else { 1.0 };
                    out.ids.extend(idx.iter().map(|&i| i as u32));
                    out.weights.extend(idx.iter().map(|&i| probs[i] / sum));
                }
                Gate::TopKSoftmax => {
                    let idx = routing::top_k(row, k);
                    let mut vals: Vec<f32> = idx.iter().map(|&i| row[i]).collect();
                    routing::softmax(&mut vals);
                    out.ids.extend(idx.iter().map(|&i| i as u32));
                    out.weights.extend(vals);
                }
            }
        }
        Ok(out)
    }

    fn group(&self, slots: Vec<Option<Weight>>) -> Result<Grouped> {
        check::group(&slots, Device::Cpu)?;
        Ok(Grouped {
            slots,
            #[cfg(feature = "cuda")]
            table: None,
        })
    }

    fn grouped_linear(&self, x: &Tensor, w: &Grouped, counts: &[usize], precision: Precision) -> Result<Tensor> {
        let n = check::grouped(x, w, counts)?;
        let k = x.cols();
        let xs = x.host_f32("grouped_linear", "x")?;
        let total: usize = counts.iter().sum();
        let mut out = vec![0.0f32; total * n];
        // Each slot's rows are one product; slots run in parallel on disjoint row ranges.
        let mut jobs = Vec::new();
        let (mut xr, mut or) = (xs, &mut out[..]);
        for (e, &c) in counts.iter().enumerate() {
            let (xa, xb) = xr.split_at(c * k);
            let (oa, ob) = or.split_at_mut(c * n);
            if c > 0 {
                let weight = w.weight(e).expect("checked: only held slots have rows");
                jobs.push((weight, xa, oa, c));
            }
            (xr, or) = (xb, ob);
        }
        jobs.into_par_iter().with_max_len(1).try_for_each(|(weight, x, out, m)| -> Result<()> {
            let (view, bias) = weight.host_parts("grouped_linear", "expert weight")?;
            cpu::linear_with(x, view, bias, out, [m, n, k], precision);
            Ok(())
        })?;
        Ok(host(total, n, out))
    }

    fn combine_rows(&self, y: &Tensor, c: &Combine) -> Result<Tensor> {
        c.check("combine_rows", y.rows())?;
        let (ys, h) = (y.host_f32("combine_rows", "y")?, y.cols());
        let mut out = vec![0.0f32; c.tokens() * h];
        for (t, dst) in out.chunks_exact_mut(h.max(1)).enumerate() {
            for j in c.start[t] as usize..c.start[t + 1] as usize {
                let (r, w) = (c.src[j] as usize, c.weight[j]);
                for (d, &v) in dst.iter_mut().zip(&ys[r * h..(r + 1) * h]) {
                    *d += v * w;
                }
            }
        }
        Ok(host(c.tokens(), h, out))
    }

    fn kv_arena(&self, layout: KvLayout, blocks: usize) -> Result<Tensor> {
        // Zeroed pages are only committed when first written, so an arena costs what its
        // sequences use.
        self.zeros(blocks, layout.block_floats())
    }

    fn kv_batch(&self, layout: KvLayout, arena: &Tensor, seqs: &[SeqSpan<'_>]) -> Result<KvBatch> {
        KvBatch::new(layout, arena, seqs)
    }

    fn kv_write(&self, arena: &mut Tensor, batch: &KvBatch, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        check::kv_write(batch, layer, k, v)?;
        batch.check_arena("kv_write", arena)?;
        let l = batch.layout;
        let (bf, hd, heads) = (l.block_floats(), l.head_dim, l.kv_heads);
        let (ks, vs) = (k.host_f32("kv_write", "k")?, v.host_f32("kv_write", "v")?);
        let cache = arena.host_f32_mut("kv_write", "arena")?;
        for (row0, n, first, blocks) in &batch.seqs {
            for i in 0..*n {
                let (pos, t) = (first + i, row0 + i);
                let base = blocks[pos / super::BLOCK_TOKENS] as usize * bf + (pos % super::BLOCK_TOKENS) * hd;
                for g in 0..heads {
                    let src = (t * heads + g) * hd;
                    for (kv, from) in [(0, ks), (1, vs)] {
                        let dst = base + l.offset(layer, g, kv);
                        cache[dst..dst + hd].copy_from_slice(&from[src..src + hd]);
                    }
                }
            }
        }
        Ok(())
    }

    fn attention(&self, q: &Tensor, arena: &Tensor, batch: &KvBatch, p: Attention<'_>) -> Result<Tensor> {
        check::attention(q, batch, &p)?;
        batch.check_arena("attention", arena)?;
        let l = batch.layout;
        let (hd, nh, nkv, bf) = (l.head_dim, p.heads, l.kv_heads, l.block_floats());
        let cache = arena.host_f32("attention", "arena")?;
        let qs = q.host_f32("attention", "q")?;
        let sinks = p.sinks.map(|s| s.host_f32("attention", "sinks")).transpose()?;
        let mut out = vec![0.0f32; q.len()];
        // Each sequence's rows are contiguous: split the output by sequence and run them in
        // parallel, each against its own positions.
        let mut pieces = Vec::with_capacity(batch.seqs.len());
        let mut rest = &mut out[..];
        for (row0, n, first, blocks) in &batch.seqs {
            let (a, b) = rest.split_at_mut(n * nh * hd);
            pieces.push((&qs[row0 * nh * hd..(row0 + n) * nh * hd], a, *n, *first, blocks));
            rest = b;
        }
        pieces.into_par_iter().with_max_len(1).for_each(|(q, o, n, first, blocks)| {
            let total = first + n;
            // One head's keys (kv = 0) or values (1) for positions 0 .. total, gathered in order.
            let gather = |g: usize, kv: usize| -> Vec<f32> {
                let off = l.offset(p.layer, g, kv);
                let mut v = Vec::with_capacity(total * hd);
                for (i, &b) in blocks.iter().enumerate() {
                    let rows = total.saturating_sub(i * super::BLOCK_TOKENS).min(super::BLOCK_TOKENS);
                    let start = b as usize * bf + off;
                    v.extend_from_slice(&cache[start..start + rows * hd]);
                }
                v
            };
            let keys: Vec<Vec<f32>> = (0..nkv).map(|g| gather(g, 0)).collect();
            let values: Vec<Vec<f32>> = (0..nkv).map(|g| gather(g, 1)).collect();
            let keys: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
            let values: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            let params = attention::AttentionParams {
                n_tokens: n,
                first_pos: first,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: p.scale,
                sliding_window: p.sliding_window,
                sinks,
            };
            attention::attention(q, &keys, &values, o, params);
        });
        Ok(host(q.rows(), q.cols(), out))
    }

    fn mla_write(
        &self,
        arena: &mut Tensor,
        batch: &KvBatch,
        layer: usize,
        latent: &Tensor,
        k_rope: &Tensor,
    ) -> Result<()> {
        check::mla_write(batch, layer, latent, k_rope)?;
        batch.check_arena("mla_write", arena)?;
        let l = batch.layout;
        let (bf, w, r) = (l.block_floats(), l.head_dim, latent.cols());
        let (cs, ks) = (latent.host_f32("mla_write", "latent")?, k_rope.host_f32("mla_write", "k_rope")?);
        let cache = arena.host_f32_mut("mla_write", "arena")?;
        for (row0, n, first, blocks) in &batch.seqs {
            for i in 0..*n {
                let (pos, t) = (first + i, row0 + i);
                let at = blocks[pos / super::BLOCK_TOKENS] as usize * bf
                    + l.offset(layer, 0, 0)
                    + (pos % super::BLOCK_TOKENS) * w;
                cache[at..at + r].copy_from_slice(&cs[t * r..(t + 1) * r]);
                cache[at + r..at + w].copy_from_slice(&ks[t * (w - r)..(t + 1) * (w - r)]);
            }
        }
        Ok(())
    }

    fn mla_attention(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        arena: &Tensor,
        batch: &KvBatch,
        p: Mla<'_>,
    ) -> Result<Tensor> {
        let op = "mla_attention";
        check::mla(q_nope, q_rope, batch, &p)?;
        batch.check_arena(op, arena)?;
        fn views<'w>(ws: &'w [Weight], arg: &'static str) -> Result<Vec<Weights<'w>>> {
            ws.iter().map(|w| w.host_parts("mla_attention", arg).map(|(v, _)| v)).collect()
        }
        let (uk, uk_t, uv) = (views(p.uk, "uk")?, views(p.uk_t, "uk_t")?, views(p.uv, "uv")?);
        let l = batch.layout;
        let (bf, w) = (l.block_floats(), l.head_dim);
        let cache = arena.host_f32(op, "arena")?;
        let (qn, qr) = (q_nope.host_f32(op, "q_nope")?, q_rope.host_f32(op, "q_rope")?);
        let (hn, hr, hv) = (p.heads * p.nope, p.heads * p.rope, p.heads * p.v);
        let mut out = vec![0.0f32; batch.tokens * hv];
        let mut pieces = Vec::with_capacity(batch.seqs.len());
        let mut rest = &mut out[..];
        for (row0, n, first, blocks) in &batch.seqs {
            let (a, b) = rest.split_at_mut(n * hv);
            pieces.push((row0, *n, *first, blocks, a));
            rest = b;
        }
        pieces.into_par_iter().with_max_len(1).filter(|piece| piece.1 > 0).for_each(|(row0, n, first, blocks, o)| {
            let total = first + n;
            // The sequence's latent rows of this layer, in position order.
            let mut latent = Vec::with_capacity(total * w);
            for (i, &b) in blocks.iter().enumerate() {
                let rows = total.saturating_sub(i * super::BLOCK_TOKENS).min(super::BLOCK_TOKENS);
                let start = b as usize * bf + l.offset(p.layer, 0, 0);
                latent.extend_from_slice(&cache[start..start + rows * w]);
            }
            let params = mla::MlaParams {
                n_tokens: n,
                first_pos: first,
                heads: p.heads,
                rank: p.rank,
                rope: p.rope,
                nope: p.nope,
                v: p.v,
                scale: p.scale,
            };
            let (q_nope, q_rope) = (&qn[row0 * hn..(row0 + n) * hn], &qr[row0 * hr..(row0 + n) * hr]);
            let expand = match p.form {
                MlaForm::Auto => params.prefers_expanded(),
                MlaForm::Absorbed => false,
                MlaForm::Expanded => true,
            };
            if expand {
                mla::expanded(q_nope, q_rope, &latent, (&uk, &uv), o, params);
            } else {
                mla::absorbed(q_nope, q_rope, &latent, (&uk_t, &uv), o, params);
            }
        });
        Ok(host(batch.tokens, hv, out))
    }

    fn greedy(&self, logits: &Tensor) -> Result<Vec<(u32, f32)>> {
        let v = logits.cols().max(1);
        Ok(logits
            .host_f32("greedy", "logits")?
            .chunks_exact(v)
            .map(|row| {
                let id = routing::argmax(row);
                (id, routing::log_prob(row, id as usize))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;

    #[test]
    fn wrong_sizes_are_errors_not_writes() {
        let b = CpuBackend;
        let x = b.upload(&[1.0; 6], 2, 3).unwrap();
        let w = Weight::from_f32(Format::F32, 4, 5, &[0.5; 20], None).unwrap();
        let e = b.linear(&x, &w, Precision::F32).unwrap_err().to_string();
        assert_eq!(e, "linear: `weight` has shape [4, 5], expected [_, 3]");
        let mut y = b.zeros(3, 2).unwrap();
        assert!(b.add(&mut y, &x).is_err());
        assert!(b.gather_rows(&x, &[0, 2]).unwrap_err().to_string().contains("row 2 of 2"));
        let table = Weight::from_f32(Format::BF16, 3, 2, &[0.0; 6], None).unwrap();
        assert!(b.embed(&table, &[3]).unwrap_err().to_string().contains("token id 3"));
        let bad = Combine { start: vec![0, 2], src: vec![0, 5], weight: vec![1.0, 1.0] };
        assert!(b.combine_rows(&x, &bad).unwrap_err().to_string().contains("source row 5"));
        let layout = KvLayout::per_head(1, 1, 2);
        let arena = b.kv_arena(layout, 2).unwrap();
        let too_far = SeqSpan { tokens: 1, first_pos: 40, blocks: &[0, 1] };
        assert!(b.kv_batch(layout, &arena, &[too_far]).is_err());
        let unknown_block = SeqSpan { tokens: 1, first_pos: 0, blocks: &[7] };
        assert!(b.kv_batch(layout, &arena, &[unknown_block]).unwrap_err().to_string().contains("block 7"));
    }

    #[test]
    fn grouped_products_equal_one_product_per_slot() {
        let b = CpuBackend;
        let w0 = Weight::from_f32(Format::BF16, 2, 3, &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], Some(vec![0.5, 0.5])).unwrap();
        let w2 = Weight::from_f32(Format::BF16, 2, 3, &[0.0, 0.0, 1.0, 1.0, 1.0, 1.0], Some(vec![0.0, 1.0])).unwrap();
        let g = b.group(vec![Some(w0.clone()), None, Some(w2.clone())]).unwrap();
        let x = b.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 3, 3).unwrap();
        let y = b.grouped_linear(&x, &g, &[1, 0, 2], Precision::F32).unwrap();
        let first = b.linear(&b.gather_rows(&x, &[0]).unwrap(), &w0, Precision::F32).unwrap();
        let rest = b.linear(&b.gather_rows(&x, &[1, 2]).unwrap(), &w2, Precision::F32).unwrap();
        let want: Vec<f32> = first.as_host().unwrap().iter().chain(rest.as_host().unwrap()).copied().collect();
        assert_eq!(y.as_host().unwrap(), &want[..]);
        assert!(b.grouped_linear(&x, &g, &[1, 1, 1], Precision::F32).unwrap_err().to_string().contains("slot 1"));
        let wide = Weight::from_f32(Format::BF16, 2, 4, &[0.0; 8], None).unwrap();
        assert!(b.group(vec![Some(w0), Some(wide)]).is_err());
    }

    #[test]
    fn attention_reads_each_sequences_own_blocks_in_position_order() {
        // Two sequences in one arena, in blocks out of order: 20 positions in blocks [3, 0]
        // and 5 in block [1]. Written in two passes (prefill, then one more token each).
        let b = CpuBackend;
        let layout = KvLayout::per_head(2, 2, 4);
        let mut arena = b.kv_arena(layout, 4).unwrap();
        let (hd, kv) = (layout.head_dim, layout.kv_heads);
        // Keys are 0 (every position scores the same); a value is its position, per head.
        let write = |arena: &mut Tensor, spans: &[SeqSpan<'_>], positions: &[f32]| {
            let batch = b.kv_batch(layout, arena, spans).unwrap();
            let k = b.zeros(positions.len(), kv * hd).unwrap();
            let v: Vec<f32> =
                positions.iter().flat_map(|&p| (0..kv * hd).map(move |i| p + (i / hd) as f32 * 100.0)).collect();
            let v = b.upload(&v, positions.len(), kv * hd).unwrap();
            b.kv_write(arena, &batch, 1, &k, &v).unwrap();
            batch
        };
        let (long, short): (&[u32], &[u32]) = (&[3, 0], &[1]);
        let first: Vec<f32> = (0..19).map(|p| p as f32).chain((0..4).map(|p| p as f32)).collect();
        write(
            &mut arena,
            &[SeqSpan { tokens: 19, first_pos: 0, blocks: long }, SeqSpan { tokens: 4, first_pos: 0, blocks: short }],
            &first,
        );
        let spans =
            [SeqSpan { tokens: 1, first_pos: 19, blocks: long }, SeqSpan { tokens: 1, first_pos: 4, blocks: short }];
        let batch = write(&mut arena, &spans, &[19.0, 4.0]);
        let q = b.zeros(2, 4 * hd).unwrap();
        let at = |window| {
            let p = Attention { layer: 1, heads: 4, scale: 1.0, sliding_window: window, sinks: None };
            b.attention(&q, &arena, &batch, p).unwrap().into_host().unwrap()
        };
        // A window of one position: each query sees only its own value.
        let own = at(Some(1));
        // Query heads 0-1 read KV head 0, heads 2-3 KV head 1 (values + 100).
        assert_eq!(&own[..4 * hd], &[[19.0; 4], [19.0; 4], [119.0; 4], [119.0; 4]].concat()[..]);
        assert_eq!(&own[4 * hd..], &[[4.0; 4], [4.0; 4], [104.0; 4], [104.0; 4]].concat()[..]);
        // No window: the mean of every position so far (0..=19 and 0..=4).
        let all = at(None);
        assert!((all[0] - 9.5).abs() < 1e-5 && (all[4 * hd] - 2.0).abs() < 1e-5, "{all:?}");
        assert!(
            b.attention(
                &q,
                &arena,
                &batch,
                Attention { layer: 2, heads: 4, scale: 1.0, sliding_window: None, sinks: None }
            )
            .is_err()
        );
    }

    #[test]
    fn non_finite_rows_names_every_row_with_a_nan_or_an_infinity() {
        let b = CpuBackend;
        let mut v = vec![1.0f32; 4 * 300];
        v[300 + 299] = f32::NAN;
        v[3 * 300] = f32::NEG_INFINITY;
        v[2 * 300 + 7] = f32::MAX; // large but finite
        let x = b.upload(&v, 4, 300).unwrap();
        assert_eq!(b.non_finite_rows(&x).unwrap(), vec![1, 3]);
        assert!(b.non_finite_rows(&b.zeros(3, 0).unwrap()).unwrap().is_empty());
    }
}
