#!/usr/bin/env bash
# The whole test suite: what the README tells a new user to run, and what CI runs.
# Needs Rust (cargo) and Python 3 with venv/pip: the Rust tests check against committed
# transformers fixtures (tools/make_fixtures.py regenerates them); the OpenAI API tests drive
# a real cluster with the official `openai` client, installed from PyPI into target/openai-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi

venv=target/openai-venv
if ! "$venv/bin/python" -c "import openai, pytest" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r tests/openai/requirements.txt
fi
SWITCHYARD_BIN="$PWD/target/debug/switchyard" "$venv/bin/python" -m pytest -q tests/openai
