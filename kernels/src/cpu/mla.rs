//! Multi-head latent attention (DeepSeek-V2/V3) of one sequence's new rows over its cached
//! latent rows, in either form:
//!
//! - **absorbed**: each head's query is taken into the latent space through its key
//!   up-projection (`q_nope · W_UK`), so every head attends over the latent rows themselves —
//!   one product reads the cache once for all heads (multi-query attention with 512 + 64-wide
//!   keys whose first 512 values are also the values) — and the result goes through the
//!   head's value up-projection afterwards. What decode uses: it never expands the cache.
//! - **expanded**: every cached latent row is expanded per head into a key and a value, then
//!   attention runs per head as usual. Cheaper where the cache holds few rows besides the
//!   call's own (a prompt's first chunk) or the call adds many.
//!
//! Both sum `P · V` position by position per row, so a row's result does not depend on the
//! other rows of the call. Scores are computed a tile of rows at a time, at most
//! [`SCORE_TILE`] floats, so a long context does not take rows × positions floats at once.

use rayon::prelude::*;

use super::matmul::linear;
use crate::Weights;

/// Most score floats (query rows × positions) one tile computes: 16 MiB. (The unit tests
/// use a tile of two or three rows, to cross tiles.)
#[cfg(not(test))]
pub const SCORE_TILE: usize = 1 << 22;
#[cfg(test)]
pub const SCORE_TILE: usize = 20;

/// Query rows per tile of scores over `total` positions.
fn tile_rows(total: usize) -> usize {
    (SCORE_TILE / total.max(1)).max(1)
}

/// The shape of one sequence's MLA call.
#[derive(Clone, Copy, Debug)]
pub struct MlaParams {
    /// New query rows.
    pub n_tokens: usize,
    /// Position of the first new row; the cache holds `first_pos + n_tokens` rows.
    pub first_pos: usize,
    pub heads: usize,
    /// Latent values per cache row (`kv_lora_rank`), followed by `rope` rotated key values.
    pub rank: usize,
    pub rope: usize,
    /// Per head: query/key values without rotation, and value width.
    pub nope: usize,
    pub v: usize,
    pub scale: f32,
}

impl MlaParams {
    fn width(&self) -> usize {
        self.rank + self.rope
    }

    fn total(&self) -> usize {
        self.first_pos + self.n_tokens
    }

    /// Whether the expanded form takes fewer multiply-adds than the absorbed one.
    pub fn prefers_expanded(&self) -> bool {
        let (n, h, t) = (self.n_tokens, self.heads, self.total());
        let absorbed = n * h * (self.nope * self.rank + t * (self.width() + self.rank) + self.rank * self.v);
        let expanded = h * (t * self.rank * (self.nope + self.v) + n * t * (self.nope + self.rope + self.v));
        expanded < absorbed
    }

    fn check(&self, q_nope: &[f32], q_rope: &[f32], latent: &[f32], out: &[f32]) {
        let (n, h) = (self.n_tokens, self.heads);
        assert_eq!(q_nope.len(), n * h * self.nope, "mla: q_nope has the wrong size");
        assert_eq!(q_rope.len(), n * h * self.rope, "mla: q_rope has the wrong size");
        assert!(latent.len() >= self.total() * self.width(), "mla: the cache is too short");
        assert_eq!(out.len(), n * h * self.v, "mla: out has the wrong size");
    }
}

