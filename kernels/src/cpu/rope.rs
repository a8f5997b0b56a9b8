//! Rotary position embeddings in the "rotate half" layout transformers uses: the first
//! and second halves of each head are the two coordinates of each rotated pair.

/// Rotates `n_heads` heads of `head_dim` values for each of `n_tokens` rows of `x`.
/// `cos` and `sin` hold `head_dim / 2` values per token.
pub fn apply_rope(x: &mut [f32], n_tokens: usize, n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    assert_eq!(x.len(), n_tokens * n_heads * head_dim, "rope: x has the wrong size");
    assert!(cos.len() >= n_tokens * half && sin.len() >= n_tokens * half, "rope: tables too short");
    for t in 0..n_tokens {
        let c = &cos[t * half..(t + 1) * half];
        let s = &sin[t * half..(t + 1) * half];
        for h in 0..n_heads {
            let base = (t * n_heads + h) * head_dim;
            let (a, b) = x[base..base + head_dim].split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quarter_turn() {
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        super::apply_rope(&mut x, 1, 1, 4, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(x, vec![0.0, 0.0, 1.0, 0.0]);
    }
}
