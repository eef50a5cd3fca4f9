"""The function images without docker: each Dockerfile's own instructions, replayed here.

``Dockerfile`` reads a Dockerfile (stages, ENV, WORKDIR, COPY, RUN, CMD). The predict image's
build stage is replayed into a virtualenv exactly as written (its `pip install --require-hashes`
installs functions/predict/requirements.lock as in the image, so nothing is duplicated here); only what the Dockerfile
COPYs reaches the app directory; its CMD is started with PORT and must answer /healthz and
turn one KafkaSource delivery into a prediction (against this test's moto, Tansu and a
published model), while `import tensorflow` fails in that virtualenv. The dependency
layer is cached under var/container/ keyed by the layer's instructions, the lock it copies and
the Python version, as docker caches a layer: only the first run downloads.

The train image is checked only as far as is cheap (no second TensorFlow install): its CMD is
the command the JobSink's Job runs, and the script its build makes resolves that entry point.
Not replayed: the final stage's RUN (`useradd`, needs root) and USER.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from cloudevents.http import from_http

from lensflow.process import ChildProcess, free_port, http_ok
from lensflow.scenes import scene_jpeg
from lensflow_core.s3 import s3_client
from lensflow_core.settings import Config
from lensflow_eventing.topics import ensure_topics, topic_specs
from lensflow_model_store import ModelStore
from tests.support.env import LABELS
from tests.support.functions_harness import put_and_notify
from tests.support.packages import FIRST_PARTY

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "var" / "container"

pytestmark = [pytest.mark.slow, pytest.mark.container]


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of instructions (keyword, arguments); continuations joined, comments dropped."""
    stages: list[Stage] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):  # docker joins a continued line without the newline
            current = current[:-1]
            continue
        keyword, _, args = current.strip().partition(" ")
        current = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[-1] if "AS" in (w.upper() for w in words) else ""))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def env_pairs(args: str, env: dict[str, str]) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(args.replace("\n", " ")):
        name, _, value = word.partition("=")
        for known, val in {**env, **pairs}.items():
            value = value.replace(f"${known}", val)
        pairs[name] = value
    return pairs


