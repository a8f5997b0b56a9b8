//! Mutation fuzzing of everything Switchyard parses from outside: safetensors headers,
//! `config.json`, chat templates and the conversations rendered through them, dispatch
//! requests, raft messages and OpenAI request bodies.
//!
//! Each target in `tests/targets.rs` starts from a corpus of valid inputs (made from the
//! committed fixtures and the real encoders) and feeds a target function mutated copies of
//! them: bit flips, boundary bytes, cut, repeated and spliced ranges, and numbers in text
//! swapped for boundary values (so JSON headers get huge offsets and shapes). A target may
//! return an error for anything; it must not panic, and a panic fails the test with the input
//! saved to `target/fuzz-failures/`. An abort (a failed allocation) ends the test binary
//! without a word about the input: run again with `SWITCHYARD_FUZZ_IN_FLIGHT=1` and the input
//! is left in `target/fuzz-failures/NAME-in-flight`.
//!
//! The runs are deterministic (a fixed seed) and short in the test suite; for a longer run:
//!
//! ```sh
//! SWITCHYARD_FUZZ_ITERATIONS=200000 SWITCHYARD_FUZZ_SEED=$RANDOM cargo test --release -p switchyard-fuzz
//! ```
//!
//! This is a plain-test fuzzer on stable Rust (no libFuzzer, no coverage feedback): it finds
//! the crashes that mutations of real inputs reach, which is where parsers of structured
//! formats most often break.
//!
//! # Layout
//! - [`Rng`]: a small xorshift generator, seeded.
//! - [`mutate`]: one mutated copy of an input.
//! - [`run`]: a target over its corpus, catching panics.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// xorshift64*: fast, seeded, and good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Bytes that sit on boundaries: zero, sign bits, all ones, ASCII structure.
const BOUNDARY_BYTES: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'[', b'-', b'9'];

/// Numbers that sit on boundaries, for numbers written in text (JSON).
const BOUNDARY_NUMBERS: [&str; 10] = [
    "0",
    "-1",
    "1",
    "255",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
];

/// One mutated copy of `input`; `corpus` supplies ranges to splice in.
pub fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = BOUNDARY_BYTES[rng.below(BOUNDARY_BYTES.len())];
            }
            2 if len > 0 => {
                // Cut a range out.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                out.drain(start..end);
            }
            3 if len > 0 => {
                // Repeat a range.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(32)).min(len);
                let piece = out[start..end].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, piece);
            }
            4 if len > 0 => out.truncate(rng.below(len)),
            5 => {
                // Splice in a range of another input.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(64)).min(other.len());
                    let at = rng.below(len + 1);
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ => swap_number(&mut out, rng),
        }
    }
    out
}

/// Replaces one run of ASCII digits (with its sign) by a boundary number.
fn swap_number(out: &mut Vec<u8>, rng: &mut Rng) {
    let starts: Vec<usize> =
        (0..out.len()).filter(|&i| out[i].is_ascii_digit() && (i == 0 || !out[i - 1].is_ascii_digit())).collect();
    if starts.is_empty() {
        return;
    }
    let mut start = starts[rng.below(starts.len())];
    let mut end = start;
    while end < out.len() && out[end].is_ascii_digit() {
        end += 1;
    }
    if start > 0 && out[start - 1] == b'-' {
        start -= 1;
    }
    let number = BOUNDARY_NUMBERS[rng.below(BOUNDARY_NUMBERS.len())];
    out.splice(start..end, number.bytes());
}

/// Iterations per target: `SWITCHYARD_FUZZ_ITERATIONS`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("SWITCHYARD_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The run's seed: `SWITCHYARD_FUZZ_SEED`, else a fixed one (the test suite repeats itself).
pub fn seed() -> u64 {
    std::env::var("SWITCHYARD_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_cafe)
}

/// Feeds `target` every input of `corpus` as is, then `iterations` mutated ones. Panics
/// (failing the test) on the first input `target` panics on, after saving it to
/// `target/fuzz-failures/NAME-N` and naming the file.
///
/// `target` returns whether the input got past the outer decoding (valid JSON, a decodable
/// message) into the code under test; a run where no mutated input did tested nothing, and
/// fails.
pub fn run(name: &str, corpus: &[Vec<u8>], iterations: usize, target: impl Fn(&[u8]) -> bool) {
    assert!(!corpus.is_empty(), "{name}: empty corpus");
    let mut rng = Rng::new(seed() ^ fnv(name.as_bytes()));
    let inputs = corpus.iter().cloned().chain((0..iterations).map(|_| {
        let base = &corpus[rng.below(corpus.len())];
        mutate(base, corpus, &mut rng)
    }));
    // The default hook would print every caught panic; the failure report says it once.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    // An abort (a failed allocation, a stack overflow) cannot be caught: with
    // SWITCHYARD_FUZZ_IN_FLIGHT set, each input is written here before it runs (slower).
    let in_flight = dir.join(format!("{name}-in-flight"));
    let keep_in_flight = std::env::var_os("SWITCHYARD_FUZZ_IN_FLIGHT").is_some();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    let mut reached = 0;
    for (n, input) in inputs.enumerate() {
        if keep_in_flight {
            let _ = std::fs::write(&in_flight, &input);
        }
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(inside) => reached += usize::from(inside && n >= corpus.len()),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failure = Some((n, input, message));
                break;
            }
        }
    }
    std::panic::set_hook(hook);
    let _ = std::fs::remove_file(&in_flight);
    if let Some((n, input, message)) = failure {
        let path = dir.join(format!("{name}-{n}"));
        let _ = std::fs::write(&path, &input);
        panic!("{name}: input {n} ({} bytes, saved to {}) panicked: {message}", input.len(), path.display());
    }
    eprintln!("{name}: {iterations} mutated inputs, {reached} past decoding");
    assert!(iterations == 0 || reached > 0, "{name}: no mutated input got past decoding");
}

/// FNV-1a, to give each target its own stream from one seed.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_inputs_and_repeat_with_the_seed() {
        let corpus = vec![br#"{"a": 12, "b": [1, 2]}"#.to_vec()];
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let first: Vec<Vec<u8>> = (0..50).map(|_| mutate(&corpus[0], &corpus, &mut a)).collect();
        let again: Vec<Vec<u8>> = (0..50).map(|_| mutate(&corpus[0], &corpus, &mut b)).collect();
        assert_eq!(first, again);
        assert!(first.iter().filter(|m| **m != corpus[0]).count() > 40);
        let mut rng = Rng::new(3);
        let mut swapped = corpus[0].clone();
        swap_number(&mut swapped, &mut rng);
        assert_ne!(swapped, corpus[0]);
    }

    #[test]
    fn a_panicking_target_fails_naming_the_saved_input() {
        let corpus = vec![b"fine".to_vec()];
        let caught = catch_unwind(|| {
            run("selftest", &corpus, 10, |b| {
                assert!(b != b"fine", "boom");
                true
            })
        });
        let message = caught.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("selftest: input 0") && message.contains("boom"), "{message}");
    }
}
