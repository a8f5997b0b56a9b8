//! Measured memory read bandwidth: the denominator of every "fraction of the memory-bandwidth
//! floor" the benchmarks report.

use std::time::Instant;

use rayon::prelude::*;

/// Reads a buffer of `bytes` (make it several times the last-level cache) with every thread
/// of the rayon pool, `repeats` times, and returns the best rate in bytes per second.
pub fn read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let chunk = (words / (rayon::current_num_threads() * 8)).max(1 << 12);
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let sum: u64 = buf.par_chunks(chunk).map(|c| c.iter().fold(0u64, |a, &b| a ^ b)).reduce(|| 0, |a, b| a ^ b);
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}
