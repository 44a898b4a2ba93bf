"""The production files (work-pool templates, docker/, deployments/kubernetes/) agree with each other, with the code
and with constraints.txt. No Docker engine or cluster is needed: the templates are rendered with Prefect's own
templating and the Docker GPU request is turned into the Engine API payload by docker-py; the slow tests create every
work pool on a real Prefect server and run the compose file's MLflow command on the machine's PostgreSQL."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tasks.common.processes import start_process, stop_process_tree

ROOT = Path(__file__).resolve().parents[1]
POOLS_DIR = ROOT / "deployments" / "work-pools"
K8S_DIR = ROOT / "deployments" / "kubernetes"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
POOL_TYPES = ("process", "docker", "kubernetes")
POOLS = ("gpu", "cpu")
GPU_RESOURCE = "nvidia.com/gpu"
BENTO_IMAGE = "text-classifier"


# ------------------------------------------------------------------------------------------------ helpers


def constraint(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def settings():
    """flows/settings.py's defaults (not the environment's TEXTCLF_* overrides)."""
    from types import SimpleNamespace

    from flows.settings import Settings

    return SimpleNamespace(**{name: field.default for name, field in Settings.model_fields.items()})


def template(pool_type: str, pool: str) -> dict:
    return json.loads((POOLS_DIR / pool_type / f"{pool}.json").read_text())


def render(base_job_template: dict, values: dict | None = None) -> dict:
    """The job configuration a worker gets for a run with `values` as job variables: Prefect's own templating over
    the variables' defaults (what BaseJobConfiguration.from_template_and_values does before its pydantic model)."""
    from prefect.utilities.templating import apply_values

    properties = base_job_template["variables"]["properties"]
    variables = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    variables.update(values or {})
    return apply_values(base_job_template["job_configuration"], variables)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[dict]:
    documents = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def k8s(kind: str, name: str) -> dict:
    found = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in {K8S_DIR}, found {len(found)}"
    return found[0]


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def command_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = match.group(2)
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


def worker_commands() -> list[tuple[str, list[str]]]:
    """Every `prefect worker start` of compose.yaml and the Kubernetes manifests, with where it is."""
    found = []
    for name, service in compose()["services"].items():
        command = command_list(service.get("command", []))
        if command[:3] == ["prefect", "worker", "start"]:
            found.append((f"compose service {name}", command))
    for document in k8s_documents():
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                command = command_list(container.get("command", []) + container.get("args", []))
                if command[:3] == ["prefect", "worker", "start"]:
                    found.append((f"kubernetes Deployment {document['metadata']['name']}", command))
    return found


# ------------------------------------------------------------------------------------------------ parsing


def test_every_production_file_parses():
    for path in [*POOLS_DIR.glob("*/*.json")]:
        content = json.loads(path.read_text())
        assert set(content) == {"job_configuration", "variables"}, path
    assert compose()["services"]
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "kustomization.yaml must list every manifest of deployments/kubernetes/"
    for document in k8s_documents():
        assert document.get("apiVersion") and document.get("kind") and document["metadata"].get("name"), document


def test_templates_exist_for_both_pools_of_every_type_and_keep_prefects_defaults():
    """Ours are Prefect's default templates plus additions: nothing of the default (a variable, a job setting)
    may be lost, or the worker would build a different configuration than Prefect documents."""
    import prefect

    metadata = json.loads(
        (
            Path(prefect.__file__).parent
            / "server"
            / "api"
            / "collections_data"
            / "views"
            / "aggregate-worker-metadata.json"
        ).read_text()
    )
    defaults = {
        worker["type"]: worker["default_base_job_configuration"]
        for collection in metadata.values()
        for worker in collection.values()
    }
    assert {p.name for p in POOLS_DIR.iterdir() if p.is_dir()} == set(POOL_TYPES)
    for pool_type in POOL_TYPES:
        assert {p.stem for p in (POOLS_DIR / pool_type).glob("*.json")} == set(POOLS), pool_type
        default = defaults[pool_type]
        for pool in POOLS:
            ours = template(pool_type, pool)
            assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"]), (pool_type, pool)
            assert set(default["job_configuration"]) <= set(ours["job_configuration"]), (pool_type, pool)
            # What the Prefect server checks on creation: every placeholder is a declared variable.
            from prefect.utilities.templating import find_placeholders

            used = {p.name for p in find_placeholders(json.dumps(ours["job_configuration"]))}
            assert used <= set(ours["variables"]["properties"]), (pool_type, pool, used)


