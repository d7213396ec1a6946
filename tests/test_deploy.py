"""The deploy recipes, checked without Docker, Kubernetes or SLURM.

Offline validation: the Compose file against the Compose specification, the Kubernetes manifests against
the Kubernetes API schemas (KEDA's resources, which those schemas do not know, for the fields KEDA needs),
the sbatch script with `bash -n`, the Dockerfile against the package layout. Then what each recipe runs is
run here: its Redis command and health check against a real redis-server, and its `shardgen submit` /
`shardgen worker` command lines, with the variables a site sets substituted, until a run is done and the
worker drains on SIGTERM within the platform's grace period. Only what hardware and networks decide is
changed: addresses (a container's `redis:6379` is our redis-server's port), container paths (/runs, /cache,
the image's /opt/shardgen), the device (GPU -> cpu) and the metrics port (a free one).
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import psutil
import pytest
import redis
import yaml
from shardgen.producer.cli import cli
from shardgen.schemas.model import ModelSpec
from shardgen.workers.lifecycle import RunStore

from tests.conftest import REPO, SHARDGEN, RedisServer, free_port, run_status_now, wait_until

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
SBATCH = DEPLOY / "slurm" / "shardgen-workers.sbatch"
UNIT = DEPLOY / "systemd" / "shardgen-worker.service"
# The oldest Kubernetes minor the major clouds still run, and the newest kubernetes-validate (1.37.0) ships.
K8S_VERSIONS = ("1.32", "1.37")
SLURM_DEFAULT_KILL_WAIT_S = 30
REDIS_PASSWORD = "s3cretPassw0rd"
EXAMPLE_ROWS = 24  # producer/examples/questions.jsonl, the input the compose `cli` service submits by default
SMALL_ROWS = 4


# ---------------------------------------------------------------- reading the recipes
def assert_valid_shardgen_command(args: list[str]) -> None:
    """Parsed by the real click CLI: an unknown option or a bad value raises."""
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, args
    command.make_context(args[0], list(args[1:]))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


class MissingVariable(Exception):
    pass


_COMPOSE_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def compose_interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of a parsed file: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {key: compose_interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        missing = not current if op and op.startswith(":") else current is None
        if missing and op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return (arg if missing and op in (":-", "-") else current) or ""

    return _COMPOSE_VARIABLE.sub(substitute, value)


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services(env: Mapping[str, str]) -> dict[str, dict]:
    return compose_interpolate(compose_file()["services"], env)


def k8s_documents() -> list[dict]:
    """Every manifest under deploy/k8s except the kustomization itself."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for d in k8s_documents()
        if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) references in env values, command and args; unknown references stay as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def k8s_container_env(
    container: dict, configmaps: Mapping[str, dict], secrets: Mapping[str, dict]
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom first, then env in order, each value
    expanded with the variables defined before it; an optional key that is absent leaves it unset."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = k8s_expand(item["value"], env)
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = secrets[ref["name"]]
        if ref["key"] in secret:
            env[item["name"]] = secret[ref["key"]]
        else:
            assert ref.get("optional"), (
                f"{item['name']}: key {ref['key']} is missing from Secret {ref['name']}"
            )
    return env


def values_of(tree: Any, key: str) -> list[Any]:
    """Every value under `key`, anywhere in a parsed manifest."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [
            x for v in tree.values() for x in values_of(v, key)
        ]
    if isinstance(tree, list):
        return [x for item in tree for x in values_of(item, key)]
    return []


def secret_keys_in_example() -> tuple[set[str], set[str]]:
    """Keys of secrets.env.example: those set, and those commented out (optional)."""
    required, optional = set(), set()
    for line in (K8S / "secrets.env.example").read_text().splitlines():
        match = re.match(r"^(#?)([A-Z_][A-Z0-9_]*)=", line)
        if match:
            (optional if match.group(1) else required).add(match.group(2))
    return required, optional


def sbatch_directives() -> dict[str, str]:
    directives = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            directives[key] = value
    return directives


def sbatch_worker_argv(env: Mapping[str, str]) -> list[str]:
    """The worker command the script hands to srun, as bash computes it from the environment: the script runs
    as written up to its srun line, which prints the command instead of launching it."""
    script = SBATCH.read_text()
    launches = [line for line in script.splitlines() if line.startswith("srun ")]
    assert launches == ['srun --ntasks-per-node=1 --kill-on-bad-exit=0 "${worker[@]}"'], launches
    probe = script.replace(launches[0], 'printf "\\n--argv--\\n"; printf "%s\\0" "${worker[@]}"')
    result = subprocess.run(
        ["bash", "-c", probe], check=False, capture_output=True, text=True, env=dict(env), timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n--argv--\n")[1].rstrip("\0").split("\0")


def systemd_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(UNIT)
    return unit


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    )
    return {key: value for key, value in pairs}


def systemd_worker_argv(env: Mapping[str, str]) -> list[str]:
    """ExecStart as systemd runs it: ${VAR} becomes one word from the EnvironmentFile."""
    words = shlex.split(systemd_unit()["Service"]["ExecStart"])
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in words]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def image_env() -> dict[str, str]:
    """The ENV of deploy/Dockerfile: what every container starts with."""
    env = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def grace_seconds(argv: list[str]) -> float:
    return float(option(argv, "--grace-seconds"))


def duration_s(value: str) -> float:
    """Compose durations such as 35s, 1m30s, 10m."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------- the recipes' variables a site fills in
def compose_site_env(**extra: str) -> dict[str, str]:
    return {"REDIS_PASSWORD": REDIS_PASSWORD, **extra}


def k8s_site_objects(**config: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """The ConfigMap as checked in (with `config` edits) and the Secret secrets.env would generate."""
    configmap = k8s_object("ConfigMap", "shardgen")
    name = kustomization()["secretGenerator"][0]["name"]
    secret = {"REDIS_PASSWORD": REDIS_PASSWORD}
    return {configmap["metadata"]["name"]: {**configmap["data"], **config}}, {name: secret}


# ---------------------------------------------------------------- offline validation
def test_no_password_is_written_in_a_recipe_and_compose_refuses_to_start_without_one():
    written = [
        p
        for p in [*DEPLOY.rglob("*"), REPO / ".dockerignore"]
        if p.is_file() and "change-me" in p.read_text()
    ]
    assert written == []
    assert not re.search(r"^\s*requirepass", (DEPLOY / "redis.conf").read_text(), re.MULTILINE)
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD: set REDIS_PASSWORD in deploy/compose/.env"):
        compose_services({})
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        compose_services({"REDIS_PASSWORD": ""})
    services = compose_services(compose_site_env())
    assert services["redis"]["command"][-2:] == ["--requirepass", REDIS_PASSWORD]
    for name in ("worker-cpu", "worker-gpu", "cli"):
        assert (
            services[name]["environment"]["SHARDGEN_BROKER_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        )
    # Kubernetes: no Secret is checked in; the password exists only in the one secrets.env generates.
    assert [d for d in k8s_documents() if d["kind"] == "Secret"] == []


def run_check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_follows_the_compose_specification(tmp_path):
    result = run_check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check refuses a misspelt key, so a pass means something.
    misspelt = tmp_path / "compose.yaml"
    misspelt.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    refused = run_check_jsonschema(misspelt)
    assert refused.returncode != 0 and "stop_grace_periods" in refused.stdout


def test_compose_has_a_cpu_profile_for_a_laptop_and_a_gpu_profile_for_every_gpu():
    services = compose_services(compose_site_env())
    by_profile = {
        p: {n for n, s in services.items() if p in s.get("profiles", [])} for p in ("cpu", "gpu", "cli")
    }
    assert by_profile == {"cpu": {"worker-cpu"}, "gpu": {"worker-gpu"}, "cli": {"cli"}}
    assert "profiles" not in services["redis"]  # started by every profile

    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert option(cpu["command"], "--devices") == "cpu" and "deploy" not in cpu
    assert cpu["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert option(gpu["command"], "--devices") == "all"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert "TORCH_INDEX_URL" not in gpu["build"].get("args", {})  # PyPI's torch: the CUDA build

    volumes = compose_file()["volumes"]
    for name in ("worker-cpu", "worker-gpu"):
        service = services[name]
        assert_valid_shardgen_command(service["command"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # Docker's SIGKILL comes only after the worker's own grace, with room to hand the shard back.
        assert duration_s(service["stop_grace_period"]) >= grace_seconds(service["command"]) + 5
        cache = service["environment"]["SHARDGEN_CACHE_DIR"]
        cache_volume = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == cache]
        assert cache_volume and cache_volume[0] in volumes, "the model cache must be a named volume"
        assert (
            "HF_TOKEN" in service["environment"] and service["environment"]["HF_TOKEN"] is None
        )  # passed through
        assert f"http://127.0.0.1:{option(service['command'], '--metrics-port')}/metrics" in " ".join(
            service["healthcheck"]["test"]
        )
    assert_valid_shardgen_command(services["cli"]["command"])
    assert services["redis"]["healthcheck"]["test"][0] == "CMD-SHELL"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(version):
    validated = []
    for doc in k8s_documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked field by field below
        kubernetes_validate.validate(doc, version, strict=True)
        validated.append(doc["kind"])
    assert sorted(validated) == ["ConfigMap", "Deployment", "Job", "Namespace", "Service", "StatefulSet"]
    # The schema check is strict: an unknown field fails it.
    worker = k8s_object("Deployment", "shardgen-worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, version, strict=True)


def test_kustomization_applies_every_manifest_and_generates_the_secret_they_read():
    kust = kustomization()
    listed = set(kust["resources"])
    assert all((K8S / name).is_file() for name in listed)
    # Everything but the per-run Job is applied with `kubectl apply -k`.
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "submit-job.yaml"}
    assert {d["metadata"]["namespace"] for d in k8s_documents() if "namespace" in d["metadata"]} == {
        kust["namespace"]
    }
    generator = kust["secretGenerator"][0]
    assert generator["envs"] == ["secrets.env"] and kust["generatorOptions"]["disableNameSuffixHash"] is True
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()
    required, optional = secret_keys_in_example()
    refs = [ref for doc in k8s_documents() for ref in values_of(doc, "secretKeyRef")]
    assert {ref["key"] for ref in refs} == {
        "REDIS_PASSWORD",
        "HF_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    for ref in refs:
        assert ref["name"] == generator["name"]
        assert ref["key"] in (optional if ref.get("optional") else required), ref
    auth = k8s_object("TriggerAuthentication")
    assert {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        (generator["name"], "REDIS_PASSWORD")
    }


def test_kubernetes_worker_requests_a_gpu_drains_within_its_grace_and_is_ready_from_its_metrics():
    deployment = k8s_object("Deployment", "shardgen-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmaps, secrets = k8s_site_objects()
    env = k8s_container_env(container, configmaps, secrets)
    argv = [k8s_expand(arg, env) for arg in container["args"]]
    assert_valid_shardgen_command(argv)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and option(argv, "--device") == "cuda"
    assert pod["terminationGracePeriodSeconds"] >= grace_seconds(argv) + 10
    probe = container["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/metrics" and ports[probe["port"]] == int(option(argv, "--metrics-port"))
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert env["SHARDGEN_BROKER_URL"] == f"redis://:{REDIS_PASSWORD}@shardgen-redis:6379/0"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["SHARDGEN_CACHE_DIR"] in mounts
    # The work directory every worker shares: object storage by default.
    assert configmaps["shardgen"]["SHARDGEN_WORK_DIR"].startswith("s3://")


def test_kubernetes_worker_is_restarted_when_its_alive_file_goes_stale(tmp_path):
    """The liveness probe reads the worker's own stall signal: the file the watchdog touches while it progresses."""
    from shardgen.workers.queue.health import ALIVE_FILE_ENV

    (container,) = k8s_object("Deployment", "shardgen-worker")["spec"]["template"]["spec"]["containers"]
    configmaps, secrets = k8s_site_objects()
    alive = k8s_container_env(container, configmaps, secrets)[ALIVE_FILE_ENV]
    command = container["livenessProbe"]["exec"]["command"]
    assert container["startupProbe"]["httpGet"]["path"] == "/metrics"  # not before the model is loaded
    local = tmp_path / "alive"
    probe = [part.replace(alive, str(local)) for part in command]
    assert subprocess.run(probe).returncode != 0  # never touched
    local.touch()
    assert subprocess.run(probe).returncode == 0
    stale = local.stat().st_mtime - 7 * 60
    os.utime(local, (stale, stale))
    assert subprocess.run(probe).returncode != 0


def test_kubernetes_redis_keeps_its_aof_on_a_volume_behind_its_service():
    service, statefulset = (
        k8s_object("Service", "shardgen-redis"),
        k8s_object("StatefulSet", "shardgen-redis"),
    )
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert option(args, "--appendonly") == "yes" and option(args, "--maxmemory-policy") == "noeviction"
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[option(args, "--dir")] in claims
    assert (
        service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert {p["port"] for p in service["spec"]["ports"]} == {6379}


def test_keda_scaled_object_scales_the_worker_deployment_on_its_models_queue():
    scaled = k8s_object("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == k8s_object("Deployment")["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA's trigger metadata values are strings"
    config = k8s_object("ConfigMap", "shardgen")["data"]
    queue = ModelSpec(model=config["SHARDGEN_MODEL"], quantize=config["SHARDGEN_QUANTIZE"]).queue
    assert meta["listName"] == queue == "sg.q.smollm2-135m"
    assert not meta["listName"].startswith("sg.take.")
    assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) >= 0
    host, port = meta["address"].rsplit(":", 1)
    service = k8s_object("Service", "shardgen-redis")
    assert host == f"{service['metadata']['name']}.{kustomization()['namespace']}.svc.cluster.local"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert trigger["authenticationRef"]["name"] == k8s_object("TriggerAuthentication")["metadata"]["name"]
    # Shards in flight are not in the list: scale-to-zero waits a long cooldown, scale-down goes one pod at
    # a time.
    assert spec["cooldownPeriod"] >= 600
    (policy,) = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"]
    assert policy == {"type": "Pods", "value": 1, "periodSeconds": 120}


def test_quantized_models_get_their_own_queue_name():
    # What keda.yaml's comment tells a site to use for a quantized model.
    assert ModelSpec(model="smollm2-135m", quantize="nf4").queue == "sg.q.smollm2-135m@nf4"


def test_sbatch_script_is_valid_bash_and_stops_within_slurms_kill_wait():
    result = subprocess.run(["bash", "-n", str(SBATCH)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    directives = sbatch_directives()
    assert directives["--ntasks-per-node"] == "1"
    argv = sbatch_worker_argv(
        {"PATH": os.environ["PATH"], "SHARDGEN_BROKER_URL": "redis://:pw@redis-host:6379/0"}
    )
    assert argv[:4] == ["shardgen", "worker", "--devices", "all"]
    assert_valid_shardgen_command(argv[1:])
    grace = grace_seconds(argv)
    assert grace + 5 <= SLURM_DEFAULT_KILL_WAIT_S
    signal_name, _, before_s = directives["--signal"].partition("@")
    assert signal_name == "TERM" and int(before_s) >= grace + 30


def test_sbatch_script_without_a_broker_url_stops_before_srun_and_says_what_to_export(tmp_path):
    result = subprocess.run(
        ["bash", str(SBATCH)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "export SHARDGEN_BROKER_URL=redis://:PASSWORD@HOST:6379/0 before sbatch" in result.stderr
    assert "srun" not in result.stderr


def test_systemd_unit_runs_every_gpu_and_stops_within_its_timeout():
    unit = systemd_unit()["Service"]
    argv = systemd_worker_argv(env_file(DEPLOY / "systemd" / "shardgen.env.example"))
    assert argv[0] == "/opt/shardgen/.venv/bin/shardgen" and option(argv, "--devices") == "all"
    assert_valid_shardgen_command(argv[1:])
    assert float(unit["TimeoutStopSec"]) >= grace_seconds(argv) + 5
    assert unit["KillMode"] == "mixed" and unit["KillSignal"] == "SIGTERM"  # the supervisor stops its workers


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any folder above it."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_image_copies_every_package_and_the_build_context_leaves_out_venv_and_git():
    instructions = dockerfile_instructions()
    copied = [
        source
        for instruction, rest in instructions
        if instruction == "COPY"
        for source in shlex.split(rest)[:-1]
    ]
    package_roots = {
        p.split("/")[0]
        for p in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    }
    assert package_roots | {"pyproject.toml", "README.md"} == set(copied)
    entrypoint = [rest for instruction, rest in instructions if instruction == "ENTRYPOINT"]
    assert entrypoint == ['["tini", "--", "shardgen"]']  # tini forwards SIGTERM: workers drain
    args = dict(rest.split("=", 1) for instruction, rest in instructions if instruction == "ARG")
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^TORCH_VERSION \?= {re.escape(args['TORCH_VERSION'])}$", makefile, re.MULTILINE)

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/part-00000.parquet",
        ".pytest_cache/v",
        "tests/test_deploy.py",
        "workers/__pycache__/api.cpython-311.pyc",
        "deploy/compose/.env",
        "deploy/k8s/secrets.env",
    ):
        assert dockerignored(path, patterns), path
    for path in copied + ["workers/lifecycle/scripts/complete.lua", "producer/examples/questions.jsonl"]:
        assert not dockerignored(path, patterns), path


# ---------------------------------------------------------------- Redis, as each recipe starts it
def start_redis(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """A recipe's redis-server command, on a free loopback port: flags given last override its config."""
    port = free_port()
    server = subprocess.Popen(
        [*argv, "--port", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(port=port, password=REDIS_PASSWORD, socket_timeout=2, socket_connect_timeout=2)

    def answers() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"{argv} exited with {server.returncode}")
        try:
            return probe.ping()
        except redis.exceptions.ConnectionError:
            return False

    wait_until(answers, timeout=20, what="redis-server to answer", interval=0.05)
    return server, port


def health_check(command: list[str], port: int, password: str) -> int:
    """Run a recipe's `sh -c` health check against the port our redis-server listens on."""
    script = command[-1].replace("redis-cli", f"redis-cli -p {port}")
    env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}
    return subprocess.run(
        ["sh", "-c", script], env=env, check=False, capture_output=True, timeout=30
    ).returncode


def recipe_redis_commands(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each recipe's redis-server argv (container paths mapped here) and its health check."""
    redis_service = compose_services(compose_site_env())["redis"]
    conf_mount = next(v for v in redis_service["volumes"] if "redis.conf" in v)
    container_conf = conf_mount.split(":")[1]
    data_mount = next(v for v in redis_service["volumes"] if v.startswith("redis-data:")).split(":")[1]
    data = tmp_path / "compose-data"
    data.mkdir()
    here = {container_conf: str(DEPLOY / "redis.conf"), data_mount: str(data)}
    compose_argv = [here.get(a, a) for a in redis_service["command"]]
    assert option(compose_argv, "--dir") == str(data), "the AOF must land on the redis-data volume"

    statefulset = k8s_object("StatefulSet", "shardgen-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = k8s_container_env(container, *k8s_site_objects())
    k8s_argv = [k8s_expand(a, env) for a in container["args"]]
    k8s_data = tmp_path / "k8s-data"
    k8s_data.mkdir()
    k8s_argv[k8s_argv.index("--dir") + 1] = str(k8s_data)
    probe = container["readinessProbe"]["exec"]["command"]
    assert env["REDISCLI_AUTH"] == REDIS_PASSWORD
    return {"compose": (compose_argv, redis_service["healthcheck"]["test"]), "k8s": (k8s_argv, probe)}


@pytest.mark.redis
@pytest.mark.parametrize("recipe", ["compose", "k8s"])
def test_recipe_redis_starts_with_aof_no_eviction_a_password_and_a_health_check_that_needs_it(
    recipe, tmp_path
):
    argv, check = recipe_redis_commands(tmp_path)[recipe]
    server, port = start_redis(argv, tmp_path)
    try:
        client = redis.Redis(port=port, password=REDIS_PASSWORD, socket_timeout=2)
        config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"], config["maxmemory-policy"]) == (
            "yes",
            "everysec",
            "noeviction",
        )
        assert config["save"] == "900 1"
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        assert health_check(check, port, REDIS_PASSWORD) == 0
        assert health_check(check, port, "wrong-password") != 0
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------- each recipe's commands, run
@dataclass
class Site:
    """This machine standing in for a fleet's: our redis-server, folders for container paths, a free port."""

    tmp: Path
    redis_port: int
    model: str
    metrics_port: int = field(default_factory=free_port)

    @property
    def broker(self) -> str:
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.redis_port}/0"

    def small_input(self) -> Path:
        """The first rows of the bundled example: enough for a run, short on a shared 2-core machine."""
        path = self.tmp / "questions.jsonl"
        lines = (REPO / "producer" / "examples" / "questions.jsonl").read_text().splitlines()[:SMALL_ROWS]
        path.write_text("\n".join(lines) + "\n")
        return path

    def container_paths(self) -> dict[str, str]:
        return {
            "/opt/shardgen": str(REPO),
            "/cache": str(self.tmp / "cache"),
            "/runs": str(self.tmp / "runs"),
        }

    def map_path(self, value: str) -> str:
        for inside, here in self.container_paths().items():
            if value == inside or value.startswith(inside + "/"):
                return here + value[len(inside) :]
        return value

    def map_address(self, url: str, *hosts: str) -> str:
        """A container network's `host:6379` is our redis-server's port on the loopback."""
        for host in hosts:
            url = url.replace(f"@{host}:6379/", f"@127.0.0.1:{self.redis_port}/")
        return url

    def hardware(self, argv: list[str]) -> list[str]:
        """The CLI of this checkout, CPU for GPU, and a free metrics port (tests share this machine)."""
        out = [*SHARDGEN, *argv[1:]]
        for flag, gpu_value in (("--devices", "all"), ("--device", "cuda")):
            if flag in out and option(out, flag) == gpu_value:
                out[out.index(flag) + 1] = "cpu"
        out[out.index("--metrics-port") + 1] = str(self.metrics_port)
        return [self.map_path(a) for a in out]

    def process_env(self, recipe_env: Mapping[str, str]) -> dict[str, str]:
        """The environment a container or node would give the process: ours, less anything shardgen reads."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("SHARDGEN_", "AWS_", "HF_"))}
        mapped = {k: self.map_path(v) for k, v in recipe_env.items()}
        return {**keep, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **mapped}


@dataclass
class Launch:
    """What a recipe runs: its worker, the submit that feeds it, how the platform sees it ready, stops it."""

    worker: list[str]
    worker_env: dict[str, str]
    submit: list[str]
    submit_env: dict[str, str]
    ready: Callable[[], bool]
    stop_within_s: float
    stop_whole_tree: bool = False
    """SLURM signals every process of the job step; Docker (through tini), Kubernetes and systemd with
    KillMode=mixed signal the main process only."""
    rows: int = EXAMPLE_ROWS


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def compose_launch(site: Site, worker_service: str, input_path: Path | None = None) -> Launch:
    """`input_path` None: the cli service's default input, the example bundled in the image."""
    env = compose_site_env(
        REDIS_HOST="redis", SHARDGEN_MODEL=site.model, SHARDGEN_WORK_DIR=str(site.tmp / "runs")
    )
    if input_path is not None:
        env["SHARDGEN_INPUT"] = str(input_path)
    services = compose_services(env)
    worker, submit = services[worker_service], services["cli"]

    def container_env(service: dict) -> dict[str, str]:
        values = {**image_env(), **{k: v for k, v in service["environment"].items() if v is not None}}
        values["SHARDGEN_BROKER_URL"] = site.map_address(values["SHARDGEN_BROKER_URL"], "redis")
        return values

    check = worker["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    check = [sys.executable, *check[2:-1], check[-1].replace(":9400/", f":{site.metrics_port}/")]
    return Launch(
        worker=site.hardware(["shardgen", *worker["command"]]),
        worker_env=container_env(worker),
        submit=[*SHARDGEN, *[site.map_path(a) for a in submit["command"]]],
        submit_env=container_env(submit),
        ready=lambda: subprocess.run(check, check=False, capture_output=True, timeout=30).returncode == 0,
        stop_within_s=duration_s(worker["stop_grace_period"]),
        rows=EXAMPLE_ROWS if input_path is None else SMALL_ROWS,
    )


def k8s_launch(site: Site, s3_server) -> Launch:
    configmaps, secrets = k8s_site_objects(SHARDGEN_MODEL=site.model, AWS_ENDPOINT_URL=s3_server.endpoint)
    secrets["shardgen-secrets"].update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    deployment, job = k8s_object("Deployment", "shardgen-worker"), k8s_object("Job")
    pod = deployment["spec"]["template"]["spec"]
    (worker,), (submit,) = pod["containers"], job["spec"]["template"]["spec"]["containers"]

    def container(spec: dict) -> tuple[list[str], dict[str, str]]:
        env = {**image_env(), **k8s_container_env(spec, configmaps, secrets)}
        env["SHARDGEN_BROKER_URL"] = site.map_address(env["SHARDGEN_BROKER_URL"], "shardgen-redis")
        return ["shardgen", *[k8s_expand(a, env) for a in spec["args"]]], env

    worker_argv, worker_env = container(worker)
    submit_argv, submit_env = container(submit)
    # The input and work directory the manifests name, in a bucket of our own S3 server.
    bucket_input = submit_env["SHARDGEN_INPUT"]
    filesystem = s3_server.filesystem()
    bucket = bucket_input.removeprefix("s3://").split("/")[0]
    if not filesystem.exists(bucket):
        filesystem.mkdir(bucket)
    filesystem.put(str(site.small_input()), bucket_input)
    probe = worker["readinessProbe"]["httpGet"]
    return Launch(
        worker=site.hardware(worker_argv),
        worker_env=worker_env,
        submit=[*SHARDGEN, *submit_argv[1:]],
        submit_env=submit_env,
        ready=lambda: http_ok(f"http://127.0.0.1:{site.metrics_port}{probe['path']}"),
        stop_within_s=pod["terminationGracePeriodSeconds"],
        rows=SMALL_ROWS,
    )


def node_submit(site: Site) -> tuple[list[str], dict[str, str]]:
    """SLURM and systemd nodes run only workers; a run is submitted from anywhere that reaches Redis."""
    argv = [
        *SHARDGEN,
        "submit",
        str(site.small_input()),
        "--work-dir",
        str(site.tmp / "runs"),
        "--model",
        site.model,
    ]
    return argv, {"SHARDGEN_BROKER_URL": site.broker}


def slurm_launch(site: Site) -> Launch:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(site.tmp),
        "SHARDGEN_BROKER_URL": site.broker,
        "SHARDGEN_MODEL": site.model,
        "SHARDGEN_CACHE_DIR": str(site.tmp / "cache"),
    }
    argv = sbatch_worker_argv(env)
    submit, submit_env = node_submit(site)
    return Launch(
        worker=site.hardware(argv),
        worker_env={k: v for k, v in env.items() if k.startswith("SHARDGEN_")},
        submit=submit,
        submit_env=submit_env,
        ready=lambda: http_ok(f"http://127.0.0.1:{site.metrics_port}/metrics"),
        stop_within_s=SLURM_DEFAULT_KILL_WAIT_S,
        stop_whole_tree=True,
        rows=SMALL_ROWS,
    )


def systemd_launch(site: Site) -> Launch:
    env = {
        **env_file(DEPLOY / "systemd" / "shardgen.env.example"),
        "SHARDGEN_BROKER_URL": site.broker,
        "SHARDGEN_MODEL": site.model,
        "SHARDGEN_CACHE_DIR": str(site.tmp / "cache"),
    }
    submit, submit_env = node_submit(site)
    return Launch(
        worker=site.hardware(systemd_worker_argv(env)),
        worker_env=env,
        submit=submit,
        submit_env=submit_env,
        ready=lambda: http_ok(f"http://127.0.0.1:{site.metrics_port}/metrics"),
        stop_within_s=float(systemd_unit()["Service"]["TimeoutStopSec"]),
        rows=SMALL_ROWS,
    )


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory):
    """A redis-server that, like every recipe's, requires the password."""
    server = RedisServer(tmp_path_factory.mktemp("redis-password"), "--requirepass", REDIS_PASSWORD).start()
    yield server
    server.stop()


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.redis
@pytest.mark.parametrize("recipe", ["compose-cpu", "compose-gpu", "k8s", "slurm", "systemd"])
def test_recipe_commands_run_a_job_to_the_end_and_drain_on_sigterm(
    recipe, tmp_path, password_redis, tiny_model_dir, request
):
    redis.Redis(port=password_redis.port, password=REDIS_PASSWORD).flushall()
    site = Site(tmp_path, password_redis.port, str(tiny_model_dir))
    (tmp_path / "runs").mkdir()
    if recipe == "compose-cpu":
        launch = compose_launch(site, "worker-cpu")  # a laptop's first run: the bundled example
    elif recipe == "compose-gpu":
        launch = compose_launch(site, "worker-gpu", site.small_input())
    elif recipe == "k8s":
        launch = k8s_launch(site, request.getfixturevalue("s3_server"))
    else:
        launch = {"slurm": slurm_launch, "systemd": systemd_launch}[recipe](site)
    assert f"127.0.0.1:{password_redis.port}" in launch.worker_env["SHARDGEN_BROKER_URL"]

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            launch.worker,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=site.process_env(launch.worker_env),
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            if worker.poll() is not None:
                raise AssertionError(
                    f"worker exited with {worker.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            return launch.ready()

        wait_until(ready, timeout=240, what=f"the {recipe} worker's readiness check", interval=0.5)

        submitted = subprocess.run(
            launch.submit,
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=site.process_env(launch.submit_env),
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        (run_id,) = RunStore(site.broker).run_ids()
        assert run_id in submitted.stdout
        wait_until(
            lambda: run_status_now(run_id, site.broker)["finished_at"] is not None,
            timeout=300,
            what=f"run {run_id} to end",
            interval=0.5,
        )
        status = run_status_now(run_id, site.broker)
        assert (status["state"], status["rows_done"], status["rows_failed"]) == ("done", launch.rows, 0), (
            status
        )

        # Scale-down: SIGTERM as the platform sends it; every process is gone before the platform's SIGKILL.
        tree = process_tree(worker.pid)
        for process in tree if launch.stop_whole_tree else tree[:1]:
            process.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=launch.stop_within_s) == 0, log_path.read_text(errors="replace")[-3000:]
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert alive == [], f"left running after the worker exited: {alive}"
    finally:
        if worker.poll() is None:
            for process in process_tree(worker.pid)[::-1]:
                process.kill()
            worker.wait(10)
