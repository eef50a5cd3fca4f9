"""Training Job memory: the peak RSS of `lensflow-train-job` rounds of two sizes, on the
small CNN and on the pretrained backbone, and from them the largest round that fits the
Job's memory limit.

Each round runs exactly as the JobSink's Job does (a child process reading an event file)
and reports its own peak RSS. Peak = base + per_image x images: the two rounds give the
slope (per image, everything a round keeps per image: the uint8 arrays, keys, labels) and
the base (Python, TensorFlow, the model, LiteRT). The load's buffers are added at their
worst case (the synthetic scenes are small; a real photo is not). Writes
bench/results/train_memory.json; the target checks that the default
LENSFLOW_TRAIN_MAX_IMAGES fits the dev Job's 3Gi with HEADROOM to spare, either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_json
from lensflow import scenes
from lensflow.seeding import seed_training_data
from lensflow.servers import S3Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config, default
from lensflow_train import dataset

SIZES_PER_CLASS = (50, 550)  # labelled per class; x 6 classes, plus the holdout
HOLDOUT_PER_CLASS = 20
LIMITS_MIB = {"dev": 3 * 1024, "prod": 4 * 1024}  # the JobSink's memory limits
HEADROOM = 0.8  # plan for 80% of the limit: the kernel, page cache and estimates


def job_round(env: dict[str, str], tag: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        event = Path(tmp) / "event"
        event.write_text(
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": tag,
                    "source": "bench",
                    "type": "dev.knative.sources.ping",
                    "data": {"reason": "bench", "force": True},
                }
            )
        )
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "lensflow_train.job", "--event", str(event)],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    if done.returncode != 0:
        raise RuntimeError(f"round failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return {
        "images": report["data"]["labeled_total"] + report["data"]["holdout_total"],
        "peak_rss_mb": report["peak_rss_mb"],
        "seconds": round(time.perf_counter() - started, 1),
        "outcome": report["outcome"],
    }


def variant(server: S3Server, backbone: str) -> dict:
    """Peak RSS of a small and a large round training on ``backbone``; the fitted line."""
    import os

    rounds = []
    for per_class in SIZES_PER_CLASS:
        tag = f"{backbone.replace('_', '-')}-{per_class}"
        env = {
            **os.environ,
            "LENSFLOW_S3_ENDPOINT": server.endpoint,
            "LENSFLOW_IMAGE_BUCKETS": f"images-{tag}",
            "LENSFLOW_MODEL_BUCKET": f"models-{tag}",
            "LENSFLOW_TRAIN_BACKBONE": backbone,
            "LENSFLOW_TRAIN_EPOCHS": "2",  # memory does not grow with epochs
            "LENSFLOW_LOG_LEVEL": "WARNING",
        }
        config = Config.from_env(env)
        ensure_buckets(s3_client(config), config.buckets)
        if backbone != "none":
            subprocess.run(
                [sys.executable, "-m", "lensflow", "models", "backbone", "import"],
                env=env,
                check=True,
                capture_output=True,
            )
        seed_training_data(config, per_class, HOLDOUT_PER_CLASS, seed=0)
        rounds.append(job_round(env, f"bench-{tag}"))
    small, large = rounds
    per_image_kb = (
        (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / (large["images"] - small["images"])
    )
    base_mb = small["peak_rss_mb"] - per_image_kb * small["images"] / 1024
    # Worst-case load buffers with real photos (the scenes here are small): every fetch
    # thread holding an object of the largest size, every decoder the largest picture.
    transient_mb = (
        dataset.LOAD_THREADS * config.max_image_bytes
        + dataset.DECODE_SLOTS * config.max_image_pixels * 3
    ) / 2**20
    return {
        "rounds": rounds,
        "per_image_kb": round(per_image_kb, 1),
        "base_mb": round(base_mb, 1),
        "worst_load_buffers_mb": round(transient_mb, 1),
        "max_images": {
            overlay: int((limit * HEADROOM - base_mb - transient_mb) * 1024 / per_image_kb)
            for overlay, limit in LIMITS_MIB.items()
        },
    }


def run(out_dir: Path) -> dict:
    with S3Server() as server:
        result: dict = {
            backbone: variant(server, backbone) for backbone in ("none", "mobilenet_v2_imagenet")
        }
    configured = int(default("LENSFLOW_TRAIN_MAX_IMAGES"))
    result["classes"] = len(scenes.CLASSES)
    result["default_max_images"] = configured
    result["targets"] = {
        f"default LENSFLOW_TRAIN_MAX_IMAGES fits 80% of 3Gi ({backbone})": configured
        <= result[backbone]["max_images"]["dev"]
        for backbone in ("none", "mobilenet_v2_imagenet")
    }
    write_json(out_dir, "train_memory", result)
    return result


if __name__ == "__main__":
    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
