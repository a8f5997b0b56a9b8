"""deploy/compose.yaml for real: the image built from the test's binary, 3 coordinators, 3 expert
nodes and 2 routers as separate containers over mutual TLS, driven by the official `openai`
client with 64 concurrent streaming requests at a time while the coordinators' leader is cut off
the network and an expert node is killed. Every answer must equal the single-process run's.
Everything the test starts is removed at its end, also when it fails."""

import concurrent.futures
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

from conftest import BIN, ROOT

MODEL = "switchyard-code-moe"
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):"]
MAX_TOKENS = 12


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200
    except OSError:
        return False


def reference(prompt):
    """The single-process engine's greedy text."""
    out = json.loads(run(BIN, "generate", "--model", str(ROOT / "models" / MODEL), "--prompt", prompt,
                         "--max-tokens", str(MAX_TOKENS), "--json"))
    return "".join(t["text"] for t in out["tokens"])


class Compose:
    def __init__(self):
        self.project = f"switchyard-test-{os.getpid()}"
        self.image = f"switchyard-compose-test:{os.getpid()}"
        self.ports = [free_port(), free_port()]
        self.env = {**os.environ, "SWITCHYARD_IMAGE": self.image,
                    "SWITCHYARD_HTTP_PORT_1": str(self.ports[0]), "SWITCHYARD_HTTP_PORT_2": str(self.ports[1])}
        run(str(ROOT / "deploy" / "docker" / "build.sh"), BIN, self.image)

    def __call__(self, *args):
        return run("docker-compose", "-p", self.project, "-f", str(ROOT / "deploy" / "compose.yaml"), *args,
                   env=self.env)

    def container(self, service):
        return self("ps", "-q", service).strip()

    def status(self, avoid=None):
        """The coordinators' view, asked from inside a coordinator's container (not `avoid`'s,
        which may be cut off) of the members that are not `avoid`."""
        members = [c for c in ("c1", "c2", "c3") if c != avoid]
        for service in members:
            try:
                out = run("docker", "exec", self.container(service), "/usr/local/bin/switchyard", "cluster", "status",
                          "--coordinators", ",".join(f"{m}:7100" for m in members), "--json",
                          "--tls-ca", "/pki/ca.pem", "--tls-cert", "/pki/admin.pem", "--tls-key", "/pki/admin-key.pem",
                          timeout=20)
                return json.loads(out)["coordinator"]
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                continue
        return None

    def remove(self):
        subprocess.run(["docker-compose", "-p", self.project, "-f", str(ROOT / "deploy" / "compose.yaml"), "down",
                        "-v", "--timeout", "5"], env=self.env, capture_output=True)
        subprocess.run(["docker", "rmi", "-f", self.image], capture_output=True)


def stream(port, prompt):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_the_compose_cluster_answers_exactly_through_a_partitioned_leader_and_a_killed_node():
    compose = Compose()
    try:
        compose("up", "-d")
        wait_for("both routers ready", lambda: all(ready(p) for p in compose.ports))
        expected = {p: reference(p) for p in PROMPTS}

        results, stop = [], threading.Event()

        def load():
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                while not stop.is_set():
                    jobs = [(PROMPTS[i % len(PROMPTS)], compose.ports[i % 2]) for i in range(64)]
                    futures = [(p, pool.submit(stream, port, p)) for p, port in jobs]
                    for p, f in futures:
                        try:
                            results.append((p, f.result()))
                        except Exception as e:  # a failed request is counted, not raised here
                            results.append((p, e))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            wait_for("a first round of 64", lambda: len(results) >= 64)
            timings = {}
            # The leader is cut off the network, then comes back.
            leader = compose.status()["leader"]
            network = f"{compose.project.replace('-', '')}_cluster"
            if network not in run("docker", "network", "ls", "--format", "{{.Name}}"):
                network = f"{compose.project}_cluster"
            victim = compose.container(f"c{leader}")
            start = time.monotonic()
            run("docker", "network", "disconnect", network, victim)
            avoid = f"c{leader}"
            wait_for("a new leader", lambda: (compose.status(avoid) or {}).get("leader") not in (None, 0, leader), 60)
            timings["leader cut off → new leader"] = time.monotonic() - start
            run("docker", "network", "connect", "--alias", f"c{leader}", network, victim)
            # An expert node is killed outright; its experts have replicas.
            before = len(results)
            start = time.monotonic()
            run("docker", "kill", compose.container("n3"))
            wait_for("an epoch without the killed node",
                     lambda: any(n["state"] == "dead" for n in (compose.status() or {}).get("nodes", [])), 60)
            timings["expert node killed → declared dead"] = time.monotonic() - start
            wait_for("another round of 64 after the kill", lambda: len(results) >= before + 128)
        finally:
            stop.set()
            loader.join()
        for what, seconds in timings.items():
            print(f"{what}: {seconds:.2f} s")
        failed = [(p, r) for p, r in results if isinstance(r, Exception)]
        wrong = [(p, r) for p, r in results if not isinstance(r, Exception) and r != expected[p]]
        print(f"{len(results)} streaming requests: {len(failed)} failed, {len(wrong)} wrong")
        assert not failed, failed[:3]
        assert not wrong, wrong[:3]
    finally:
        compose.remove()
