//! Causal attention of new query rows against a sequence's KV cache.
//!
//! The cache holds every position of the sequence so far (the new tokens included), laid
//! out `[position, kv_head, head_dim]`. Grouped-query attention maps query head `h` to KV
//! head `h / (n_heads / n_kv_heads)`. A sliding window of `w` lets a query at position `p`
//! see positions `p - w + 1 ..= p`; attention sinks add one learned logit per head to the
//! softmax denominator (gpt-oss).

use rayon::prelude::*;

use super::matmul::dot;

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

/// `q` is `[n_tokens, n_heads, head_dim]`; `k` and `v` are the cache, covering positions
/// `0 .. first_pos + n_tokens`; `out` is `[n_tokens, n_heads, head_dim]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], p: AttentionParams<'_>) {
    let hd = p.head_dim;
    let kv_stride = p.n_kv_heads * hd;
    let total = p.first_pos + p.n_tokens;
    assert_eq!(q.len(), p.n_tokens * p.n_heads * hd, "attention: q has the wrong size");
    assert!(k.len() >= total * kv_stride && v.len() >= total * kv_stride, "attention: cache too short");
    assert_eq!(p.n_heads % p.n_kv_heads, 0, "attention: heads not a multiple of kv heads");
    let group = p.n_heads / p.n_kv_heads;

    let one = |(idx, o): (usize, &mut [f32])| {
        let (t, h) = (idx / p.n_heads, idx % p.n_heads);
        let pos = p.first_pos + t;
        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let g = h / group;
        let qh = &q[idx * hd..(idx + 1) * hd];
        let mut scores: Vec<f32> = (lo..=pos)
            .map(|j| dot(qh, &k[j * kv_stride + g * hd..j * kv_stride + (g + 1) * hd]) * p.scale)
            .collect();
        let sink = p.sinks.map(|s| s[h]);
        let max = scores.iter().copied().chain(sink).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = sink.map_or(0.0, |s| (s - max).exp());
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (j, &w) in (lo..=pos).zip(&scores) {
            let vj = &v[j * kv_stride + g * hd..j * kv_stride + (g + 1) * hd];
            let w = w / sum;
            for (o, &x) in o.iter_mut().zip(vj) {
                *o += w * x;
            }
        }
    };
    let work = p.n_tokens * p.n_heads * total * hd;
    if work < 1 << 15 {
        out.chunks_mut(hd).enumerate().for_each(one);
    } else {
        out.par_chunks_mut(hd).enumerate().with_min_len(4).for_each(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n_tokens: usize, first_pos: usize) -> AttentionParams<'static> {
        AttentionParams { n_tokens, first_pos, n_heads: 2, n_kv_heads: 1, head_dim: 2, scale: 1.0, sliding_window: None, sinks: None }
    }

    #[test]
    fn single_position_returns_its_value() {
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [0.5, 0.5];
        let v = [3.0, -1.0];
        let mut out = [0.0; 4];
        attention(&q, &k, &v, &mut out, params(1, 0));
        assert_eq!(out, [3.0, -1.0, 3.0, -1.0]);
    }

    #[test]
    fn window_and_sinks() {
        // Two cached positions with equal scores: without a window the output averages them.
        let q = [0.0, 0.0, 0.0, 0.0];
        let k = [0.0; 4];
        let v = [1.0, 1.0, 3.0, 3.0];
        let mut out = [0.0; 4];
        attention(&q, &k, &v, &mut out, params(1, 1));
        assert_eq!(out, [2.0; 4]);
        let mut p = params(1, 1);
        p.sliding_window = Some(1);
        attention(&q, &k, &v, &mut out, p);
        assert_eq!(out, [3.0; 4]);
        // A sink of logit 0 takes a third of the mass from two zero-score positions.
        let mut p = params(1, 1);
        p.sinks = Some(&[0.0, 0.0]);
        attention(&q, &k, &v, &mut out, p);
        assert!((out[0] - 4.0 / 3.0).abs() < 1e-6);
    }
}
