"""k8s/: the KubeRay RayJobs against KubeRay's own CRD schemas, their pod templates against Kubernetes' schemas,
version pins, no credentials, entrypoints that exist and accept their flags, and the cluster shape the guide
(docs/kubernetes.md) promises.

Fast and offline: no Kubernetes API server (kubectl cannot validate without one). The CRD checks need KubeRay's
CRDs from ../shared/kuberay/ and skip, saying so, where that folder is absent (a fresh clone); everything else
always runs. Run: python -m pytest -q tests/test_k8s.py
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from raypatch.cli import build_parser
from raypatch.presets import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay"
RAYJOBS = ("prepare.yaml", "pretrain.yaml", "tune.yaml")
GPU_JOBS = ("pretrain.yaml", "tune.yaml")
APP_DIR = "/home/ray/raypatch"  # where k8s/Dockerfile puts the project
SPOT_LABELS = {"eks.amazonaws.com/capacityType": "SPOT", "cloud.google.com/gke-spot": "true",
               "kubernetes.azure.com/scalesetpriority": "spot"}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1, f"k8s/{name}: expected one document, got {len(docs)}"
    return docs[0]


def pinned(dep: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(rf"{dep}(?:\[[^\]]*\])?==(\S+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"expected one {dep}==X.Y.Z pin in pyproject.toml, got {deps}"
    return pins[0]


def storage_prefix() -> str:
    return load("config.yaml")["data"]["RAYPATCH_STORAGE"]


def pod_templates(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """'head', 'worker:<group>' and 'submitter' -> the pod template."""
    spec = job["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]}
    for g in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        out[f"worker:{g['groupName']}"] = g["template"]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in pod_templates(job).values() for c in t["spec"]["containers"]]


def entrypoint_argv(job: dict[str, Any]) -> list[str]:
    """The entrypoint as the job's shell runs it, $RAYPATCH_STORAGE taken from k8s/config.yaml."""
    text = job["spec"]["entrypoint"].replace("$RAYPATCH_STORAGE", storage_prefix())
    assert "$" not in text, f"an environment variable the ConfigMap does not set: {text}"
    return shlex.split(text)


def overrides(argv: list[str]) -> dict[str, str]:
    """The --set key=value pairs of an entrypoint."""
    args = argv[argv.index("--set") + 1:] if "--set" in argv else []
    out = {}
    for a in args:
        if a.startswith("--"):
            break
        k, v = a.split("=", 1)
        out[k] = v
    return out


# --- KubeRay's CRD schemas ------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema as a JSON schema that refuses unknown fields, as `kubectl apply` does (strict
    field validation, the default since Kubernetes 1.27; without it the API server drops them silently). The
    x-kubernetes-* extensions go (int-or-string comes with its own anyOf); objects that preserve unknown fields
    or are maps (additionalProperties) stay open. CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} (KubeRay's RayJob and RayCluster CRDs) is absent: the CRD checks need it; CI has it")
    import jsonschema

    out = {}
    for kind, name in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        crd = yaml.safe_load((CRDS / name).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return out


def crd_errors(validators: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}"
            for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_passes_kuberays_crd_schema(validators, name):
    job = load(name)
    assert job["kind"] == "RayJob"
    assert crd_errors(validators, job) == []
    # The cluster part is also a valid RayCluster (what KubeRay creates from it).
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
               "spec": job["spec"]["rayClusterSpec"]}
    assert crd_errors(validators, cluster) == []


@pytest.mark.parametrize("edit, where", [
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceTyp="ClusterIP"), "serviceTyp"),
    (lambda j: j["spec"].update(backoffLimit="3"), "backoffLimit"),
    (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "mode"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"), "maxReplicas"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 4}), "num-cpus"),
])
def test_the_crd_check_refuses_what_kuberay_would(validators, edit, where):
    job = copy.deepcopy(load("pretrain.yaml"))
    edit(job)
    errors = crd_errors(validators, job)
    assert errors and any(where in e for e in errors), errors


# --- Kubernetes' own schemas for the pods and the plain objects -----------------------------------------------


def k8s_validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", RAYJOBS)
def test_pod_templates_pass_kubernetes_schemas(name):
    for role, t in pod_templates(load(name)).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role.replace(":", "-"), **t.get("metadata", {})},
               "spec": t["spec"]}
        k8s_validate(pod)


@pytest.mark.parametrize("name", ["config.yaml", "serviceaccount.yaml"])
def test_plain_objects_pass_kubernetes_schemas(name):
    k8s_validate(load(name))


def test_the_pod_check_refuses_a_typo():
    import kubernetes_validate

    t = copy.deepcopy(pod_templates(load("pretrain.yaml"))["worker:gpu"])
    t["spec"]["containers"][0]["resourcs"] = t["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": t["spec"]})


# --- pins, credentials, entrypoints ---------------------------------------------------------------------------


def test_versions_are_pinned_as_in_pyproject_and_cluster_yaml():
    ray = pinned("ray")
    docker = (K8S / "Dockerfile").read_text()
    base = re.findall(r"^FROM (\S+)", docker, re.M)
    assert base == [f"rayproject/ray:{ray}-py311-gpu"], base
    assert yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"] == base[0]
    assert f"ray.__version__ == '{ray}'" in docker, "the image build should refuse another Ray"
    torch = re.search(r"pip install torch==(\S+)", (ROOT / "README.md").read_text()).group(1)
    assert re.search(rf"pip install [^\n]*torch=={re.escape(torch)}\b", docker), f"torch=={torch} as in the README"
    assert docker.index("torch==") < docker.index("pip install --no-cache-dir -e"), "torch before the project"
    images = set()
    for name in RAYJOBS:
        job = load(name)
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray, name
        images |= {c["image"] for c in containers(job)}
    assert len(images) == 1, f"one image for head, workers and submitter, got {images}"
    assert images.pop().endswith(f":{pinned_project_version()}-ray{ray}-py311-gpu")


