//! Token sampling: greedy, temperature, min-p, top-k, top-p, and a seeded generator so the
//! same seed gives the same tokens.

use switchyard_kernels::cpu::routing::log_softmax;

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`). Dividing logits by a smaller
/// positive temperature overflows them to infinities, whose softmax is NaN: sampling would
/// draw noise instead of the most likely token the temperature asks for.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0, or anything below [`GREEDY_TEMPERATURE`], picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 disables).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 disables).
    pub top_k: usize,
    /// Seed of the generator; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    /// Whether every pick is the most likely token: a temperature below
    /// [`GREEDY_TEMPERATURE`], or top-k 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }

    /// Rejects values no sampler can honour, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    /// Drop tokens less likely than this fraction of the most likely one (0 disables).
    min_p: f32,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Sampler { params, min_p: 0.0, rng: Rng::new(seed) }
    }

    /// Also drops, after temperature and before top-k and top-p (vLLM's order), every token
    /// whose probability is below `min_p` times the most likely token's.
    pub fn with_min_p(mut self, min_p: f32) -> Self {
        self.min_p = min_p;
        self
    }

    /// Picks the next token from `logits` (the model's, after any [`controls`](crate::controls)).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let scaled: Vec<f32> = order.iter().map(|&i| logits[i] / p.temperature).collect();
        let probs: Vec<f64> = log_softmax(&scaled).iter().map(|&l| (l as f64).exp()).collect();
        // Probabilities are in decreasing order, so min-p keeps a prefix. Its ratio to the
        // most likely token does not depend on what top-k cut off, so cutting top-k first
        // keeps the same tokens as vLLM's min-p before top-k.
        let mut keep = match self.min_p {
            0.0 => probs.len(),
            min_p => probs.iter().take_while(|&&q| q >= probs[0] * min_p as f64).count().max(1),
        };
        if p.top_p < 1.0 {
            let kept: f64 = probs[..keep].iter().sum();
            let mut cum = 0.0;
            for (i, &q) in probs[..keep].iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 * kept {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * mass;
        for (i, &q) in probs[..keep].iter().enumerate() {
            if u < q {
                return order[i] as u32;
            }
            u -= q;
        }
        order[keep - 1] as u32
    }
}

pub use switchyard_kernels::cpu::routing::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        // Positive temperatures down to the smallest subnormal would overflow `logits / t`.
        let l = logits();
        let greedy = argmax(&l);
        for t in [1e-6, 1e-38, 1e-40, 1e-45] {
            let params = SamplingParams { temperature: t, top_p: 1.0, top_k: 0, seed: Some(3) };
            assert!(params.is_greedy(), "{t}");
            let mut s = Sampler::new(params);
            assert!((0..20).all(|_| s.sample(&l) == greedy), "temperature {t} must pick the argmax");
        }
        assert!(!SamplingParams { temperature: GREEDY_TEMPERATURE, ..Default::default() }.is_greedy());
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 20, seed: Some(7) };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..32).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        assert_ne!(run(&params), run(&SamplingParams { seed: Some(8), ..params.clone() }));
    }

    #[test]
    fn top_k_and_top_p_restrict_choices() {
        let l = logits();
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 3, seed: Some(1) });
        for _ in 0..200 {
            assert!(order[..3].contains(&(s.sample(&l) as usize)));
        }
        // min_p 0.7 keeps the tokens at least 0.7 times as likely as the most likely one (at
        // temperature 1: a logit within ln(1 / 0.7) of the highest).
        let near = order.iter().take_while(|&&i| (l[i] - l[order[0]]).exp() >= 0.7).count();
        assert!(near > 1 && near < l.len() / 2);
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed: Some(1) }).with_min_p(0.7);
        let picked: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&l)).collect();
        assert!(picked.iter().all(|&t| order[..near].contains(&(t as usize))));
        assert_eq!(picked.len(), near, "each token within min_p is drawn");
        // A tiny top_p keeps only the single most likely token.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-6, top_k: 0, seed: Some(1) });
        for _ in 0..50 {
            assert_eq!(s.sample(&l) as usize, order[0]);
        }
    }
}
