"""`textclf deploy`: create the `gpu` and `cpu` work pools from the base job templates in
`deployments/work-pools/<pool type>/`, then register every deployment of `prefect.yaml` (`prefect deploy --all`).
Both steps are Prefect's own CLI, so what this does is what the Prefect docs describe; it is safe to re-run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from flows.local_stack import _bin

PROJECT_DIR = Path(__file__).resolve().parents[1]
POOLS = ("gpu", "cpu")
POOL_TYPES = ("process", "docker", "kubernetes")
IMAGE_PROJECT_DIR = "/opt/textclf"  # WORKDIR of docker/Dockerfile: where docker and kubernetes runs find the code


class DeployError(RuntimeError):
    pass


def pool_template(pool_type: str, pool: str) -> Path:
    return PROJECT_DIR / "deployments" / "work-pools" / pool_type / f"{pool}.json"


def deployment_names() -> list[str]:
    return [d["name"] for d in yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())["deployments"]]


def _prefect(args: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(
        [_bin("prefect"), *args], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise DeployError(
            f"{what} failed (`prefect {' '.join(args)}`, exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return done.stdout


def deploy(api_url: str, pool_type: str = "process", project_dir: str | None = None) -> list[str]:
    """Create or update the work pools and register the deployments on the Prefect server at `api_url`.
    `project_dir` is where workers find the code: this repository for `process` pools (the default), the image's
    /opt/textclf for `docker` and `kubernetes`. Returns the deployment names."""
    if pool_type not in POOL_TYPES:
        raise DeployError(f"Unknown work-pool type '{pool_type}': use one of {', '.join(POOL_TYPES)}.")
    code_dir = project_dir or (str(PROJECT_DIR) if pool_type == "process" else IMAGE_PROJECT_DIR)
    env = {**os.environ, "PREFECT_API_URL": api_url, "TEXTCLF_PROJECT_DIR": code_dir}
    for pool in POOLS:
        template = pool_template(pool_type, pool)
        if not template.exists():
            raise DeployError(f"No base job template for the '{pool}' pool of type '{pool_type}' at {template}.")
        _prefect(
            ["work-pool", "create", pool, "--type", pool_type, "--base-job-template", str(template), "--overwrite"],
            env,
            f"Creating work pool '{pool}'",
        )
    _prefect(["--no-prompt", "deploy", "--all"], env, "Registering the deployments of prefect.yaml")
    return deployment_names()
