"""deploy/k8s: every overlay builds with `kubectl kustomize` (kubectl must be on PATH), and what
it renders is what a user relies on: probes on every role, the coordinators' raft StatefulSet
and its headless Service, GPUs where the overlay says and nowhere else, disruption budgets,
autoscalers that scale on metrics the router exports, and only flags and environment variables
the binary (`switchyard ROLE --help`) knows."""

import functools
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

from conftest import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu", "gpu-autoscaling"]
GPU_OVERLAYS = ["gpu", "gpu-autoscaling"]
GPU = "nvidia.com/gpu"
ROLES = {"coordinator", "expert-node", "router"}
# The port each role serves its probes on, and the flag that opens it.
PROBE_PORT = {"coordinator": 9000, "expert-node": 9000, "router": 8000}
PROBE_FLAG = {"coordinator": "--probe-listen", "expert-node": "--probe-listen", "router": "--http"}
WORKLOADS = {"Deployment", "StatefulSet"}


def kustomize(path):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed on PATH to build deploy/k8s (`kubectl kustomize`)"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"kubectl kustomize {path} rendered nothing"
    return docs


@functools.cache
def rendered(overlay):
    return kustomize(K8S / "overlays" / overlay)


def objects(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOADS]


def containers(docs):
    """(workload, container) for every container of every Deployment and StatefulSet."""
    return [(w, c) for w in workloads(docs) for c in w["spec"]["template"]["spec"]["containers"]]


def role_of(container):
    role = container["args"][0]
    assert role in ROLES, f"container {container['name']} runs `switchyard {role}`, not a role"
    return role


def flags(container):
    """{flag: value} of a container's args (`--flag=value`, `--flag value` or a bare `--flag`)."""
    args, out, i = container["args"][1:], {}, 0
    while i < len(args):
        a = args[i]
        assert a.startswith("--"), f"{container['name']}: unexpected argument {a!r}"
        if "=" in a:
            k, v = a.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a, args[i + 1]
            i += 1
        else:
            k, v = a, None
        out[k] = v
        i += 1
    return out


def env(container):
    return {e["name"]: e for e in container.get("env", [])}


def workload(docs, role):
    found = [w for w, c in containers(docs) if role_of(c) == role]
    assert len(found) == 1, f"expected one workload running {role}, found {len(found)}"
    return found[0]


def pod_labels(w):
    return w["spec"]["template"]["metadata"]["labels"]


def selects(selector, labels):
    return bool(selector.get("matchLabels")) and all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@functools.cache
