//! Causal attention of new query rows against a sequence's KV cache.
//!
//! The cache keeps each KV head's keys and values contiguous, `[position, head_dim]`, so the
//! scores of one head are a single product `Q_h · K_gᵀ` through the blocked linear kernel.
//! Grouped-query attention maps query head `h` to KV head `h / (n_heads / n_kv_heads)`. A
//! sliding window of `w` lets a query at position `p` see positions `p - w + 1 ..= p`;
//! attention sinks add one learned logit per head to the softmax denominator (gpt-oss).
//!
//! A row's result does not depend on how many rows the call has: a prompt computed in one
//! pass, in chunks, or after a prefix taken from the cache gives the same bits.

use rayon::prelude::*;

use super::matmul::linear;
use crate::Weights;

/// Query rows whose `P · V` sums share each load of a value row.
const PV_ROWS: usize = 4;

/// The shape and options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams<'a> {
    /// Number of new query rows.
    pub n_tokens: usize,
    /// Position of the first query row.
    pub first_pos: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub sliding_window: Option<usize>,
    /// One logit per query head.
    pub sinks: Option<&'a [f32]>,
}

/// `q` is `[n_tokens, n_heads, head_dim]`; `keys[g]` and `values[g]` hold KV head `g` for
/// positions `0 .. first_pos + n_tokens`; `out` is `[n_tokens, n_heads, head_dim]`.
pub fn attention(q: &[f32], keys: &[&[f32]], values: &[&[f32]], out: &mut [f32], p: AttentionParams<'_>) {
    let (hd, nh, n) = (p.head_dim, p.n_heads, p.n_tokens);
    let total = p.first_pos + n;
    assert_eq!(q.len(), n * nh * hd, "attention: q has the wrong size");
    assert_eq!(out.len(), n * nh * hd, "attention: out has the wrong size");
    assert!(keys.len() == p.n_kv_heads && values.len() == p.n_kv_heads, "attention: one cache per kv head");
    assert!(keys.iter().chain(values).all(|c| c.len() >= total * hd), "attention: cache too short");
    assert_eq!(nh % p.n_kv_heads, 0, "attention: heads not a multiple of kv heads");
    let group = nh / p.n_kv_heads;

    let head = |h: usize| -> Vec<f32> {
        let g = h / group;
        let mut qh = Vec::with_capacity(n * hd);
        for t in 0..n {
            qh.extend_from_slice(&q[(t * nh + h) * hd..(t * nh + h + 1) * hd]);
        }
        // Scores of every new row against every cached position, then mask per row.
        let mut scores = vec![0.0f32; n * total];
        linear(&qh, Weights::F32(&keys[g][..total * hd]), None, &mut scores, n, total, hd);
        let sink = p.sinks.map(|s| s[h]);
        // Softmax each row over its visible positions; masked positions become 0.
        for (t, row) in scores.chunks_exact_mut(total).enumerate() {
            let pos = p.first_pos + t;
            let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            row[..lo].fill(0.0);
            row[pos + 1..].fill(0.0);
            let visible = &mut row[lo..=pos];
            let mut max = sink.unwrap_or(f32::NEG_INFINITY);
            for s in visible.iter_mut() {
                *s *= p.scale;
                max = max.max(*s);
            }
            let mut sum = sink.map_or(0.0, |s| (s - max).exp());
            for s in visible.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            visible.iter_mut().for_each(|s| *s *= inv);
        }
        let v = &values[g][..total * hd];
        let mut oh = vec![0.0f32; n * hd];
        // P · V summed position by position for every row alike (the QKᵀ product's sums are
        // per element too), a few rows at a time so each value row is loaded once for them.
        for (rows, outs) in scores.chunks(PV_ROWS * total).zip(oh.chunks_mut(PV_ROWS * hd)) {
            if rows.len() == total {
                // One row (decode): straight through its positions.
                for (&w, vj) in rows.iter().zip(v.chunks_exact(hd)) {
                    if w != 0.0 {
                        outs.iter_mut().zip(vj).for_each(|(o, &x)| *o += w * x);
                    }
                }
                continue;
            }
            for (j, vj) in v.chunks_exact(hd).enumerate() {
                for (row, o) in rows.chunks_exact(total).zip(outs.chunks_exact_mut(hd)) {
                    let w = row[j];
                    if w != 0.0 {
                        o.iter_mut().zip(vj).for_each(|(o, &x)| *o += w * x);
                    }
                }
            }
        }
        oh
    };
    let heads: Vec<Vec<f32>> = if n * total * hd * nh < 1 << 15 {
        (0..nh).map(head).collect()
    } else {
        (0..nh).into_par_iter().map(head).collect()
    };
    for (h, oh) in heads.iter().enumerate() {
        for t in 0..n {
            out[(t * nh + h) * hd..(t * nh + h + 1) * hd].copy_from_slice(&oh[t * hd..(t + 1) * hd]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n_tokens: usize, first_pos: usize) -> AttentionParams<'static> {
        AttentionParams {
            n_tokens,
            first_pos,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            sliding_window: None,
            sinks: None,
        }
    }

    #[test]
    fn single_position_returns_its_value() {
        let q = [1.0, 0.0, 0.0, 1.0];
        let mut out = [0.0; 4];
        attention(&q, &[&[0.5, 0.5]], &[&[3.0, -1.0]], &mut out, params(1, 0));
        assert_eq!(out, [3.0, -1.0, 3.0, -1.0]);
    }

    #[test]
    fn window_and_sinks() {
        // Two cached positions with equal scores: without a window the output averages them.
        let q = [0.0; 4];
        let (k, v): (&[f32], &[f32]) = (&[0.0; 4], &[1.0, 1.0, 3.0, 3.0]);
        let mut out = [0.0; 4];
        attention(&q, &[k], &[v], &mut out, params(1, 1));
        assert_eq!(out, [2.0; 4]);
        let mut p = params(1, 1);
        p.sliding_window = Some(1);
        attention(&q, &[k], &[v], &mut out, p);
        assert_eq!(out, [3.0; 4]);
        // A sink of logit 0 takes a third of the mass from two zero-score positions.
        let mut p = params(1, 1);
        p.sinks = Some(&[0.0, 0.0]);
        attention(&q, &[k], &[v], &mut out, p);
        assert!((out[0] - 4.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn causal_prefill_matches_one_row_at_a_time() {
        let (nh, hd, n) = (2, 4, 11);
        let q: Vec<f32> = (0..n * nh * hd).map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6).collect();
        let k: Vec<f32> = (0..n * hd).map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5).collect();
        let v: Vec<f32> = (0..n * hd).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let base = AttentionParams {
            n_tokens: n,
            first_pos: 0,
            n_heads: nh,
            n_kv_heads: 1,
            head_dim: hd,
            scale: 0.5,
            sliding_window: Some(3),
            sinks: Some(&[0.3, -0.2]),
        };
        let mut all = vec![0.0; n * nh * hd];
        attention(&q, &[&k], &[&v], &mut all, base);
        for t in 0..n {
            let mut one = vec![0.0; nh * hd];
            let p = AttentionParams { n_tokens: 1, first_pos: t, ..base };
            attention(&q[t * nh * hd..(t + 1) * nh * hd], &[&k], &[&v], &mut one, p);
            assert_eq!(one, all[t * nh * hd..(t + 1) * nh * hd], "row {t}: the same bits alone as among {n}");
        }
    }
}
