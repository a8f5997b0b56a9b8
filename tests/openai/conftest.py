"""Starts a Switchyard cluster (`switchyard up`) for the OpenAI client tests and stops it after.

The binary is target/debug/switchyard unless SWITCHYARD_BIN names another; scripts/test.sh
builds it first.
"""

import json
import os
import pathlib
import signal
import subprocess
import threading

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "debug" / "switchyard"))
FIXTURES = ROOT / "tests" / "fixtures"


class Server:
    """A running `switchyard` child that printed `ready: grpc ADDR http ADDR`."""

    def __init__(self, args, env=None):
        self.proc = subprocess.Popen(
            [BIN, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        ready = threading.Event()
        self.words = []

        def read():
            for line in self.proc.stdout:
                if line.startswith("ready: "):
                    self.words = line.split()[1:]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.stop()
            raise RuntimeError(f"switchyard {args} did not get ready")
        self.http = "http://" + self.words[self.words.index("http") + 1]

    def client(self, **kw):
        return openai.OpenAI(base_url=self.http + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def async_client(self, **kw):
        return openai.AsyncOpenAI(base_url=self.http + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def up(model, *extra, env=None):
    return Server(["up", "--model", str(FIXTURES / model), "--expert-nodes", "2", "--http", "127.0.0.1:0", *extra], env)


@pytest.fixture(scope="session")
def qwen():
    """qwen3_moe (with a chat template) on a router and 2 expert nodes."""
    server = up("qwen3_moe")
    yield server
    server.stop()


def expected(model):
    return json.loads((FIXTURES / model / "expected.json").read_text())


def ids_of(tokens):
    """Token ids of tokens shown as `token_id:N` (`return_tokens_as_token_ids`)."""
    return [int(t.removeprefix("token_id:")) for t in tokens]
