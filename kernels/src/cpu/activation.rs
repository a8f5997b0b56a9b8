//! Gated activations of expert and dense MLPs.

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out[i] = silu(gate[i]) * up[i]` (Mixtral, Qwen, OLMoE).
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// gpt-oss's clamped SwiGLU over an interleaved `[g0, u0, g1, u1, ...]` row:
/// `g = min(g, limit)`, `u = clamp(u, -limit, limit)`, `out = (u + 1) · g · σ(alpha · g)`.
pub fn clamped_swiglu_interleaved(gate_up: &[f32], alpha: f32, limit: f32, out: &mut [f32]) {
    assert_eq!(gate_up.len(), 2 * out.len(), "clamped_swiglu: gate_up must be twice the output width");
    for (o, pair) in out.iter_mut().zip(gate_up.chunks_exact(2)) {
        let g = pair[0].min(limit);
        let u = pair[1].clamp(-limit, limit);
        *o = (u + 1.0) * (g * sigmoid(g * alpha));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamped_swiglu_clamps() {
        let mut out = [0.0; 2];
        clamped_swiglu_interleaved(&[100.0, 100.0, 0.0, -3.0], 1.702, 7.0, &mut out);
        assert!((out[0] - 8.0 * 7.0 * sigmoid(7.0 * 1.702)).abs() < 1e-5);
        assert_eq!(out[1], 0.0);
    }
}