class Replay:
    """Replays one image's stages on this machine, absolute image paths under ``root``."""

    def __init__(self, dockerfile: Path, root: Path, app: Path):
        self.stages = parse_dockerfile(dockerfile)
        self.root, self.app = root, app
        self.paths: dict[str, Path] = {"/app": app}  # image path -> real path

    def real(self, path: str) -> Path:
        for image_path in sorted(self.paths, key=len, reverse=True):
            if path == image_path or path.startswith(image_path + "/"):
                return self.paths[image_path] / path[len(image_path) :].lstrip("/")
        real = self.root / path.lstrip("/")
        self.paths[path] = real
        return real

    def mapped(self, text: str) -> str:
        for image_path in sorted(self.paths, key=len, reverse=True):
            text = text.replace(image_path, str(self.paths[image_path]))
        return text

    def dependency_layer(self, stage: Stage) -> int:
        """How many instructions make the dependency layer: up to the first RUN after the
        COPY of the function's hashed lock (requirements.lock)."""
        seen_lock = False
        for i, (keyword, args) in enumerate(stage.instructions):
            seen_lock |= keyword == "COPY" and "requirements.lock" in args
            if seen_lock and keyword == "RUN":
                return i + 1
        raise AssertionError("no dependency layer (COPY requirements.lock, then RUN)")

    def build(self, stage: Stage, base_path: str) -> None:
        """Replay the build stage; skip the dependency layer when it is cached."""
        env = {"PATH": base_path, "HOME": str(self.root)}
        cwd = self.root
        cached = self.root / ".dependency-layer-done"
        layer = self.dependency_layer(stage)
        for i, (keyword, args) in enumerate(stage.instructions):
            skip = i < layer and cached.exists()
            if keyword == "RUN" and "python -m venv" in args:
                self.real(args.split()[-1])  # the venv's path, cached or not
            if keyword == "ENV":
                env.update({k: self.mapped(v) for k, v in env_pairs(args, env).items()})
            elif keyword == "WORKDIR":
                cwd = self.real(args)
                cwd.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY" and not skip:
                *sources, dest = shlex.split(args)
                target = cwd / dest if not dest.startswith("/") else self.real(dest)
                for source in sources:
                    copy(REPO / source, target, dest.endswith("/") or len(sources) > 1)
            elif keyword == "RUN" and not skip:
                # the image's python: this test's interpreter (the same minor version)
                args = args.replace("python -m venv", f"{sys._base_executable} -m venv", 1)
                self.clear_code(env)
                done = subprocess.run(
                    ["sh", "-c", self.mapped(args)], cwd=cwd, env=env, capture_output=True
                )
                assert done.returncode == 0, f"RUN {args[:80]}...: {done.stderr.decode()[-3000:]}"
            if i == layer - 1 and not skip:
                cached.touch()

    def clear_code(self, env: dict[str, str]) -> None:
        """Remove the code a previous replay copied into the cached venv (docker would start
        the code layer from the dependency layer: no stale modules)."""
        venv = next((p for p in self.paths.values() if (p / "pyvenv.cfg").exists()), None)
        if venv is None:
            return
        for site in venv.glob("lib/python*/site-packages"):
            for package in FIRST_PARTY:
                shutil.rmtree(site / package, ignore_errors=True)

    def final(self, stage: Stage, build: Replay | None = None) -> tuple[list[str], dict[str, str]]:
        """The final stage's files in place; its CMD and environment."""
        env: dict[str, str] = {"PATH": "/usr/bin:/bin"}
        cwd = self.app
        cmd: list[str] = []
        for keyword, args in stage.instructions:
            if keyword == "ENV":
                env.update({k: self.mapped(v) for k, v in env_pairs(args, env).items()})
            elif keyword == "WORKDIR":
                cwd = self.real(args)
                cwd.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                words = shlex.split(args)
                if words[0].startswith("--from="):
                    continue  # the build stage's paths are already where they are mapped
                *sources, dest = [w for w in words if not w.startswith("--")]
                target = cwd / dest if not dest.startswith("/") else self.real(dest)
                for source in sources:
                    copy(REPO / source, target, dest.endswith("/"))
            elif keyword == "CMD":
                cmd = json.loads(args)
        return cmd, env


