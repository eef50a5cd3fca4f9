"""A predict replica alone on its core vs the bare loop on that core (issue 9).

Measures the design rather than the crowd. One replica (containerConcurrency 4: THREADS 4,
the dispatcher unordered with 4 in flight) drains backlogs of 640x480 JPEG records; the
bare decode + resize + invoke loop runs on the replica's CPUs just before and just after
each backlog; the ratio is the backlog's images/s over the mean of the two.

Variants, interleaved backlog by backlog so that the machine's load drifts over all alike:

- ``isolated``: the replica pinned (``taskset``) to the first CPU; S3 (moto), the broker
  (Tansu), the dispatcher and the load on the others; the bare loop (1 thread) pinned to
  the replica's CPU. Settings as shipped (micro-batching off).
- ``isolated_batch``: the same with micro-batching on (``LENSFLOW_BATCH_DELAY_MS=2``).
- ``shared``: nothing pinned, everything on every CPU; the bare loop with one thread per
  CPU.

``LENSFLOW_BENCH_BACKLOGS`` (default 5) backlogs of ``LENSFLOW_BENCH_BACKLOG_IMAGES``
(default 400) per variant; medians over them. Each backlog records ``/proc/loadavg``, the
busy share of every CPU, the replica's CPU time per image and the batches it ran.

This machine is shared: other work takes CPU time on the replica's core too, which
images/s counts against the replica and the bare loop alike only if it stays steady.
``cpu_ratio`` (bare loop CPU ms per image / replica CPU ms per image) does not count it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import QUEUE_ON, cpu_seconds, mobilenet_v2_tflite, serving_stack, write_json
from bench.e2e_bench import ArrivalLog, upload_at_rate
from lensflow.function_server import FunctionServer
from lensflow.process import ChildProcess, function_command
from lensflow.replicas import PREDICT_CONCURRENCY
from lensflow.scenes import CLASSES, scene_jpeg
from lensflow.stack import dispatcher_for
from lensflow.upload import upload_file
from lensflow_core.imaging import decode_image
from lensflow_core.runtime import InputSpec
from lensflow_core.s3 import ensure_buckets
from lensflow_core.settings import SETTINGS, Config
from lensflow_eventing.contracts import ObjectEvent
from lensflow_eventing.producer import make_producer, publish_object_event
from lensflow_predict.serving_model import ServingModel

BACKLOGS = int(os.environ.get("LENSFLOW_BENCH_BACKLOGS", "5"))
BACKLOG_IMAGES = int(os.environ.get("LENSFLOW_BENCH_BACKLOG_IMAGES", "400"))
BARE_SECONDS = float(os.environ.get("LENSFLOW_BENCH_BARE_SECONDS", "4"))


def tasks(pid: int) -> list[int]:
    """Thread ids of ``pid`` and of all its descendants."""
    return [tid for _, tid in _threads(pid)]


def _threads(pid: int) -> list[tuple[int, int]]:
    """(process id, thread id) of every thread of ``pid`` and of all its descendants."""
    found = []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            found += [(current, int(t)) for t in os.listdir(f"/proc/{current}/task")]
        except OSError:
            continue
        todo += children.get(current, [])
    return found


def pin(pids: list[int], cpus: set[int]) -> None:
    """Move every thread of ``pids`` (and their children) and of this process (not its
    children: the replicas) onto ``cpus``."""
    own = [int(t) for t in os.listdir("/proc/self/task")]
    for pid in pids:
        for tid in [*own, *tasks(pid)]:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that just ended
                pass


def cpu_busy() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU so far, from /proc/stat."""
    rows = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in values]
            idle = v[3] + v[4]  # idle + iowait
            rows.append((sum(v) - idle, sum(v)))
    return rows


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of every thread of ``pid`` and its children, by thread name
    (librdkafka's ``rdk:*`` threads are native: a Python profiler does not see them;
    Python's threads all carry the process's name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for process, tid in _threads(pid):
        try:  # /proc/<tid>/stat would count the whole process
            stat = Path(f"/proc/{process}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        name = name.rstrip("0123456789") or name  # rdk:broker1, ThreadPoolExecutor-0_1
        if tid == process:  # the arbiter's loop; the worker's event loop (uvicorn)
            name = f"{name} (main thread)"
        fields = stat.rsplit(")", 1)[1].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return used


def process_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (gunicorn's arbiter and its worker)."""
    return cpu_seconds({"p": [pid]})["p"]


def bare_loop(
    model_bytes: bytes, photos: list[bytes], cpus: set[int], seconds: float
) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode + resize + invoke, one thread (and
    interpreter) per CPU in ``cpus``, each thread pinned to ``cpus``. CPU time, unlike
    images/s, does not count the time other processes held the CPU."""
    spec = InputSpec(224, 224, "float32", 1 / 255, 0.0)
    model = ServingModel("bench", "v0", "-", model_bytes, list(CLASSES), spec, len(cpus))
    counts = [0] * len(cpus)
    cpu_s = [0.0] * len(cpus)

    def loop(worker: int, until: float) -> None:
        os.sched_setaffinity(0, cpus)  # this thread only
        i, started = worker, time.thread_time()
        while time.perf_counter() < until:
            model.predict(decode_image(photos[i % len(photos)], (224, 224), max_pixels=10**8))
            counts[worker] += 1
            i += len(cpus)
        cpu_s[worker] = time.thread_time() - started

    def timed(duration: float) -> tuple[float, float]:
        counts[:] = [0] * len(cpus)
        started = time.perf_counter()
        threads = [
            threading.Thread(target=loop, args=(w, started + duration)) for w in range(len(cpus))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = sum(counts)
        return done / (time.perf_counter() - started), 1000 * sum(cpu_s) / max(1, done)

    timed(0.5)  # warm: interpreters made, caches filled
    return timed(seconds)


@dataclass(frozen=True)
class Spec:
    """A replica set-up to measure: pinned alone or not, extra settings, and Python run
    in the replica before functions-framework starts (``bench/gap_bench.py`` uses it to
    take one suspect away at a time)."""

    name: str
    isolated: bool = True
    env: dict[str, str] = field(default_factory=dict)
    prelude: str = ""
    cli: bool = False  # `lensflow serve predict`, fed by a `lensflow dispatch` of its own


# the labelling queue as shipped (serving_stack turns it off)
DEFAULT_QUEUE = {s.name: s.default for s in SETTINGS if s.name == "LENSFLOW_LABEL_QUEUE_MAX"}
SPECS = (
    Spec("isolated"),  # the labelling queue off
    Spec("isolated_queue", env=QUEUE_ON),  # every picture queued
    Spec("isolated_batch", env={"LENSFLOW_BATCH_DELAY_MS": "2"}),
    Spec("shared", isolated=False),
    Spec("dispatch_cli", env=DEFAULT_QUEUE, cli=True),  # defaults, as an operator runs it
)

PROFILES = Path(__file__).parent / "results" / "profiles"


def _profile(variant: Variant, seconds: float) -> subprocess.Popen:
    """py-spy (``--native``, raw collapsed stacks) on the replica's worker process
    for ``seconds`` of the backlog, into bench/results/profiles/<variant>.txt."""
    pid = variant.server.proc.pid
    worker = max(tasks_pids(pid))  # gunicorn's worker: the arbiter's child
    PROFILES.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--native",  # active samples only (no --idle): where the CPU goes
            "--threads",
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            str(round(seconds)),
            "--pid",
            str(worker),
            "--output",
            str(PROFILES / f"{variant.name}.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(PROFILES / f"{variant.name}.log").open("w"),
    )


def tasks_pids(pid: int) -> list[int]:
    """``pid`` and its descendants' process ids."""
    return sorted({process for process, _ in _threads(pid)})


class Variant:
    """One replica, how it is pinned, and the backlogs measured on it."""

    def __init__(self, spec: Spec, env: dict[str, str], all_cpus: list[int]):
        self.name = spec.name
        self.replica_cpus = {all_cpus[0]} if spec.isolated else set(all_cpus)
        self.other_cpus = set(all_cpus[1:]) if spec.isolated else set(all_cpus)
        threads = {"THREADS": str(PREDICT_CONCURRENCY)}  # env: serving_stack's, queue off
        if spec.cli:  # the replica predicts the bucket of the operator's backlog too
            allowed = [*Config.from_env(env).image_buckets, CLI_BUCKET]
            threads["LENSFLOW_IMAGE_BUCKETS"] = ",".join(allowed)
        server = FunctionServer("predict", {**env, **threads, **spec.env})
        command = function_command("predict", server.port)
        if spec.prelude:  # the same command line, after the prelude, in one interpreter
            code = (
                f"{spec.prelude}\nimport sys\nfrom functions_framework._cli import _cli\n"
                "sys.argv = ['functions-framework'] + sys.argv[1:]\n_cli()"
            )
            command = [sys.executable, "-c", code, *command[1:]]
        self.topic, self.dispatcher = None, None
        if spec.cli:  # the operator's commands: its own topic, so no other variant sees it
            lensflow = str(Path(sys.executable).with_name("lensflow"))
            command = [lensflow, "serve", "predict", "--port", str(server.port)]
            self.topic = f"images-{spec.name}"
            dispatch = [lensflow, "dispatch", "--sink", server.url, "--ordering", "unordered"]
            dispatch += ["--max-in-flight", str(PREDICT_CONCURRENCY), "--json"]
            names = {"LENSFLOW_TOPIC_IMAGES": self.topic, "LENSFLOW_SOURCE_NAME": spec.name}
            names["LENSFLOW_IMAGE_BUCKETS"] = threads["LENSFLOW_IMAGE_BUCKETS"]
            env_all = {**os.environ, **env, **spec.env, **names}
            self.dispatcher = ChildProcess(f"dispatch {spec.name}", dispatch, env=env_all)
        if spec.isolated:  # pinned from its first instruction: it sizes itself by its CPUs
            cpus = ",".join(str(c) for c in sorted(self.replica_cpus))
            command = ["taskset", "-c", cpus, *command]
        server.command = command
        self.server = server
        self.backlogs: list[dict] = []


CLI_BUCKET = "bench-cli"  # no notification: the operator's dispatcher has a topic of its own


def cli_backlog(s3, kafka, topic: str, prefix: str, photos: list[bytes]) -> list[str]:
    """The backlog of ``lensflow dispatch``'s own topic: the photos put in a bucket nobody
    watches, and the record MinIO would write for each produced there (the same conversion
    the embedded S3 uses), so that the variants fed by the bench's dispatcher never see them.
    """
    producer = make_producer(kafka)
    paths = []
    for i in range(BACKLOG_IMAGES):
        key, data = f"{prefix}/{i:05d}.jpg", photos[i % len(photos)]
        stored = upload_file(s3, CLI_BUCKET, key, data, "image/jpeg")
        event = ObjectEvent("s3:ObjectCreated:Put", CLI_BUCKET, key, stored.etag, len(data))
        publish_object_event(producer, topic, event)
        paths.append(f"{CLI_BUCKET}/{key}")
    producer.flush(10)
    return paths


def backlog(
    variant: Variant,
    number: int | str,
    stack_pids: list[int],
    sink_url: list[str],
    s3,
    bucket: str,
    watcher: ArrivalLog,
    model_bytes: bytes,
    photos: list[bytes],
    profile_s: float = 0.0,
) -> dict:
    pin(stack_pids, variant.other_cpus)
    before, cpu_before = bare_loop(model_bytes, photos, variant.replica_cpus, BARE_SECONDS)
    sink_url[0] = variant.server.url
    pid = variant.server.proc.pid
    metrics_before = variant.server.stats()
    cpu0, busy0, load0 = process_cpu_s(pid), cpu_busy(), os.getloadavg()
    threads0 = thread_cpu_s(pid)
    profiler = _profile(variant, profile_s) if profile_s else None
    prefix = f"{variant.name}-{number}"
    if variant.topic is None:  # the photos as drones put them, at once: their events
        paths = list(
            upload_at_rate(s3, bucket, prefix, photos, BACKLOG_IMAGES, lambda t: 1e6, 3600)
        )
    else:
        paths = cli_backlog(s3, watcher.config.kafka, variant.topic, prefix, photos)
    if not watcher.wait_for(set(paths), 300):
        raise RuntimeError(f"{variant.name}: not every backlog image got a prediction")
    cpu1, busy1 = process_cpu_s(pid), cpu_busy()
    threads = len(tasks(pid))
    threads1 = thread_cpu_s(pid)
    by_thread = {
        name: round((used - threads0.get(name, 0.0)) * 1000 / len(paths), 2)
        for name, used in sorted(threads1.items(), key=lambda kv: -kv[1])
        if used - threads0.get(name, 0.0) > 0
    }
    if profiler is not None:
        profiler.wait(60)
    metrics_after = variant.server.stats()
    after, cpu_after = bare_loop(model_bytes, photos, variant.replica_cpus, BARE_SECONDS)
    times = sorted(watcher.seen[p] for p in paths)
    skip = len(times) // 10  # the first tenth: connections and caches warming
    rate = (len(times) - 1 - skip) / (times[-1] - times[skip])
    bare = (before + after) / 2
    bare_cpu = (cpu_before + cpu_after) / 2
    replica_cpu = (cpu1 - cpu0) * 1000 / len(paths)
    batches = metrics_after.get("batches") or {}
    batches_before = metrics_before.get("batches") or {}
    ran = batches.get("batches", 0) - batches_before.get("batches", 0)
    stages0, stages1 = metrics_before.get("stage_cpu_s", {}), metrics_after.get("stage_cpu_s")
    return {
        "images": len(paths),
        "images_per_s": round(rate, 2),
        "bare_before_images_per_s": round(before, 2),
        "bare_after_images_per_s": round(after, 2),
        "ratio": round(rate / bare, 3),
        "replica_cpu_ms_per_image": round(replica_cpu, 2),
        "bare_cpu_ms_per_image": round(bare_cpu, 2),
        # the same ratio in CPU time: what the replica spends per image beyond the bare
        # loop, whoever else held the CPU meanwhile (this machine is shared)
        "cpu_ratio": round(bare_cpu / replica_cpu, 3),
        "cpu_busy": [
            round((b1 - b0) / max(1, t1 - t0), 3)
            for (b0, t0), (b1, t1) in zip(busy0, busy1, strict=True)
        ],
        "loadavg_before": [round(x, 2) for x in load0],
        "mean_batch": round(len(paths) / ran, 2) if ran else None,
        "replica_cpus": metrics_after.get("cpus"),
        "replica_threads": threads,
        "replica_cpu_ms_per_image_by_thread": by_thread,
        "stage_cpu_ms_per_image": {
            name: round((used - stages0.get(name, 0.0)) * 1000 / len(paths), 2)
            for name, used in (stages1 or {}).items()
        },
    }


def measure(
    specs: tuple[Spec, ...], backlogs: int = BACKLOGS, profile: dict[str, float] | None = None
) -> dict:
    """Every spec's backlogs, interleaved; per spec the medians and every run.

    ``profile``: variant name -> seconds of py-spy on its replica during one more backlog.
    """
    profile = profile or {}
    all_cpus = sorted(os.sched_getaffinity(0))
    if len(all_cpus) < 2:
        raise RuntimeError("the isolated benchmark needs at least 2 CPUs")
    model_bytes = mobilenet_v2_tflite(len(CLASSES))
    photos = [scene_jpeg(CLASSES[i % len(CLASSES)], i, (640, 480), 88) for i in range(16)]
    result: dict = {
        "model": "MobileNetV2 224x224x3 float32 (random weights)",
        "cpus": all_cpus,
        "backlogs": backlogs,
        "backlog_images": BACKLOG_IMAGES,
        "container_concurrency": PREDICT_CONCURRENCY,
        "bare_seconds": BARE_SECONDS,
        "variants": [s.name for s in specs],
    }
    own = os.sched_getaffinity(0)
    with serving_stack(model_bytes, list(CLASSES)) as (env, config, store, servers):
        s3, bucket = store.objects.s3, config.image_buckets[0]
        ensure_buckets(s3, [CLI_BUCKET])
        stack_pids = list(servers.values())
        variants = [Variant(spec, env, all_cpus) for spec in specs]
        sink_url = [""]
        watcher = ArrivalLog(config).start()
        dispatcher = dispatcher_for(
            config,
            lambda: sink_url[0],
            ordering="unordered",
            max_in_flight=PREDICT_CONCURRENCY,
        )
        try:
            for variant in variants:
                variant.server.__enter__()
                if variant.dispatcher is not None:  # on the stack's CPUs, as the broker
                    stack_pids.append(variant.dispatcher.spawn().pid)
            sink_url[0] = variants[0].server.url
            dispatcher.start()
            args = (stack_pids, sink_url, s3, bucket, watcher)
            for variant in variants:  # warm-up, not counted: threads, connections, arenas
                backlog(variant, "warm", *args, model_bytes, photos)
            for number in range(backlogs):
                for variant in variants:
                    variant.backlogs.append(
                        backlog(
                            variant,
                            number,
                            stack_pids,
                            sink_url,
                            s3,
                            bucket,
                            watcher,
                            model_bytes,
                            photos,
                        )
                    )
                    print(f"  {variant.name} #{number}: {variant.backlogs[-1]}", flush=True)
            for variant in variants:  # one more backlog under the profiler, not counted
                if profile.get(variant.name):
                    backlog(variant, backlogs, *args, model_bytes, photos, profile[variant.name])
            for variant in variants:
                result[variant.name] = summarise(variant)
                stats = variant.server.stats()
                result[variant.name]["peak_rss_mb"] = stats["max_rss_mb"]
                result[variant.name]["batches"] = stats.get("batches")
        finally:
            pin(stack_pids, own)
            dispatcher.stop()
            watcher.stop()
            for variant in variants:
                variant.server.stop()
                if variant.dispatcher is not None:
                    variant.dispatcher.stop()
    return result


def run(out_dir: Path) -> dict:
    result = measure(SPECS)
    iso, shared = result["isolated"], result["shared"]
    batch, queue, cli = result["isolated_batch"], result["isolated_queue"], result["dispatch_cli"]
    result["batching_gain"] = {
        "images_per_s": round(batch["images_per_s"] / iso["images_per_s"], 3),
        "cpu_ms_per_image": round(
            iso["replica_cpu_ms_per_image"] / batch["replica_cpu_ms_per_image"], 3
        ),
    }
    # the queue's cost, from the same run: medians, and backlog by backlog (interleaved)
    pairs = [q["ratio"] / o["ratio"] for q, o in zip(queue["runs"], iso["runs"], strict=True)]
    result["queue_on_over_off"] = {
        "ratio": round(queue["ratio"] / iso["ratio"], 3),
        "cpu_ratio": round(queue["cpu_ratio"] / iso["cpu_ratio"], 3),
        "paired_median": round(statistics.median(pairs), 3),
        "replica_cpu_ms_per_image_more": round(
            queue["replica_cpu_ms_per_image"] - iso["replica_cpu_ms_per_image"], 2
        ),
    }
    result["targets"] = {
        "isolated_ratio_c4>=0.85": iso["ratio"] >= 0.85,
        "queue_on/off>=0.97": result["queue_on_over_off"]["ratio"] >= 0.97,
        "dispatch_cli_defaults_ratio>=0.85": cli["ratio"] >= 0.85,
        "shared_ratio_reported": shared["ratio"] > 0,
        "peak_rss_mb<250": max(v["peak_rss_mb"] for v in (iso, shared)) < 250,
    }
    write_json(out_dir, "isolated", result)
    plot(out_dir, result)
    return result


def summarise(variant: Variant) -> dict:
    runs = variant.backlogs

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "ratio": median("ratio"),
        "cpu_ratio": median("cpu_ratio"),
        "ratio_min": min(r["ratio"] for r in runs),
        "ratio_max": max(r["ratio"] for r in runs),
        "images_per_s": median("images_per_s"),
        "bare_images_per_s": round(
            statistics.median(
                (r["bare_before_images_per_s"] + r["bare_after_images_per_s"]) / 2 for r in runs
            ),
            2,
        ),
        "replica_cpu_ms_per_image": median("replica_cpu_ms_per_image"),
        "bare_cpu_ms_per_image": median("bare_cpu_ms_per_image"),
        "replica_cpus": sorted(variant.replica_cpus),
        "runs": runs,
    }


def plot(out_dir: Path, result: dict) -> None:
    from bench.common import pyplot, save_plot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = result["variants"]
    for i, name in enumerate(names):
        ratios = [r["ratio"] for r in result[name]["runs"]]
        left.scatter([i] * len(ratios), ratios, color="#888", zorder=3)
        left.bar(i, result[name]["ratio"], color="#2a7" if i < 2 else "#c85", alpha=0.7)
    left.axhline(0.85, color="#c55", linestyle="--", label="target 0.85 (isolated)")
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("replica / bare loop (median, dots: backlogs)")
    left.set_title(f"containerConcurrency {result['container_concurrency']}")
    left.legend()
    width = 0.4
    for i, name in enumerate(names):
        right.bar(i - width / 2, result[name]["bare_images_per_s"], width, color="#888")
        right.bar(i + width / 2, result[name]["images_per_s"], width, color="#2a7")
    right.set_xticks(range(len(names)), names)
    right.set_ylabel("images/s (grey: bare loop, green: replica)")
    right.set_title("MobileNetV2 224 float32, 640x480 JPEG backlogs")
    save_plot(fig, out_dir / "isolated.png")


if __name__ == "__main__":
    import json

    print(json.dumps(run(Path(__file__).parent / "results"), indent=2))
