"""`switchyard up` as a newcomer runs it: no --model (the embedded code model), answers the
OpenAI API, writes Python that parses, and leaves no process behind after SIGTERM."""

import ast
import pathlib

from conftest import Server

PROMPTS = [
    "def fibonacci(n):",
    "def is_prime(n):",
    "def read_lines(path):",
    "def flatten(items):",
    "class Stack:\n    def __init__(self):",
    "def parse_args(argv):",
    "import os\n\n\ndef list_files(path):",
    "def count_words(text):",
    "def merge(a, b):",
    "class Point:\n    def __init__(self, x, y):",
    "def _check_name(name):",
    "def load_config(filename):",
]


def children_of(pid):
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid):
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def complete_lines(prompt, text, finish_reason):
    """The prompt and completion up to the last complete line (a cut at max_tokens leaves a
    partial one)."""
    code = prompt + text
    if finish_reason == "length" and "\n" in code:
        code = code[: code.rindex("\n")]
    return code


def test_up_without_a_model_serves_the_embedded_code_model_and_stops_cleanly(tmp_path):
    server = Server(["up", "--expert-nodes", "2", "--http", "127.0.0.1:0", "--data-dir", str(tmp_path)])
    try:
        children = children_of(server.proc.pid)
        assert len(children) == 6, "a router, two expert nodes and three coordinators"
        client = server.client()
        model = client.models.list().data[0].id
        assert model == "switchyard-code-moe"
        parsed = 0
        for prompt in PROMPTS:
            r = client.completions.create(
                model=model, prompt=prompt, max_tokens=80, temperature=0, stop=["\ndef ", "\nclass ", "\n\n\n", "\nif __name__"]
            )
            code = complete_lines(prompt, r.choices[0].text, r.choices[0].finish_reason)
            try:
                ast.parse(code)
                parsed += 1
            except SyntaxError:
                print("does not parse:\n" + code)
        rate = parsed / len(PROMPTS)
        print(f"greedy completions that parse: {parsed}/{len(PROMPTS)} ({rate:.0%})")
        assert rate >= 0.5, f"only {parsed} of {len(PROMPTS)} completions parse"
        # Chat clients work too: the request becomes comments, the answer is code.
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "def fibonacci(n):"}], max_tokens=24, temperature=0
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        assert chat.usage.completion_tokens > 0
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert not [p for p in children if alive(p)], "children outlived `up`"
    logs = sorted(f.name for f in (tmp_path / "logs").iterdir())
    assert logs == [*(f"coordinator-{i}.log" for i in (1, 2, 3)), "expert-node-0.log", "expert-node-1.log", "router.log"]
    # The raft state outlives the cluster, in the data directory.
    assert all((tmp_path / f"coordinator-{i}" / "snapshot").exists() for i in (1, 2, 3))
    # So does the cluster's CA; every private key is readable by its owner only.
    keys = sorted((tmp_path / "tls").glob("*-key.pem"))
    assert (tmp_path / "tls" / "ca-key.pem") in keys and (tmp_path / "tls" / "admin-key.pem") in keys
    assert all(k.stat().st_mode & 0o077 == 0 for k in keys), [oct(k.stat().st_mode) for k in keys]
