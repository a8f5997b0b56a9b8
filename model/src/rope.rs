//! Rotary embedding tables: inverse frequencies for each RoPE variant, computed in `f32`
//! the way transformers' `ROPE_INIT_FUNCTIONS` compute them, and cos/sin per position.

use crate::config::{RopeScaling, RopeSpec};

pub struct Rope {
    spec: RopeSpec,
    /// Values of a head rotated (the frequencies' dimension).
    dim: usize,
    /// Pairs per head in the tables: `head_dim / 2`. Pairs past `dim / 2` are not rotated
    /// (cos 1, sin 0): partial rotary embedding, where the loader has put the rotated values
    /// of each head at the pairs the tables rotate (see `Names::attention`).
    pairs: usize,
    max_position_embeddings: usize,
    /// Frequencies for sequences within the trained length.
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f32,
}

impl Rope {
    pub fn new(spec: &RopeSpec, (head_dim, rotary_dim): (usize, usize), max_position_embeddings: usize) -> Self {
        let dim = rotary_dim;
        let base_freq =
            |base: f32| -> Vec<f32> { (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect() };
        let (inv_freq, attention_scaling) = match spec.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => (base_freq(spec.theta), 1.0),
            RopeScaling::Linear { factor } => (base_freq(spec.theta).into_iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f32, m: f32| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention_factor = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => get_mscale(factor, m) / get_mscale(factor, ma),
                    _ => get_mscale(factor, 1.0),
                });
                let base = spec.theta as f64;
                let correction_dim = |rot: f32| {
                    (dim as f64
                        * (original_max_position_embeddings as f64 / (rot as f64 * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv = base_freq(spec.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolation)| {
                        let interpolation = extrapolation / factor;
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, attention_factor)
            }
        };
        Rope { spec: spec.clone(), dim, pairs: head_dim / 2, max_position_embeddings, inv_freq, attention_scaling }
    }

    /// Inverse frequencies for a forward pass whose largest position is `max_pos`
    /// (dynamic NTK grows the base past the trained length, as transformers does per call).
    fn inv_freq_for(&self, max_pos: usize) -> std::borrow::Cow<'_, [f32]> {
        match self.spec.scaling {
            RopeScaling::Dynamic { factor } if max_pos + 1 > self.max_position_embeddings => {
                let seq_len = (max_pos + 1) as f32;
                let max = self.max_position_embeddings as f32;
                let d = self.dim as f32;
                let base = self.spec.theta * ((factor * seq_len / max) - (factor - 1.0)).powf(d / (d - 2.0));
                (0..self.dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d)).collect::<Vec<_>>().into()
            }
            _ => self.inv_freq.as_slice().into(),
        }
    }

    /// cos and sin tables (`head_dim / 2` values per position) for `positions`, all from one
    /// forward pass of one sequence.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let max_pos = positions.iter().copied().max().unwrap_or(0);
        let inv = self.inv_freq_for(max_pos);
        let mut cos = Vec::with_capacity(positions.len() * self.pairs);
        let mut sin = Vec::with_capacity(positions.len() * self.pairs);
        for &p in positions {
            for &f in inv.iter() {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
            cos.resize(cos.len() + self.pairs - inv.len(), 1.0);
            sin.resize(sin.len() + self.pairs - inv.len(), 0.0);
        }
        (cos, sin)
    }
}