def copy(source: Path, target: Path, into: bool) -> None:
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        return
    if into or target.is_dir():
        target = target / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def layer_key(dockerfile: Path) -> str:
    stage = parse_dockerfile(dockerfile)[0]
    replay = Replay(dockerfile, Path("/nonexistent"), Path("/nonexistent"))
    layer = stage.instructions[: replay.dependency_layer(stage)]
    digest = hashlib.sha256(repr(layer).encode())
    for keyword, args in layer:  # what the layer copies in (the lock), as docker keys it
        if keyword == "COPY":
            for source in shlex.split(args)[:-1]:
                digest.update((REPO / source).read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def predict_image(tmp_path_factory) -> Replay:
    dockerfile = REPO / "functions" / "predict" / "Dockerfile"
    root = CACHE / f"predict-{layer_key(dockerfile)}"
    root.mkdir(parents=True, exist_ok=True)
    replay = Replay(dockerfile, root, tmp_path_factory.mktemp("app"))
    build, final = replay.stages
    replay.build(build, "/usr/bin:/bin")
    return replay


def test_predict_image_serves_a_prediction_and_cannot_import_tensorflow(
    predict_image, kafka_env, tiny_models, tmp_path
):
    cmd, image_env = predict_image.final(predict_image.stages[-1])
    venv_python = Path(predict_image.paths["/opt/venv"]) / "bin" / "python"
    no_tf = subprocess.run([str(venv_python), "-c", "import tensorflow"], capture_output=True)
    assert no_tf.returncode != 0 and b"ModuleNotFoundError" in no_tf.stderr
    # only what the Dockerfile copies is in the app directory
    files = sorted(
        str(p.relative_to(predict_image.app)) for p in predict_image.app.rglob("*") if p.is_file()
    )
    assert files == ["functions/predict/lensflow_predict/main.py"]

    config = Config.from_env(kafka_env)
    ensure_topics(config.kafka_bootstrap, topic_specs(*config.topics))
    store = ModelStore.from_config(config)
    store.publish(tiny_models["last"], LABELS)
    store.flip("v1", reason="container smoke test")
    port = free_port()
    env = {**image_env, **kafka_env, "PORT": str(port), "HOME": str(tmp_path)}
    server = ChildProcess(
        "predict-image", cmd, env=env, log_path=tmp_path / "predict.log", cwd=predict_image.app
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.start(http_ok(f"{url}/healthz"), timeout_s=90)
        bucket = config.image_buckets[0]
        reply = put_and_notify(
            url, config, s3_client(config), bucket, "a.jpg", scene_jpeg("water", 1)
        )
        assert reply.status_code == 200, reply.text
        data = from_http(dict(reply.headers), reply.content).data
        assert data["model"]["version"] == "v1"
        assert data["predictions"][0]["label"] == "water"  # the always-class-2 model
    finally:
        server.stop()
        log = (tmp_path / "predict.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_train_image_runs_the_jobs_entry_point(tmp_path):
    dockerfile = REPO / "functions" / "train" / "Dockerfile"
    build, final = parse_dockerfile(dockerfile)
    assert dict(final.instructions)["CMD"] == '["lensflow-train-job"]'
    manifest = (REPO / "knative" / "base" / "jobsink-train.yaml").read_text()
    assert 'command: ["lensflow-train-job"]' in manifest
    # the build's RUN that makes the command, replayed against a scratch bin directory
    (run,) = [a for k, a in build.instructions if k == "RUN" and "lensflow-train-job" in a]
    command = next(part for part in run.split("&&") if "printf" in part)
    command = command.strip().replace("/opt/venv/bin", str(tmp_path))
    subprocess.run(["sh", "-c", command], check=True)
    script = tmp_path / "lensflow-train-job"
    script.chmod(0o755)
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # a python with TensorFlow: ours
    done = subprocess.run(
        [str(script), "--help"], env={"PATH": path}, capture_output=True, text=True
    )
    assert done.returncode == 0 and "lensflow-train-job" in done.stdout, done.stderr


def test_dashboard_image_serves_its_views_and_writes_only_with_a_token(env, tiny_models, tmp_path):
    """The dashboard's image: its build replayed, its CMD started with PORT and a token."""
    dockerfile = REPO / "dashboard" / "Dockerfile"
    root = CACHE / f"dashboard-{layer_key(dockerfile)}"
    root.mkdir(parents=True, exist_ok=True)
    image = Replay(dockerfile, root, tmp_path / "app")
    build, final = image.stages
    image.build(build, "/usr/bin:/bin")
    cmd, image_env = image.final(final)
    store = ModelStore.from_config(Config.from_env(env))
    store.flip(store.publish(tiny_models["last"], LABELS).version, reason="container test")
    port = free_port()
    token = "container token"
    run_env = {**image_env, **env, "PORT": str(port), "LENSFLOW_DASHBOARD_TOKEN": token}
    server = ChildProcess(
        "dashboard-image", cmd, env=run_env, log_path=tmp_path / "dash.log", cwd=image.app
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.start(http_ok(f"{url}/api/state"), timeout_s=60)
        assert "learning.js" in requests.get(url, timeout=5).text
        assert requests.get(f"{url}/api/quality", timeout=10).json()["serving"] == "v1"
        body = {"image": "x/y.jpg", "class": "water"}
        assert requests.post(f"{url}/api/label", json=body, timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        refused = requests.post(f"{url}/api/label", json=body, headers=auth, timeout=10)
        assert refused.status_code == 409  # not queued: the token works, the rules hold
    finally:
        server.stop()
