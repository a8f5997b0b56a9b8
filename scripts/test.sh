#!/usr/bin/env bash
# The whole test suite: what the README tells a new user to run, and what CI runs.
# Needs only Rust (cargo); the transformers fixtures it checks against are committed
# (tools/make_fixtures.py regenerates them).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
