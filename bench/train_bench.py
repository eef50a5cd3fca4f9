"""Training benchmark: one round on ~1,000 labelled 96x96 scenes, then a round on twice the data.

Writes bench/results/train.json: the time of a round (and where it goes), holdout accuracy
and macro-F1 of round 1 vs round 2 (warm-started from round 1), and how fast the synthetic
scene generator is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import write_json
from lensflow import scenes
from lensflow.servers import S3Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config

PER_CLASS = 167  # x 6 classes = 1,002 labelled images
HOLDOUT_PER_CLASS = 50


def _round_summary(report) -> dict:
    ev = report.challenger["evaluation"]
    champ = (report.champion or {}).get("evaluation") or {}
    return {
        "outcome": report.outcome,
        "reason": report.reason,
        "labeled_images": report.data["labeled_total"],
        "holdout_images": report.data["holdout_total"],
        "accuracy": ev["accuracy"],
        "macro_f1": ev["macro_f1"],
        "champion_accuracy": champ.get("accuracy"),
        "warm_start": report.challenger["warm_start"],
        "timings": report.timings,
    }


def scene_speed() -> dict:
    t0 = time.perf_counter()
    n = 0
    for seed in range(50):
        for cls in scenes.CLASSES:
            scenes.render_scene(cls, seed)
            n += 1
    per_small = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    photo = scenes.scene_jpeg("field", 1, (4000, 3000), quality=90)
    return {
        "render_96_ms": round(per_small * 1000, 2),
        "jpeg_12mp_ms": round((time.perf_counter() - t0) * 1000, 1),
        "jpeg_12mp_bytes": len(photo),
    }


def run(out_dir: Path) -> dict:
    from lensflow.seeding import seed_training_data
    from lensflow_train.round import run_round

    result: dict = {"cpus": os.cpu_count(), "scenes": scene_speed()}
    with S3Server() as server:
        env = {"LENSFLOW_S3_ENDPOINT": server.endpoint, "LENSFLOW_LOG_LEVEL": "WARNING"}
        config = Config.from_env(env)
        s3 = s3_client(config)
        ensure_buckets(s3, config.buckets)
        result["epochs"] = config.train_epochs
        result["metric"] = config.train_metric

        t0 = time.perf_counter()
        seed_training_data(config, PER_CLASS, HOLDOUT_PER_CLASS, seed=0, s3=s3)
        result["seed_data_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        first = run_round(config, s3=s3)
        result["round1_s"] = round(time.perf_counter() - t0, 2)
        result["round1"] = _round_summary(first)

        seed_training_data(config, 2 * PER_CLASS, HOLDOUT_PER_CLASS, seed=0, s3=s3)
        t0 = time.perf_counter()
        second = run_round(config, s3=s3)
        result["round2_s"] = round(time.perf_counter() - t0, 2)
        result["round2"] = _round_summary(second)

    r1, r2 = result["round1"], result["round2"]
    result["targets"] = {
        "round1_train_s<60": r1["timings"]["train_s"] < 60,
        "round1_accuracy>=0.85": r1["accuracy"] >= 0.85,
        "round2_accuracy>=round1": r2["accuracy"] >= r1["accuracy"],
        "render_96_ms<3": result["scenes"]["render_96_ms"] < 3,
    }
    write_json(out_dir, "train", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
