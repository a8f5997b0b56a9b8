//! Measured memory read bandwidth: the denominator of every "fraction of the memory-bandwidth
//! floor" the benchmarks report.
//!
//! Two ways of reading are timed and the faster counts: one sequential stream per task, and
//! four streams per task with software prefetches ahead of them, as the quantized kernels
//! read their weight rows. One stream per core leaves memory idle on machines where a core
//! cannot keep enough misses in flight on its own, which would make the floor too lenient.

use std::time::Instant;

use rayon::prelude::*;

/// Streams read together by one task in the second pattern.
const STREAMS: usize = 4;
/// How far ahead of each stream the prefetches run, in `u64` words (1 KiB).
const AHEAD: usize = 128;

/// Reads a buffer of `bytes` (make it several times the last-level cache) with every thread
/// of the rayon pool, `repeats` times in each pattern, and returns the best rate in bytes per
/// second.
pub fn read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let chunk = (words / (rayon::current_num_threads() * 8)).max(1 << 12).next_multiple_of(STREAMS * 8);
    let mut best = 0.0f64;
    for pattern in [sequential as fn(&[u64]) -> u64, interleaved] {
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            let sum: u64 = buf.par_chunks(chunk).map(pattern).reduce(|| 0, |a, b| a ^ b);
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            best = best.max((words * 8) as f64 / secs);
        }
    }
    best
}

/// XOR of `c` front to back, eight lanes wide so the fold is vector loads, never a chain of
/// scalar operations slower than memory.
fn sequential(c: &[u64]) -> u64 {
    let lanes = c.chunks_exact(8).fold([0u64; 8], |mut a, w| {
        for (a, &w) in a.iter_mut().zip(w) {
            *a ^= w;
        }
        a
    });
    lanes.iter().chain(c.chunks_exact(8).remainder()).fold(0, |a, &b| a ^ b)
}

/// XOR of `c` cut into [`STREAMS`] parts read side by side, each prefetched [`AHEAD`] words
/// ahead.
fn interleaved(c: &[u64]) -> u64 {
    let part = c.len() / STREAMS / 8 * 8;
    let mut lanes = [0u64; 8];
    for i in (0..part).step_by(8) {
        for s in 0..STREAMS {
            let base = s * part + i;
            // One prefetch per cache line (eight words) of each stream.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch has no effect on memory and never faults.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(c.as_ptr().wrapping_add(base + AHEAD).cast());
            }
            for (a, &w) in lanes.iter_mut().zip(&c[base..base + 8]) {
                *a ^= w;
            }
        }
    }
    lanes.iter().chain(&c[STREAMS * part..]).fold(0, |a, &b| a ^ b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_patterns_read_every_word() {
        for len in [0, 7, 8, 31, 32, 33, 1000, 4096 + 13] {
            // Distinct, non-zero words: leaving any one out changes the XOR.
            let c: Vec<u64> = (1..=len as u64).map(|i| i << 32 | i).collect();
            let want = c.iter().fold(0, |a, &b| a ^ b);
            assert_eq!(sequential(&c), want, "sequential, {len} words");
            assert_eq!(interleaved(&c), want, "interleaved, {len} words");
        }
    }
}