def pinned_project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_no_credentials_in_any_manifest():
    for f in sorted(K8S.iterdir()):
        text = f.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{12,}", text), f"{f.name}: an AWS access key id"
        for needle in ("aws_secret_access_key", "aws_session_token", "password:", "auth_token:"):
            assert needle not in text.lower(), f"{f.name}: {needle}"
        if f.suffix == ".yaml":
            doc = load(f.name)
            assert doc["kind"] != "Secret", f"{f.name}: secrets are created with kubectl, never kept in a file"
            if doc["kind"] == "ConfigMap":
                assert not [k for k in doc["data"] if SECRET_NAME.search(k)], f"{f.name}: a secret in a ConfigMap"
    for name in RAYJOBS:
        for c in containers(load(name)):
            for e in c.get("env", []):
                assert not (SECRET_NAME.search(e["name"]) and "value" in e), f"{name}: {e['name']} set inline"
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"].get("optional") is True, f"{name}: workload identity comes first"


@pytest.mark.parametrize("name", RAYJOBS)
def test_entrypoint_is_a_job_script_with_flags_its_parser_accepts(name):
    argv = entrypoint_argv(load(name))
    assert argv[0] == "python" and argv[1].startswith(APP_DIR + "/"), argv[:2]
    script = ROOT / argv[1][len(APP_DIR) + 1:]
    assert script.parent.name == "jobs" and script.is_file(), f"{argv[1]} is not a jobs/*.py of this repository"
    text = script.read_text()
    if "runpy" in text:  # jobs/tune.py runs tuning/tune.py
        text = (ROOT / "tuning" / "tune.py").read_text()
    command = re.search(r'main\(\["(\w+)"', text).group(1)
    args = build_parser().parse_args([command, *argv[2:]])  # SystemExit (2) on a flag it does not know
    if command in ("train", "tune"):
        load_config(args.config, args.set)  # ValueError on an unknown key or a bad value


# --- the shape the guide promises -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAYJOBS)
def test_cluster_shape(name):
    job = load(name)
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    # A failed attempt retries on a fresh cluster, and the cluster goes when the job ends.
    assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard and job API stay inside the cluster"
    assert "enableIngress" not in head
    head_pod = head["template"]["spec"]
    assert head["rayStartParams"].get("num-gpus", "0") == "0"
    for c in head_pod["containers"]:
        assert "nvidia.com/gpu" not in str(c.get("resources", {})), "the head has no GPU"
    assert not set(head_pod.get("nodeSelector", {}).items()) & set(SPOT_LABELS.items()), "the head is on demand"
    for role, t in pod_templates(job).items():
        assert t["spec"].get("serviceAccountName") == "raypatch", f"{role}: the bucket identity"
        for c in t["spec"]["containers"]:
            assert {"configMapRef": {"name": "raypatch"}} in c.get("envFrom", []), f"{role}: RAYPATCH_STORAGE"
    for g in cluster["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        pod = g["template"]["spec"]
        assert set(pod.get("nodeSelector", {}).items()) & set(SPOT_LABELS.items()), f"{g['groupName']}: spot nodes"
        tolerated = {t["key"] for t in pod.get("tolerations", [])}
        assert {k for k in SPOT_LABELS if k != "eks.amazonaws.com/capacityType"} <= tolerated
        c = pod["containers"][0]
        assert c["resources"]["requests"] == c["resources"]["limits"], "guaranteed pods: no noisy eviction"


@pytest.mark.parametrize("name", GPU_JOBS)
def test_gpu_jobs_train_on_gpu_workers_and_keep_their_state_in_the_bucket(name):
    job = load(name)
    argv = entrypoint_argv(job)
    sets = overrides(argv)
    prefix = storage_prefix()
    assert "://" in prefix
    for key in ("data.shards", "checkpoint.storage_path"):
        assert sets[key].startswith(prefix + "/"), f"{key}: no shared disk on a cluster, the bucket only"
    cfg = load_config(argv[argv.index("--config") + 1], [f"{k}={v}" for k, v in sets.items()])
    assert cfg.scale.use_gpu and cfg.checkpoint.name
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "a GPU worker group"
    per_pod = {int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in gpu}
    assert per_pod == {1} and all(g["rayStartParams"].get("num-gpus") == "1" for g in gpu)
    most = sum(g["maxReplicas"] for g in gpu)
    concurrency = int(argv[argv.index("--concurrency") + 1]) if "--concurrency" in argv else 1
    assert concurrency * cfg.scale.num_workers <= most, "the autoscaler can place every worker asked for"
    # SIGTERM hand-over: the just-in-time checkpoint fits in the pod's grace period.
    for g in gpu:
        assert 0 < cfg.checkpoint.sigterm_grace_s < g["template"]["spec"]["terminationGracePeriodSeconds"]


def test_the_tokenizer_and_shards_go_to_the_bucket():
    argv = entrypoint_argv(load("prepare.yaml"))
    args = build_parser().parse_args(["prepare", *argv[2:]])
    prefix = storage_prefix()
    assert args.out.startswith(prefix + "/") and all(i.startswith(prefix + "/") for i in args.input)
    assert args.overwrite, "a retried attempt replaces what its failed attempt left"
    pretrain = overrides(entrypoint_argv(load("pretrain.yaml")))
    assert pretrain["data.shards"] == args.out, "pretrain.yaml reads the set prepare.yaml writes"
