"""The Kubernetes manifests (k8s/, docs/deploy.md), checked offline.

Every kustomization (the base and each overlay) is rendered with ``kubectl kustomize``;
every rendered document is validated against the Kubernetes 1.30 schemas in strict mode
(``kubernetes-validate``), or, for KEDA's ScaledObject (a CRD those schemas lack),
against a small JSON schema of the fields we use. Every container that runs ``glm`` is
parsed by the real CLI parser, with its ``GLM_*`` variables applied as the CLI applies
them, and so is the ``glm worker`` line of every rank a ``glm pool`` container launches,
so a manifest cannot name a subcommand, flag or variable that does not exist. Then the
invariants: GPUs = tp = rank sockets = scheduler's rank addresses, a metrics port per rank, NetworkPolicies, PDBs, probes, drain times,
security contexts, the KEDA trigger's stream and group, the dashboard's metric names.
"""

from __future__ import annotations

import json
import re

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
jsonschema = pytest.importorskip("jsonschema", reason="installed with kubernetes-validate")

from k8s_manifests import (  # noqa: E402
    K8S, K8S_VERSION, KUBECTL, OUR_IMAGES, OVERLAYS, ROOT, TARGETS, _container, _containers, _docs,
    _env, _glm_invocations, _inherited, _mounted_file, _one, _parse, _rank_invocations, _rendered,
    _subparser, _workloads,
)
from services.common import redis_keys  # noqa: E402
from services.worker.options import PoolOptions  # noqa: E402

pytestmark = [pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (kubectl kustomize renders k8s/)"),
              pytest.mark.processes]                                  # kubectl kustomize subprocesses

