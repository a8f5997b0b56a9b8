#!/usr/bin/env bash
# The whole test suite: what the README tells a new user to run, and what CI runs.
# Needs Rust (cargo) and Python 3 with venv/pip: the Rust tests check against committed
# transformers fixtures (tools/make_fixtures.py regenerates them); the OpenAI API tests drive
# a real cluster with the official `openai` client, installed from PyPI into target/test-venv.
#
# Everything is built with the CUDA backend (`--features switchyard/cuda`): it loads CUDA at
# run time, so it builds and runs without it. The GPU variants of the tests run where
# there is a GPU and print why they skip elsewhere; the kernel sources are compiled with
# NVRTC everywhere (NVRTC needs no GPU; it comes from PyPI's nvidia-cuda-nvrtc).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-venv
if ! "$venv/bin/python" -c "import openai, pytest, nvidia, yaml, schemathesis, lm_eval, transformers, langchain_openai, litellm, jsonschema" >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet -r tests/openai/requirements.txt -r kernels/requirements-nvrtc.txt
fi
nvrtc_lib=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))")
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SWITCHYARD_REQUIRE_NVRTC=1

# The build without the feature must keep compiling too.
cargo check --workspace --all-targets --locked
cargo build --workspace --all-targets --locked --features switchyard/cuda
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast --features switchyard/cuda
else
    cargo test --workspace --locked --no-fail-fast --features switchyard/cuda
fi

SWITCHYARD_BIN="$PWD/target/debug/switchyard" "$venv/bin/python" -m pytest -q tests/openai
