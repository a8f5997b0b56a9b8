//! Softmax and top-k, as MoE gates use them.

/// Softmax in place (numerically stable).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `log_softmax` into a new vector, computed in `f64` for stable log-probabilities.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// The log-probability of entry `i` under `log_softmax(x)`, computed as [`log_softmax`] does.
pub fn log_prob(x: &[f32], i: usize) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    (x[i] as f64 - lse) as f32
}

/// Index of the largest value; the first one on ties.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let k = k.min(x.len());
    let cmp = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// How DeepSeek's group-limited gates score a group of experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// The sum of its two best (DeepSeek-V3's `noaux_tc`).
    TopTwoSum,
    /// Its best (DeepSeek-V2's `group_limited_greedy`).
    Max,
}

/// DeepSeek's group-limited choice of `k` experts, best first: `choice` (the scores, plus
/// V3's correction bias) split into `groups` equal groups, each scored by `group_score`; the
/// `topk_group` best groups are kept, then the top `k` of their experts. Ties go to the lower
/// index.
pub fn group_limited(
    choice: &[f32],
    groups: usize,
    topk_group: usize,
    group_score: GroupScore,
    k: usize,
) -> Vec<usize> {
    let per_group = choice.len() / groups.max(1);
    let scores: Vec<f32> = choice
        .chunks_exact(per_group.max(1))
        .map(|g| match group_score {
            GroupScore::Max => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            GroupScore::TopTwoSum => top_k(g, 2).iter().map(|&i| g[i]).sum(),
        })
        .collect();
    let kept = top_k(&scores, topk_group);
    let masked: Vec<f32> = choice
        .iter()
        .enumerate()
        .map(|(e, &v)| if kept.contains(&(e / per_group)) { v } else { f32::NEG_INFINITY })
        .collect();
    top_k(&masked, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_limited_keeps_the_best_groups_only() {
        // Four groups of two. By the sum of their two best: group 1 (1.1) and group 3 (1.0)
        // win over group 0 (0.95), whose 0.9 is the best single expert.
        let choice = [0.9, 0.05, 0.6, 0.5, 0.1, 0.1, 0.5, 0.5];
        assert_eq!(group_limited(&choice, 4, 2, GroupScore::TopTwoSum, 3), vec![2, 3, 6]);
        // By their best: groups 0 (0.9) and 1 (0.6).
        assert_eq!(group_limited(&choice, 4, 2, GroupScore::Max, 3), vec![0, 2, 3]);
        // The kept group's experts win even where their choice values (biased) are negative.
        let negative = [-0.5, -0.2, -0.1, -0.3];
        assert_eq!(group_limited(&negative, 2, 1, GroupScore::Max, 2), vec![2, 3]);
    }

    #[test]
    fn top_k_orders_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.9, -1.0], 3), vec![3, 1, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        assert!((l[2].exp() - x[2]).abs() < 1e-6);
        assert_eq!(log_prob(&[1.0, 2.0, 3.0], 1), l[1]);
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }
}