# The ScaledObject fields we use (keda.sh/v1alpha1), closed to anything else.
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
            "additionalProperties": False,
        },
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"horizontalPodAutoscalerConfig": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"behavior": {"type": "object"}}}},
                },
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                        "properties": {
                            "type": {"const": "redis-streams"},
                            "metadata": {
                                "type": "object", "additionalProperties": False,
                                "required": ["address", "stream", "consumerGroup", "lagCount"],
                                "properties": {
                                    "address": {"type": "string", "pattern": r"^[a-z0-9.-]+:\d+$"},
                                    "stream": {"type": "string"},
                                    "consumerGroup": {"type": "string"},
                                    # KEDA reads trigger metadata as strings.
                                    "lagCount": {"type": "string", "pattern": r"^\d+$"},
                                    "activationLagCount": {"type": "string", "pattern": r"^\d+$"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("target", TARGETS)
def test_every_document_is_valid(target):
    docs = _rendered(target)
    assert docs
    for doc in docs:
        where = f"k8s/{target}: {doc['kind']} {doc['metadata']['name']}"
        if doc["apiVersion"].startswith("keda.sh/"):
            try:
                jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_scaled_object_schema_rejects_unknown_fields():
    doc = next(d for d in _docs("base", "ScaledObject"))
    bad = json.loads(json.dumps(doc))
    bad["spec"]["triggers"][0]["metadata"]["lagcount"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


# ---- the commands against the real CLI ----

@pytest.mark.parametrize("target", TARGETS)
def test_glm_commands_parse_with_the_real_cli(target):
    ran = set()
    for workload in _workloads(target):
        pod = workload["spec"]["template"]["spec"]
        for container in _containers(pod):
            invocations = _glm_invocations(target, pod, container)
            if container["image"].split("/")[-1].split(":")[0] in OUR_IMAGES:
                assert invocations, f"{container['name']}: runs our image but no glm command was found"
                # Service links would inject GLM_<SERVICE>_PORT=tcp://... into a glm process.
                assert pod.get("enableServiceLinks") is False, workload["metadata"]["name"]
            env = _env(target, container)
            for argv in invocations:
                args = _parse(argv, env)
                ran.add(argv[1])
                if argv[1] == "pool":
                    for rank_argv in _rank_invocations(args):
                        _parse(rank_argv, _inherited(env, "worker"))
                        ran.add(rank_argv[1])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command", [])
                for word in command:
                    if word.startswith("/opt/"):
                        assert _mounted_file(target, pod, container, word), f"{probe} runs missing {word}"
    assert ran == {"gateway", "scheduler", "pool", "worker"}


def test_pool_command_is_checked_and_launches_worker_ranks():
    pod = _one("base", "Deployment", "glm-pool")["spec"]["template"]["spec"]
    [argv] = _glm_invocations("base", pod, _container("base", "glm-pool", "worker"))
    assert argv == ["glm", "pool"]
    env = _env("base", _container("base", "glm-pool", "worker"))
    with pytest.raises(AssertionError, match="no flag --no-such-flag"):
        _parse(argv + ["--no-such-flag"], env)
    with pytest.raises(AssertionError, match="no flag for"):
        _parse(argv, {**env, "GLM_NO_SUCH_FLAG": "1"})
    without = _parse(argv, {k: v for k, v in env.items() if k != "GLM_CHECKPOINT"})
    with pytest.raises(ValueError, match="--checkpoint DIR is required"):   # or --load-format dummy
        PoolOptions.from_args(without)
    [rank] = _rank_invocations(_parse(argv, env))
    assert rank[:2] == ["glm", "worker"] and "--listen" in rank and "--dist-init" in rank
    # Every setting of a rank is a setting of the pool: a glm-worker ConfigMap entry reaches the ranks.
    pool_flags = {s for a in _subparser("pool")._actions for s in a.option_strings}
    per_rank = {"--rank", "--listen", "--dist-init", "--metrics-port"}
    worker_flags = {s for a in _subparser("worker")._actions for s in a.option_strings} - per_rank
    assert worker_flags <= pool_flags, sorted(worker_flags - pool_flags)


# ---- the pool: GPUs, tp, ranks ----

def _pool_ranks(target: str) -> list:
    """The parsed ``glm worker`` arguments of every rank the pool's worker container launches."""
    pod = _one(target, "Deployment", "glm-pool")["spec"]["template"]["spec"]
    worker = _container(target, "glm-pool", "worker")
    env = _env(target, worker)
    [argv] = _glm_invocations(target, pod, worker)
    return [_parse(r, _inherited(env, "worker")) for r in _rank_invocations(_parse(argv, env))]


@pytest.mark.parametrize("target", TARGETS)
def test_pool_gpus_equal_tp_and_rank_addresses(target):
    worker = _container(target, "glm-pool", "worker")
    scheduler = _container(target, "glm-pool", "scheduler")
    tp = int(_env(target, worker)["GLM_TP"])
    res = worker["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == tp
    assert int(res["requests"]["nvidia.com/gpu"]) == tp
    assert "nvidia.com/gpu" not in scheduler.get("resources", {}).get("limits", {})
    workers = _env(target, scheduler)["GLM_WORKERS"].split(",")
    assert workers == [f"unix:///run/glm/rank-{r}.sock" for r in range(tp)]
    ranks = _pool_ranks(target)
    assert [r.rank for r in ranks] == list(range(tp)) and {r.tp for r in ranks} == {tp}
    assert [r.listen for r in ranks] == workers, "the ranks' sockets are the scheduler's workers"
    assert len({r.dist_init for r in ranks}) == 1 and ranks[0].dist_init.startswith("tcp://127.0.0.1:")
    assert worker.get("restartPolicy") == "Always", "the worker is a native sidecar (starts first, stops last)"
    pod = _one(target, "Deployment", "glm-pool")["spec"]["template"]["spec"]
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    count = next(e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.count")
    assert count["operator"] == "Gt" and int(count["values"][0]) == tp - 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_sets_its_tp_and_quantization(name):
    target = f"overlays/{name}"
    tp, quant = OVERLAYS[name]
    env = _env(target, _container(target, "glm-pool", "worker"))
    assert (int(env["GLM_TP"]), env["GLM_QUANT"]) == (tp, quant)
    assert int(_container(target, "glm-pool", "worker")["resources"]["limits"]["nvidia.com/gpu"]) == tp
    checkpoint = env["GLM_CHECKPOINT"]
    assert _env(target, _container(target, "glm-pool", "scheduler"))["GLM_CHECKPOINT"] == checkpoint
    gateway = _env(target, _container(target, "glm-gateway", "gateway"))["GLM_GATEWAY_MODEL"]
    assert gateway.split("=", 1)[1] == checkpoint


# ---- autoscaling ----

@pytest.mark.parametrize("target", TARGETS)
def test_keda_scales_pools_on_the_queue_lag(target):
    [scaled] = _docs(target, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "glm-pool"
    [trigger] = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    model = _env(target, _container(target, "glm-pool", "scheduler"))["GLM_MODEL"]
    assert meta["stream"] == redis_keys.queue(model)
    assert meta["consumerGroup"] == redis_keys.GROUP
    assert int(meta["lagCount"]) >= 1
    namespace = _one(target, "Service", "glm-redis")["metadata"].get("namespace", "default")
    assert meta["address"] == f"glm-redis.{namespace}.svc.cluster.local:6379"
    [hpa] = _docs(target, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "glm-gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


# ---- network, disruption, probes, shutdown, security ----

def _policy(target: str, app: str) -> dict:
    for pol in _docs(target, "NetworkPolicy"):
        if pol["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == app:
            return pol
    pytest.fail(f"k8s/{target}: no NetworkPolicy selects {app}")


PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def _is_metrics_rule(rule: dict) -> bool:
    return rule.get("from") == [PROMETHEUS]


def _metrics_ports(container: dict) -> set[int]:
    return {p["containerPort"] for p in container.get("ports", []) if p["name"].startswith("metrics")}


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies(target):
    policies = _docs(target, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"]
            and not p["spec"].get("ingress")]
    assert deny, "no default deny-ingress policy"
    # Only the gateway accepts traffic from outside the namespace, on its gRPC port; Prometheus
    # (from its namespace) reaches the metrics port.
    rule, metrics = _policy(target, "glm-gateway")["spec"]["ingress"]
    assert "from" not in rule and [p["port"] for p in rule["ports"]] == [50051]
    gateway = _container(target, "glm-gateway", "gateway")
    assert _is_metrics_rule(metrics) and [p["port"] for p in metrics["ports"]] == [9090]
    assert _metrics_ports(gateway) == {int(_env(target, gateway)["GLM_METRICS_PORT"])} == {9090}
    for pol in policies:
        app = pol["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        for rule in pol["spec"].get("ingress", []):
            if app != "glm-gateway":
                assert rule.get("from"), f"{pol['metadata']['name']}: a rule open to everyone"
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer and peer != PROMETHEUS:  # only KEDA's operator, to read the lag
                    assert app == "glm-redis"
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
    # Redis: gateway and pools (and KEDA) only.
    [rule] = _policy(target, "glm-redis")["spec"]["ingress"]
    pods = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in rule["from"]
            if "namespaceSelector" not in p}
    assert pods == {"glm-gateway", "glm-pool"}
    assert [p["port"] for p in rule["ports"]] == [6379]
    # The collector: every pod of the application.
    [rule] = _policy(target, "glm-otel-collector")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "glm-serve"}}}]
    # The pools: only Prometheus reaches them, on the metrics ports; no Service reaches them;
    # their only container ports are the scheduler's and every rank's metrics endpoint.
    [pool_policy] = [p for p in policies
                     if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "glm-pool"]
    [rule] = pool_policy["spec"]["ingress"]
    assert _is_metrics_rule(rule)
    open_ports = set()
    for port in rule["ports"]:
        open_ports |= set(range(port["port"], port.get("endPort", port["port"]) + 1))
    for svc in _docs(target, "Service"):
        assert svc["spec"]["selector"].get("app.kubernetes.io/name") != "glm-pool"
    pool = _one(target, "Deployment", "glm-pool")["spec"]["template"]["spec"]
    for c in _containers(pool):
        assert _metrics_ports(c) == {p["containerPort"] for p in c.get("ports", [])}, c["name"]
    scheduler, worker = _container(target, "glm-pool", "scheduler"), _container(target, "glm-pool", "worker")
    assert _metrics_ports(scheduler) == {int(_env(target, scheduler)["GLM_METRICS_PORT"])}
    tp, base = int(_env(target, worker)["GLM_TP"]), int(_env(target, worker)["GLM_POOL_METRICS_PORT"])
    assert _metrics_ports(worker) == set(range(base, base + tp))   # glm pool: rank r on base + r
    ranks = _pool_ranks(target)
    assert [r.metrics_port for r in ranks] == [base + r for r in range(tp)]
    assert {r.metrics_host for r in ranks} == {"0.0.0.0"}, "Prometheus scrapes the ranks from outside the pod"
    assert _metrics_ports(scheduler) | _metrics_ports(worker) <= open_ports
    for workload in _workloads(target):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "glm-serve"


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets(target):
    selected = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: p["spec"]
                for p in _docs(target, "PodDisruptionBudget")}
    assert set(selected) >= {"glm-gateway", "glm-pool"}
    hpa = _one(target, "HorizontalPodAutoscaler", "glm-gateway")
    assert selected["glm-gateway"]["minAvailable"] < hpa["spec"]["minReplicas"], "a gateway PDB that blocks drains"
    assert selected["glm-pool"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("target", TARGETS)
def test_probes(target):
    gateway = _container(target, "glm-gateway", "gateway")
    port = int(_env(target, gateway)["GLM_PORT"])
    assert gateway["readinessProbe"]["grpc"]["port"] == port == 50051
    assert "livenessProbe" in gateway and "startupProbe" in gateway
    [svc_port] = _one(target, "Service", "glm-gateway")["spec"]["ports"]
    assert svc_port["port"] == 50051
    worker = _container(target, "glm-pool", "worker")
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["python", "/opt/glm/pool_health.py"]
    assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 1200
    redis_pod = _one(target, "StatefulSet", "glm-redis")["spec"]["template"]["spec"]
    for c in (next(c for c in _containers(redis_pod) if c["name"] == "redis"),
              _container(target, "glm-otel-collector", "collector")):
        assert "readinessProbe" in c and "livenessProbe" in c


def _flags(args: list[str]) -> dict[str, str]:
    return {name[2:]: value for name, value in zip(args[::2], args[1::2])}


@pytest.mark.parametrize("target", TARGETS)
def test_redis_persists_and_refuses_when_full(target):
    """The in-cluster Redis keeps its data across restarts (AOF on a claim of its own)
    and, full, refuses writes instead of evicting a stream (docs/deploy.md)."""
    redis_set = _one(target, "StatefulSet", "glm-redis")["spec"]
    assert redis_set["replicas"] == 1 and redis_set["serviceName"] == "glm-redis"
    [claim] = redis_set["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    [redis] = [c for c in _containers(redis_set["template"]["spec"]) if c["name"] == "redis"]
    flags = _flags(redis["args"])
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    assert flags["maxmemory-policy"] == "noeviction" and flags["maxmemory"]
    mount = next(m for m in redis["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == flags["dir"]
    assert not redis_set["template"]["spec"].get("volumes"), "the data volume is the claim, not a pod volume"
    assert not _docs(target, "Deployment") or all(d["metadata"]["name"] != "glm-redis"
                                                  for d in _docs(target, "Deployment"))


@pytest.mark.parametrize("target", TARGETS)
def test_graceful_shutdown_leaves_time_to_drain(target):
    gateway_pod = _one(target, "Deployment", "glm-gateway")["spec"]["template"]["spec"]
    gateway = _container(target, "glm-gateway", "gateway")
    grace = float(_env(target, gateway)["GLM_GRACE_PERIOD_S"])
    pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gateway_pod["terminationGracePeriodSeconds"] >= grace + pre_stop + 10
    pool_pod = _one(target, "Deployment", "glm-pool")["spec"]["template"]["spec"]
    drain = float(_env(target, _container(target, "glm-pool", "scheduler"))["GLM_DRAIN_TIMEOUT_S"])
    assert drain >= 120, "a long generation needs minutes to finish"
    assert pool_pod["terminationGracePeriodSeconds"] >= drain + 30   # + the ranks' own stop


@pytest.mark.parametrize("target", TARGETS)
def test_security_contexts_and_resources(target):
    for workload in _workloads(target):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        for c in _containers(pod):
            where = f"{workload['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], where
            assert c["resources"]["requests"]["cpu"], where


# ---- observability ----

DOCUMENTED_METRIC = re.compile(r"^\| `(glm_[a-z0-9_]+)` \|", re.M)


def test_dashboard_uses_documented_metric_names():
    documented = set(DOCUMENTED_METRIC.findall((ROOT / "docs/deploy.md").read_text()))
    assert documented, "docs/deploy.md lists no metric"
    for name in documented:
        assert re.fullmatch(r"glm_(gateway|scheduler|worker)_[a-z0-9_]+", name), name
    dashboard = json.loads((K8S / "base/files/glm-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"glm_[a-z0-9_]+", target["expr"])}
    assert used and used <= documented, f"undocumented: {sorted(used - documented)}"
    config_map = _one("base", "ConfigMap", "glm-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["glm-dashboard.json"]) == dashboard


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_exports_traces_to_the_collector(target):
    collector = _one(target, "Service", "glm-otel-collector")
    [port] = collector["spec"]["ports"]
    endpoint = f"glm-otel-collector:{port['port']}"
    for deployment, container in (("glm-gateway", "gateway"), ("glm-pool", "scheduler"), ("glm-pool", "worker")):
        assert _env(target, _container(target, deployment, container))["GLM_OTLP_ENDPOINT"] == endpoint