def help_of(role):
    """The flags and environment variables `switchyard ROLE --help` lists."""
    out = subprocess.run([BIN, role, "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out)), set(re.findall(r"\[env: (SWITCHYARD_[A-Z0-9_]+)", out))


@functools.cache
def exported_metrics():
    text = (ROOT / "router" / "src" / "metric_names.rs").read_text()
    names = set(re.findall(r'pub const \w+: &str = "(switchyard:[a-z0-9_]+)"', text))
    assert len(names) > 5, "could not read the router's metric names"
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_role_once_with_the_image(overlay):
    docs = rendered(overlay)
    assert sorted(role_of(c) for _, c in containers(docs)) == sorted(ROLES)
    for w, c in containers(docs):
        assert c["image"] == "switchyard:0.1.0", f"{w['metadata']['name']}: image {c['image']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_on_every_container(overlay):
    for w, c in containers(rendered(overlay)):
        role, name = role_of(c), w["metadata"]["name"]
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe, path in [("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")]:
            assert probe in c, f"{name}: no {probe}"
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe} on {get['path']}, not {path}"
            port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert port == PROBE_PORT[role], f"{name}: {probe} on port {port}"
        # The probes' port is the one the process serves them on.
        listen = flags(c).get(PROBE_FLAG[role])
        assert listen == f"0.0.0.0:{PROBE_PORT[role]}", f"{name}: {PROBE_FLAG[role]} is {listen}"
        # Weight loading gets a long budget before liveness counts.
        s = c["startupProbe"]
        assert s.get("periodSeconds", 10) * s.get("failureThreshold", 3) >= 300 or role == "coordinator", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coordinators_are_a_raft_statefulset(overlay):
    docs = rendered(overlay)
    sts = workload(docs, "coordinator")
    assert sts["kind"] == "StatefulSet"
    spec, name = sts["spec"], sts["metadata"]["name"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])]
    assert claims, "no volumeClaimTemplate for the raft state"
    c = spec["template"]["spec"]["containers"][0]
    f = flags(c)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts.get("/data") in claims, "/data is not the claimed volume"
    assert f["--data-dir"].startswith("/data/")

    # Headless Service that names the not-ready members too.
    svc = one(docs, "Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {k: pod_labels(sts)[k] for k in svc["spec"]["selector"]}

    # --id is the pod's ordinal, and the ordinals are the raft ids in --peers (ids start at 1).
    start = spec.get("ordinals", {}).get("start", 0)
    assert start >= 1, "raft ids start at 1: the pod ordinals must too"
    var = re.fullmatch(r"\$\((\w+)\)", f["--id"]).group(1)
    assert env(c)[var]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    want = {str(i): f"{name}-{i}.{spec['serviceName']}:7100" for i in range(start, start + spec["replicas"])}
    peers = dict(p.split("=", 1) for p in f["--peers"].split(","))
    assert peers == want
    assert f["--listen"].endswith(":7100")

    # Everyone else finds every member.
    for role in ["expert-node", "router"]:
        wc = workload(docs, role)["spec"]["template"]["spec"]["containers"][0]
        assert sorted(flags(wc)["--coordinators"].split(",")) == sorted(want.values()), role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_expert_nodes_advertise_stable_names(overlay):
    docs = rendered(overlay)
    sts = workload(docs, "expert-node")
    assert sts["kind"] == "StatefulSet"
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    svc = one(docs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert flags(c)["--advertise"] == f"$(POD_NAME).{sts['spec']['serviceName']}:7001"
    assert env(c)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod["terminationGracePeriodSeconds"] == 60
    shm = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert shm and vols[shm[0]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_routers_deployment_and_service(overlay):
    docs = rendered(overlay)
    d = workload(docs, "router")
    assert d["kind"] == "Deployment"
    svc = one(docs, "Service", "switchyard-router")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(d))
    assert 8000 in [p["port"] for p in svc["spec"]["ports"]]
    autoscaled = any(o["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
                     for o in objects(docs, "ScaledObject") + objects(docs, "HorizontalPodAutoscaler"))
    if autoscaled:
        assert "replicas" not in d["spec"], "an autoscaled Deployment must leave replicas to the autoscaler"
    else:
        assert d["spec"]["replicas"] == 2


def test_cpu_overlay_requests_no_gpu():
    docs = rendered("cpu")
    for w, c in containers(docs):
        res = c.get("resources", {})
        for part in ["requests", "limits"]:
            gpus = [k for k in res.get(part, {}) if "gpu" in k.lower()]
            assert not gpus, f"{w['metadata']['name']}: {part} {gpus}"
        assert "SWITCHYARD_DEVICE" not in env(c) or env(c)["SWITCHYARD_DEVICE"]["value"] == "cpu"
    for w in workloads(docs):
        assert not w["spec"]["template"]["spec"].get("tolerations"), w["metadata"]["name"]


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_requests_equal_limits(overlay):
    docs = rendered(overlay)
    c = workload(docs, "expert-node")["spec"]["template"]["spec"]["containers"][0]
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert GPU in req and int(req[GPU]) >= 1
    assert req[GPU] == lim[GPU]
    assert env(c)["SWITCHYARD_DEVICE"]["value"].startswith("cuda:")
    for role in ["coordinator", "router"]:
        rc = workload(docs, role)["spec"]["template"]["spec"]["containers"][0]
        assert not [k for k in rc.get("resources", {}).get("limits", {}) if "gpu" in k], role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets(overlay):
    docs = rendered(overlay)
    pdbs = objects(docs, "PodDisruptionBudget")
    for role in ["coordinator", "router"]:
        w = workload(docs, role)
        covering = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(w))]
        assert len(covering) == 1, f"{role}: {len(covering)} PodDisruptionBudgets"
        assert covering[0]["spec"].get("maxUnavailable") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_from_a_secret_per_role(overlay):
    docs = rendered(overlay)
    secrets = set()
    for w, c in containers(docs):
        name, e = w["metadata"]["name"], env(c)
        vols = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        for var in ["SWITCHYARD_TLS_CA", "SWITCHYARD_TLS_CERT", "SWITCHYARD_TLS_KEY"]:
            path = pathlib.PurePosixPath(e[var]["value"])
            mount = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
            assert mount and mount[0].get("readOnly") is True, f"{name}: {var} is not on a read-only mount"
            secrets.add((role_of(c), vols[mount[0]["name"]]["secret"]["secretName"]))
    assert len({s for _, s in secrets}) == len(ROLES) == len(secrets), secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_args_and_env_are_what_the_binary_takes(overlay):
    for w, c in containers(rendered(overlay)):
        role = role_of(c)
        known_flags, known_env = help_of(role)
        for flag in flags(c):
            assert flag in known_flags, f"{w['metadata']['name']}: `switchyard {role}` has no {flag}"
        defined = env(c)
        for var in defined:
            if var.startswith("SWITCHYARD_"):
                assert var in known_env, f"{w['metadata']['name']}: `switchyard {role}` reads no {var}"
        # Kubernetes passes an undefined $(VAR) on literally.
        for a in c["args"]:
            for var in re.findall(r"\$\((\w+)\)", a):
                assert var in defined, f"{w['metadata']['name']}: {a} uses $({var}), which is not set"


def autoscalers(docs):
    return objects(docs, "ScaledObject") + objects(docs, "HorizontalPodAutoscaler")


def check_autoscalers(docs):
    targets = [o["spec"]["scaleTargetRef"] for o in autoscalers(docs)]
    names = [t["name"] for t in targets]
    assert len(names) == len(set(names)), f"two autoscalers on one target: {names}"
    for t in targets:
        one(docs, t["kind"], t["name"])
    for so in objects(docs, "ScaledObject"):
        queries = [t["metadata"]["query"] for t in so["spec"]["triggers"] if t["type"] == "prometheus"]
        assert queries, "the ScaledObject has no prometheus trigger"
        for q in queries:
            used = set(re.findall(r"switchyard:[A-Za-z0-9_:]+", q))
            assert used, f"no switchyard metric in {q!r}"
            assert used <= exported_metrics(), f"not exported by the router: {used - exported_metrics()}"
        assert "switchyard:num_requests_waiting" in {m for q in queries for m in re.findall(r"switchyard:\w+", q)}


def test_gpu_autoscaling_scales_routers_with_keda():
    docs = rendered("gpu-autoscaling")
    check_autoscalers(docs)
    so = one(docs, "ScaledObject", "switchyard-router")
    assert so["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert so["spec"]["minReplicaCount"] >= 2
    assert not objects(docs, "HorizontalPodAutoscaler")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_plain_overlays_have_no_autoscaler(overlay):
    assert not autoscalers(rendered(overlay))


def test_hpa_component_with_the_cpu_overlay():
    """components/autoscaling-hpa, which no overlay uses, applied over overlays/cpu."""
    with tempfile.TemporaryDirectory() as tmp:
        pathlib.Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # kustomize takes relative paths only.
            "resources": [os.path.relpath(K8S / "overlays" / "cpu", tmp)],
            "components": [os.path.relpath(K8S / "components" / "autoscaling-hpa", tmp)],
        }))
        docs = kustomize(tmp)
    check_autoscalers(docs)
    hpa = one(docs, "HorizontalPodAutoscaler", "switchyard-router")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(docs, "Deployment", "switchyard-router")["spec"]