/// Softmax of one row of scores over positions `0 ..= pos` after scaling; later positions
/// become 0.
fn causal_softmax(row: &mut [f32], pos: usize, scale: f32) {
    row[pos + 1..].fill(0.0);
    let visible = &mut row[..=pos];
    let mut max = f32::NEG_INFINITY;
    for s in visible.iter_mut() {
        *s *= scale;
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in visible.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    visible.iter_mut().for_each(|s| *s *= inv);
}

/// `out[i] = Σ_j p[i, j] · values[j]` for rows of `p` (`total` wide), where value row `j` is
/// the `width` values at `j * stride` of `values`. Positions are summed in order for every
/// row; rows are split across threads.
fn weighted_sum(p: &[f32], total: usize, values: &[f32], stride: usize, width: usize, out: &mut [f32]) {
    let rows = out.len() / width.max(1);
    let per_task = rows.div_ceil(rayon::current_num_threads()).max(1);
    let run = |(ps, outs): (&[f32], &mut [f32])| {
        for j in 0..total {
            let v = &values[j * stride..j * stride + width];
            for (row, o) in ps.chunks_exact(total).zip(outs.chunks_exact_mut(width)) {
                let w = row[j];
                if w != 0.0 {
                    o.iter_mut().zip(v).for_each(|(o, &x)| *o += w * x);
                }
            }
        }
    };
    let tasks = p.chunks(per_task * total).zip(out.chunks_mut(per_task * width));
    if rows * total * width < 1 << 16 {
        tasks.for_each(run);
    } else {
        tasks.collect::<Vec<_>>().into_par_iter().for_each(run);
    }
}

/// Columns `head * w .. (head + 1) * w` of every row of `x` (rows of `heads * w`).
fn head_of(x: &[f32], heads: usize, w: usize, head: usize) -> Vec<f32> {
    x.chunks_exact(heads * w).flat_map(|row| &row[head * w..(head + 1) * w]).copied().collect()
}

/// The inverse of [`head_of`]: `rows` (`w` each) into those columns of `out`.
fn put_head(out: &mut [f32], heads: usize, w: usize, head: usize, rows: &[f32]) {
    for (dst, src) in out.chunks_exact_mut(heads * w).zip(rows.chunks_exact(w)) {
        dst[head * w..(head + 1) * w].copy_from_slice(src);
    }
}

/// Causal attention of query rows `q` over `keys` (rows of `width`, as the queries; `total`
/// of them), a tile of query rows at a time: each row's softmax-weighted sum of the value rows
/// (`width` values every `stride` of `values`) into `out`. Query row `i` sits at `pos(i)`.
fn attend(
    q: &[f32],
    (keys, width): (&[f32], usize),
    (values, stride, v_width): (&[f32], usize, usize),
    total: usize,
    (pos, scale): (impl Fn(usize) -> usize, f32),
    out: &mut [f32],
) {
    let tile = tile_rows(total).min(q.len() / width);
    let mut scores = vec![0.0f32; tile * total];
    for (k, (qs, os)) in q.chunks(tile * width).zip(out.chunks_mut(tile * v_width)).enumerate() {
        let rows = qs.len() / width;
        let scores = &mut scores[..rows * total];
        linear(qs, Weights::F32(&keys[..total * width]), None, scores, rows, total, width);
        for (i, row) in scores.chunks_exact_mut(total).enumerate() {
            causal_softmax(row, pos(k * tile + i), scale);
        }
        weighted_sum(scores, total, values, stride, v_width, os);
    }
}

/// The absorbed form. `uk_t[h]` is head `h`'s key up-projection transposed (`[rank, nope]`),
/// `uv[h]` its value up-projection (`[v, rank]`); `latent` holds the sequence's cache rows
/// (`rank + rope` values each) for positions `0 .. first_pos + n_tokens`; `out` is
/// `[n_tokens, heads · v]`.
pub fn absorbed(
    q_nope: &[f32],
    q_rope: &[f32],
    latent: &[f32],
    (uk_t, uv): (&[Weights<'_>], &[Weights<'_>]),
    out: &mut [f32],
    p: MlaParams,
) {
    p.check(q_nope, q_rope, latent, out);
    let (n, h, r, dr, w, total) = (p.n_tokens, p.heads, p.rank, p.rope, p.width(), p.total());
    // Each (token, head) row's query in the latent space, its rotated part beside it.
    let mut q = vec![0.0f32; n * h * w];
    for head in 0..h {
        let mut q_latent = vec![0.0f32; n * r];
        linear(&head_of(q_nope, h, p.nope, head), uk_t[head], None, &mut q_latent, n, r, p.nope);
        for t in 0..n {
            let row = &mut q[(t * h + head) * w..(t * h + head + 1) * w];
            row[..r].copy_from_slice(&q_latent[t * r..(t + 1) * r]);
            row[r..].copy_from_slice(&q_rope[(t * h + head) * dr..(t * h + head + 1) * dr]);
        }
    }
    // Every row of a tile against every position in one product: the cache is read once per
    // tile for all heads. The latent rows are the keys, and their first `rank` values the values.
    let mut o_latent = vec![0.0f32; n * h * r];
    let pos = |i: usize| p.first_pos + i / h;
    attend(&q, (latent, w), (latent, w, r), total, (pos, p.scale), &mut o_latent);
    for (head, &uv) in uv.iter().enumerate().take(h) {
        let mut o = vec![0.0f32; n * p.v];
        linear(&head_of(&o_latent, h, r, head), uv, None, &mut o, n, p.v, r);
        put_head(out, h, p.v, head, &o);
    }
}

/// The expanded form: `uk[h]` is head `h`'s key up-projection (`[nope, rank]`), `uv[h]` its
/// value up-projection; the rest as [`absorbed`].
pub fn expanded(
    q_nope: &[f32],
    q_rope: &[f32],
    latent: &[f32],
    (uk, uv): (&[Weights<'_>], &[Weights<'_>]),
    out: &mut [f32],
    p: MlaParams,
) {
    p.check(q_nope, q_rope, latent, out);
    let (n, h, r, dr, dn, total) = (p.n_tokens, p.heads, p.rank, p.rope, p.nope, p.total());
    let w = p.width();
    let rows = &latent[..total * w];
    let c: Vec<f32> = rows.chunks_exact(w).flat_map(|row| &row[..r]).copied().collect();
    let head = |head: usize| -> Vec<f32> {
        let mut k_nope = vec![0.0f32; total * dn];
        linear(&c, uk[head], None, &mut k_nope, total, dn, r);
        let mut v = vec![0.0f32; total * p.v];
        linear(&c, uv[head], None, &mut v, total, p.v, r);
        let keys: Vec<f32> = k_nope
            .chunks_exact(dn)
            .zip(rows.chunks_exact(w))
            .flat_map(|(kn, row)| kn.iter().chain(&row[r..]))
            .copied()
            .collect();
        let q: Vec<f32> = (0..n)
            .flat_map(|t| {
                let i = t * h + head;
                q_nope[i * dn..(i + 1) * dn].iter().chain(&q_rope[i * dr..(i + 1) * dr])
            })
            .copied()
            .collect();
        let mut o = vec![0.0f32; n * p.v];
        let pos = |t: usize| p.first_pos + t;
        attend(&q, (&keys, dn + dr), (&v, p.v, p.v), total, (pos, p.scale), &mut o);
        o
    };
    let heads: Vec<Vec<f32>> = (0..h).into_par_iter().map(head).collect();
    for (head, o) in heads.iter().enumerate() {
        put_head(out, h, p.v, head, o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1].
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5) - 1.0).collect()
    }

    fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols).flat_map(|c| (0..rows).map(move |r| w[r * cols + c])).collect()
    }

    /// Attention written out from the definition: per head, keys `[W_UK c, k_rope]` and
    /// values `W_UV c` for every position, scores, softmax, weighted sum.
    fn reference(
        q_nope: &[f32],
        q_rope: &[f32],
        latent: &[f32],
        uk: &[Vec<f32>],
        uv: &[Vec<f32>],
        p: MlaParams,
    ) -> Vec<f32> {
        let (h, r, dr, dn, dv, w) = (p.heads, p.rank, p.rope, p.nope, p.v, p.width());
        let mut out = vec![0.0f32; p.n_tokens * h * dv];
        for t in 0..p.n_tokens {
            let pos = p.first_pos + t;
            for head in 0..h {
                let i = t * h + head;
                let mut scores = Vec::new();
                for j in 0..=pos {
                    let row = &latent[j * w..(j + 1) * w];
                    let mut s = 0.0f64;
                    for d in 0..dn {
                        let k: f64 = (0..r).map(|c| uk[head][d * r + c] as f64 * row[c] as f64).sum();
                        s += q_nope[i * dn + d] as f64 * k;
                    }
                    for d in 0..dr {
                        s += q_rope[i * dr + d] as f64 * row[r + d] as f64;
                    }
                    scores.push(s * p.scale as f64);
                }
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let pr = (s - max).exp() / sum;
                    let row = &latent[j * w..(j + 1) * w];
                    for d in 0..dv {
                        let v: f64 = (0..r).map(|c| uv[head][d * r + c] as f64 * row[c] as f64).sum();
                        out[i * dv + d] += (pr * v) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn both_forms_match_the_definition_and_each_other() {
        let p = MlaParams { n_tokens: 3, first_pos: 5, heads: 3, rank: 8, rope: 4, nope: 6, v: 5, scale: 0.4 };
        let total = p.total();
        let q_nope = values(p.n_tokens * p.heads * p.nope, 1);
        let q_rope = values(p.n_tokens * p.heads * p.rope, 2);
        let latent = values(total * p.width(), 3);
        let uk: Vec<Vec<f32>> = (0..p.heads).map(|h| values(p.nope * p.rank, 10 + h)).collect();
        let uv: Vec<Vec<f32>> = (0..p.heads).map(|h| values(p.v * p.rank, 20 + h)).collect();
        let uk_t: Vec<Vec<f32>> = uk.iter().map(|w| transpose(w, p.nope, p.rank)).collect();
        fn view(ws: &[Vec<f32>]) -> Vec<Weights<'_>> {
            ws.iter().map(|w| Weights::F32(w)).collect()
        }
        let want = reference(&q_nope, &q_rope, &latent, &uk, &uv, p);
        let mut a = vec![0.0; want.len()];
        absorbed(&q_nope, &q_rope, &latent, (&view(&uk_t), &view(&uv)), &mut a, p);
        let mut e = vec![0.0; want.len()];
        expanded(&q_nope, &q_rope, &latent, (&view(&uk), &view(&uv)), &mut e, p);
        for ((x, y), z) in want.iter().zip(&a).zip(&e) {
            assert!((x - y).abs() < 1e-4 && (x - z).abs() < 1e-4, "reference {x}, absorbed {y}, expanded {z}");
        }

        // A row alone gives the bits it gives among the others (decode after prefill).
        let last = MlaParams { n_tokens: 1, first_pos: total - 1, ..p };
        let (hn, hr) = (p.heads * p.nope, p.heads * p.rope);
        let mut one = vec![0.0; p.heads * p.v];
        absorbed(&q_nope[2 * hn..], &q_rope[2 * hr..], &latent, (&view(&uk_t), &view(&uv)), &mut one, last);
        assert_eq!(one, a[2 * p.heads * p.v..]);
    }

    #[test]
    fn decode_prefers_absorbed_and_long_prefill_expanded() {
        // DeepSeek-V3's shape.
        let v3 =
            MlaParams { n_tokens: 1, first_pos: 4095, heads: 128, rank: 512, rope: 64, nope: 128, v: 128, scale: 1.0 };
        assert!(!v3.prefers_expanded());
        assert!(MlaParams { n_tokens: 4096, first_pos: 0, ..v3 }.prefers_expanded());
    }
}