# ------------------------------------------------------------------------------------------------ work pools


def test_kubernetes_gpu_template_requests_a_gpu_and_the_cpu_template_does_not():
    for pool in POOLS:
        job = render(template("kubernetes", pool))
        pod = job["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == f"textclf-flows:{pool}"
        if pool == "gpu":
            assert container["resources"]["limits"][GPU_RESOURCE] == 1
            assert container["resources"]["requests"][GPU_RESOURCE] == 1
            assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            # The variable really drives the request: a deployment asking for 2 GPUs gets 2.
            two = render(template("kubernetes", pool), {"gpu_count": 2})
            assert (
                two["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE]
                == 2
            )
        else:
            assert "nvidia" not in json.dumps(job)
        assert "{{" not in json.dumps(job), f"unresolved placeholder in the rendered {pool} job"
        # Flow-run pods land where the manifests' ConfigMap is, and read it.
        config_map = k8s("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])
        assert job["namespace"] == job["job_manifest"]["metadata"]["namespace"] == config_map["metadata"]["namespace"]


def _docker_engine_payload(job: dict) -> dict:
    """The container-create arguments prefect-docker's worker builds from a job configuration
    (DockerWorker._build_container_settings), turned into the Engine API payload by docker-py, as
    `containers.create` does. docker-py raises on an argument it does not know."""
    docker_containers = pytest.importorskip("docker.models.containers")
    settings_ = dict(
        image=job["image"],
        network=(job.get("networks") or [None])[0],
        network_mode=job.get("network_mode"),
        command=job.get("command"),
        environment=job.get("env"),
        auto_remove=job.get("auto_remove"),
        labels=job.get("labels"),
        name=job.get("name"),
        volumes=job.get("volumes"),
        mem_limit=job.get("mem_limit"),
        memswap_limit=job.get("memswap_limit"),
        privileged=job.get("privileged", False),
        **(job.get("container_create_kwargs") or {}),
    )
    return docker_containers._create_container_args({**settings_, "version": "1.44"})


def test_docker_gpu_template_requests_the_gpu_device_and_the_cpu_template_does_not():
    for pool in POOLS:
        job = render(template("docker", pool))
        assert job["image"] == f"textclf-flows:{pool}"
        host_config = _docker_engine_payload(job)["host_config"]
        if pool == "gpu":
            # What `docker run --gpus all` sends.
            assert host_config["DeviceRequests"] == [
                {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
            ]
        else:
            assert not host_config.get("DeviceRequests")
        assert host_config["ShmSize"] >= 2**30


def test_docker_templates_join_the_compose_network_volume_and_servers():
    stack = compose()
    flow_env = stack["services"]["prefect-worker"]["environment"]
    for pool in POOLS:
        job = render(template("docker", pool))
        assert job["networks"] == [stack["networks"]["default"]["name"]]
        volume, _, mount = job["volumes"][0].partition(":")
        assert volume == stack["volumes"]["textclf-home"]["name"] and mount == flow_env["TEXTCLF_HOME"]
        assert job["env"]["MLFLOW_TRACKING_URI"] == flow_env["MLFLOW_TRACKING_URI"]


def test_process_templates_render_to_valid_process_worker_configurations():
    from prefect.workers.process import ProcessJobConfiguration

    for pool in POOLS:
        configuration = ProcessJobConfiguration(**render(template("process", pool)))
        assert configuration.working_dir is None  # prefect.yaml's pull step sets the directory
    # The cpu pool keeps its runs off a GPU the gpu pool's fine-tune may be using on the same machine.
    assert ProcessJobConfiguration(**render(template("process", "cpu"))).env["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in (ProcessJobConfiguration(**render(template("process", "gpu"))).env or {})


def test_worker_commands_poll_the_contract_pools_with_existing_templates():
    commands = worker_commands()
    polled = {}
    for where, command in commands:
        pool, pool_type = option(command, "--pool"), option(command, "--type")
        assert pool in POOLS, f"{where} polls '{pool}'"
        assert pool_type in POOL_TYPES and (POOLS_DIR / pool_type / f"{pool}.json").is_file(), where
        if (base := option(command, "--base-job-template")) is not None:
            # Relative to the image's WORKDIR, which holds the repository's layout.
            assert (ROOT / base).resolve() == (POOLS_DIR / pool_type / f"{pool}.json").resolve(), where
        polled.setdefault(where.split()[0], set()).add(pool)
    assert polled == {"compose": {"gpu", "cpu"}, "kubernetes": {"gpu", "cpu"}}
    for stage in ("cpu", "gpu"):
        cmd = [line for line in dockerfile_stages()[stage] if line.startswith("CMD")][-1]
        assert json.loads(cmd.removeprefix("CMD").strip()) == ["prefect", "worker", "start", "--pool", stage]


# ------------------------------------------------------------------------------------------------ Dockerfile


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_targets_copy_existing_files_and_install_the_pinned_project():
    stages = dockerfile_stages()
    assert {"cpu", "gpu"} <= set(stages)
    from flows.deploy import IMAGE_PROJECT_DIR  # where `textclf deploy` tells docker/kubernetes runs the code is

    ignored = _dockerignore_patterns()
    for target in ("cpu", "gpu"):
        lines = stages[target]
        copies = [line.split()[1:-1] for line in lines if line.startswith("COPY") and "--from" not in line]
        sources = [source for sources in copies for source in sources]
        for needed in (
            "flows/",
            "tasks/",
            "service.py",
            "bentofile.yaml",
            "prefect.yaml",
            "constraints.txt",
            "requirements-packaged.txt",
            "pyproject.toml",
        ):
            assert needed in sources, f"target {target} does not COPY {needed}"
        for source in sources:
            assert (ROOT / source).exists(), f"target {target} copies {source}, which does not exist"
            for pattern in ignored:
                assert not (fnmatch.fnmatch(source.rstrip("/"), pattern) or source.startswith(pattern + "/")), (
                    f"{source} is excluded by .dockerignore ({pattern})"
                )
        run = " ".join(line for line in lines if line.startswith("RUN"))
        assert "-c constraints.txt" in run and "'.[postgres]'" in run, target
        assert "--no-deps -r requirements-packaged.txt" in run, target
        assert f"WORKDIR {IMAGE_PROJECT_DIR}" in lines, target
        users = [line.split()[1] for line in lines if line.startswith("USER")]
        assert users and users[-1] not in ("root", "0"), f"target {target} runs as root"
    assert stages["python-cpu"][0].split()[1] == "python:3.11-slim"
    assert "download.pytorch.org/whl/cpu" in " ".join(stages["python-cpu"])
    assert "python3.11" in " ".join(stages["python-gpu"])
    cuda_image = re.search(r"^ARG CUDA_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert cuda_image.startswith("nvidia/cuda:") and "runtime" in cuda_image
    for must_stay in ("flows", "tasks", "service.py", "bentofile.yaml", "prefect.yaml", "constraints.txt"):
        assert not any(fnmatch.fnmatch(must_stay, p) for p in ignored), must_stay
    for must_go in (".venv", ".textclf", ".git", "bench/results"):
        assert must_go in ignored, f".dockerignore does not exclude {must_go}"


def test_versions_in_images_and_commands_match_constraints():
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert torch == constraint("torch")
    prefect_version = constraint("prefect")
    prefect_images = [
        service["image"]
        for service in compose()["services"].values()
        if service.get("image", "").startswith("prefecthq/prefect:")
    ]
    prefect_images += [
        c["image"]
        for d in k8s_documents()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("prefecthq/")
    ]
    assert prefect_images, "no official Prefect image: adapt this test"
    for image in prefect_images:
        assert image.split(":")[1].startswith(f"{prefect_version}-python3.11"), image
    # MLflow runs from our image, so from constraints.txt's mlflow, like every client of it.
    mlflow = compose()["services"]["mlflow"]
    assert command_list(mlflow["command"])[:2] == ["mlflow", "server"] and mlflow["image"].startswith("textclf-flows:")
    assert str(yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"]) == prefect_version


def test_every_image_is_a_dockerfile_target_the_bento_or_a_pinned_upstream_image():
    targets = set(dockerfile_stages())
    images = [
        (f"compose {name}", service["image"], service.get("build")) for name, service in compose()["services"].items()
    ]
    images += [
        (f"kubernetes {d['metadata']['name']}", c["image"], None)
        for d in k8s_documents()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    images += [
        (f"{t}/{p}.json", template(t, p)["variables"]["properties"]["image"]["default"], None)
        for t in ("docker", "kubernetes")
        for p in POOLS
    ]
    for where, image, build in images:
        if image.startswith("textclf-flows:"):
            tag = image.split(":")[1]
            assert tag in targets, f"{where}: {image} is no target of docker/Dockerfile"
            if build:
                assert (
                    build["target"] == tag
                    and (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
                ), where
        elif image in ("${BENTO_IMAGE:-text-classifier:latest}", f"{BENTO_IMAGE}:latest"):
            pass
        elif image.startswith(("prefecthq/prefect:", "postgres:", "prom/prometheus:", "grafana/grafana:")):
            assert re.search(r":v?\d", image), f"{where}: {image} is not pinned to a version"
        else:
            raise AssertionError(f"{where}: unknown image {image}")


# ------------------------------------------------------------------------------------------------ compose


def test_compose_ports_health_checks_and_start_order():
    stack, s = compose()["services"], settings()
    assert f"{s.prefect_port}:{s.prefect_port}" in stack["prefect-server"]["ports"]
    assert option(command_list(stack["prefect-server"]["command"]), "--port") == str(s.prefect_port)
    assert f"{s.mlflow_port}:{s.mlflow_port}" in stack["mlflow"]["ports"]
    assert option(command_list(stack["mlflow"]["command"]), "--port") == str(s.mlflow_port)
    assert f"{s.bento_port}:{s.bento_port}" in stack["classifier"]["ports"]
    health = {
        name: " ".join(command_list(service["healthcheck"]["test"]))
        for name, service in stack.items()
        if "healthcheck" in service
    }
    assert f":{s.prefect_port}/api/health" in health["prefect-server"]
    assert f":{s.mlflow_port}/health" in health["mlflow"]
    assert f":{s.bento_port}/readyz" in health["classifier"]
    assert "pg_isready" in health["postgres"]
    for name, service in stack.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert dependency in health, f"{name} waits for {dependency}, which has no healthcheck"
    assert stack["classifier"]["profiles"] == ["serve"]
    assert stack["classifier"]["image"] == "${BENTO_IMAGE:-text-classifier:latest}"
    assert stack["prefect-worker-gpu"]["profiles"] == ["gpu"]
    devices = stack["prefect-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for worker in ("prefect-worker", "prefect-worker-gpu"):
        env = stack[worker]["environment"]
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{s.prefect_port}/api"
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{s.mlflow_port}"


def test_bento_service_port_is_the_one_everything_else_uses():
    from service import TextClassifierService

    port = TextClassifierService.config.get("http", {}).get("port", 3000)  # BentoML's default when unset
    assert port == settings().bento_port == 3000


def test_compose_servers_use_postgresql_databases_the_init_script_creates():
    stack = compose()["services"]
    created = set(re.findall(r"CREATE DATABASE (\w+)", (ROOT / "docker" / "postgres-init.sql").read_text()))
    user = stack["postgres"]["environment"]["POSTGRES_USER"]
    assert any(v.startswith("./postgres-init.sql:/docker-entrypoint-initdb.d/") for v in stack["postgres"]["volumes"])
    mlflow_uri = option(command_list(stack["mlflow"]["command"]), "--backend-store-uri")
    prefect_url = stack["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for url, scheme in ((mlflow_uri, "postgresql"), (prefect_url, "postgresql+asyncpg")):
        match = re.fullmatch(r"(?P<scheme>[\w+]+)://(?P<user>\w+):\S+@postgres:5432/(?P<db>\w+)", url)
        assert match and match["scheme"] == scheme, url
        assert match["user"] == user and match["db"] in created, url
    command = command_list(stack["mlflow"]["command"])
    assert "--serve-artifacts" in command
    artifacts = option(command, "--artifacts-destination")
    assert any(volume.endswith(f":{artifacts}") for volume in stack["mlflow"]["volumes"])


# ------------------------------------------------------------------------------------------------ kubernetes


def test_kubernetes_bento_service_probes_ports_and_metrics():
    s = settings()
    deployment = k8s("Deployment", "text-classifier")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": s.bento_port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == s.bento_port, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]
    token = next(e for e in container["env"] if e["name"] == "TEXTCLF_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == s.bento_port
    service = k8s("Service", "text-classifier")
    assert service["spec"]["ports"][0]["port"] == 80
    assert ports.get(service["spec"]["ports"][0]["targetPort"]) == s.bento_port
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_kustomization_builds_with_the_classifier_image_set():
    """`kubectl kustomize` (client-side, no cluster) where kubectl is installed."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == {
        (d["kind"], d["metadata"]["name"]) for d in k8s_documents()
    }
    image = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["images"][0]
    classifier = next(d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "text-classifier")
    assert classifier["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"


def test_kubernetes_workers_may_create_jobs_and_read_pods_in_the_namespace_of_the_flow_runs():
    s = settings()
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    for document in k8s_documents():
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace, document["metadata"]["name"]
    for pool in POOLS:
        assert template("kubernetes", pool)["variables"]["properties"]["namespace"]["default"] == namespace
    rules = k8s("Role", "prefect-worker")["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    assert allowed("batch", "jobs", "create") and allowed("batch", "jobs", "watch")
    for resource in ("pods", "pods/log"):
        assert allowed("", resource, "get") and allowed("", resource, "list") and allowed("", resource, "watch")
    binding = k8s("RoleBinding", "prefect-worker")
    assert binding["roleRef"]["name"] == "prefect-worker"
    bound = {subject["name"] for subject in binding["subjects"] if subject["kind"] == "ServiceAccount"}
    config = k8s("ConfigMap", "textclf-config")["data"]
    assert config["PREFECT_API_URL"].endswith(f":{s.prefect_port}/api")
    assert config["MLFLOW_TRACKING_URI"].endswith(f":{s.mlflow_port}")
    for document in k8s_documents():
        if document["kind"] == "Deployment" and document["metadata"]["name"].startswith("prefect-worker"):
            spec = document["spec"]["template"]["spec"]
            assert spec["serviceAccountName"] in bound
            container = spec["containers"][0]
            assert {"configMapRef": {"name": "textclf-config"}} in container["envFrom"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == namespace
            assert container["resources"]["requests"]


# ------------------------------------------------------------------------------------------------ real servers


@pytest.mark.integration
def test_every_template_creates_its_work_pool_on_a_real_prefect_server(servers):
    """`prefect work-pool create --base-job-template` as `textclf deploy` runs it, then the pool read back."""
    from prefect.workers.process import ProcessJobConfiguration

    api = servers["prefect"]
    env = {**os.environ, "PREFECT_API_URL": api}
    suffix = uuid.uuid4().hex[:6]
    created = []
    try:
        for pool_type in POOL_TYPES:
            for pool in POOLS:
                name = f"{pool_type[:3]}-{pool}-test-{suffix}"
                path = POOLS_DIR / pool_type / f"{pool}.json"
                done = subprocess.run(
                    [
                        str(Path(sys.executable).parent / "prefect"),
                        "work-pool",
                        "create",
                        name,
                        "--type",
                        pool_type,
                        "--base-job-template",
                        str(path),
                        "--overwrite",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                created.append(name)
                stored = httpx.get(f"{api}/work_pools/{name}").raise_for_status().json()
                assert stored["type"] == pool_type
                assert stored["base_job_template"] == json.loads(path.read_text())
                job = render(stored["base_job_template"])
                if pool_type == "kubernetes":
                    resources = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
                    assert (GPU_RESOURCE in resources["limits"]) == (pool == "gpu")
                    assert (GPU_RESOURCE in resources["requests"]) == (pool == "gpu")
                elif pool_type == "docker":
                    requests = _docker_engine_payload(job)["host_config"].get("DeviceRequests")
                    assert bool(requests) == (pool == "gpu")
                else:
                    ProcessJobConfiguration(**job)
                if pool == "cpu":
                    assert "nvidia" not in json.dumps(stored["base_job_template"])
        listed = httpx.post(f"{api}/work_pools/filter", json={}).raise_for_status().json()
        assert set(created) <= {p["name"] for p in listed}
    finally:
        for name in created:
            httpx.delete(f"{api}/work_pools/{name}")


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}  # the machine's PostgreSQL, as in conftest


@pytest.mark.integration
def test_compose_mlflow_command_serves_the_other_containers_on_postgresql(tmp_path):
    """The compose file's `mlflow server` command as written (only the database, artifact folder, host and port
    changed to this machine's): it starts on PostgreSQL and answers requests addressed to `mlflow:5000`, the name the
    workers use, which MLflow's DNS-rebinding protection rejects unless --allowed-hosts names it."""
    psycopg = pytest.importorskip("psycopg")  # the `postgres` extra's driver
    from tasks.common.ports import free_port

    try:
        admin = psycopg.connect(dbname="postgres", connect_timeout=5, autocommit=True, **POSTGRES)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({error})")
    database = f"textclf_compose_mlflow_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    command = command_list(compose()["services"]["mlflow"]["command"])
    port = free_port()
    replace = {
        "--backend-store-uri": f"postgresql://{POSTGRES['user']}@127.0.0.1:5432/{database}",
        "--artifacts-destination": str(tmp_path / "mlartifacts"),
        "--host": "127.0.0.1",
        "--port": str(port),
    }
    for flag, value in replace.items():
        command[command.index(flag) + 1] = value
    command[0] = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start_process(command, tmp_path / "mlflow.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        for host in ("mlflow:5000", f"localhost:{port}", f"127.0.0.1:{port}"):
            answer = httpx.get(search, headers={"Host": host}, timeout=10)
            assert answer.status_code == 200, (host, answer.text)
        assert httpx.get(search, headers={"Host": "attacker.example:5000"}, timeout=10).status_code == 403
        # The tracking store is the PostgreSQL database.
        with (
            psycopg.connect(dbname=database, connect_timeout=5, **POSTGRES) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute("SELECT name FROM experiments")
            assert ("Default",) in cursor.fetchall()
    finally:
        stop_process_tree(server.pid, timeout_seconds=60)
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


def test_bentofile_pins_every_package_to_constraints_and_never_locks():
    """`bentoml build` with package locking resolves against the package index (the network) at build time: the
    promotion flow must build offline, so every package is pinned to the tested version and nothing is locked."""
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    pins = dict(
        line.strip().split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    assert bentofile["python"]["lock_packages"] is False
    for requirement in bentofile["python"]["packages"]:
        name, version = requirement.split("==")
        assert pins[name.lower()] == version, requirement
