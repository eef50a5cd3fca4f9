"""Simulate Knative's KPA scaling the predict service through a bursty drone trace.

Inputs: one replica's throughput (images/s) and latency at each concurrency, read from
``bench/results/predict.json`` (keys ``http_c<N>_images_per_s``, ``latency_p50_ms_c<N>``).
If that file is absent the simulation runs on clearly labelled FALLBACK numbers.

The model, one step every 0.1 s (a fluid approximation: images are not discrete):

- Drones upload at ``base_rate`` images/s, 10x that for 20 s; records wait in Kafka.
- The KafkaSource dispatcher (``ordering: unordered``) keeps up to ``dispatcher_in_flight``
  requests outstanding. A request is served by a ready replica (at most
  ``containerConcurrency`` each) or waits in the activator / queue-proxy; either way it
  counts as concurrency for the autoscaler, as in Knative.
- A replica with k requests in flight completes ``throughput(k)`` images/s (measured).
- Every 2 s the autoscaler averages concurrency over the stable window (60 s) and the
  panic window (6 s) and wants ``ceil(avg / (target x utilization))`` replicas. It panics
  when the panic-window demand is >= 200% of the ready replicas, and then never scales
  down until 60 s pass without that condition. Scale-down is at most 2x per tick.
- At zero, the activator buffers requests and asks for a replica at once; a replica is
  ready ``pod_start_s`` after it is requested. With no traffic for a stable window the
  last replica goes after max(scale-to-zero grace period, pod retention period).

    .venv/bin/python -m bench.knative_autoscaler   # writes bench/results/knative_autoscaler.*
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import pyplot, save_plot

RESULTS = Path(__file__).resolve().parent / "results"
DT = 0.1

# Used only when bench/results/predict.json does not exist. NOT MEASURED: a guess for a
# 2-vCPU replica running a MobileNet-class LiteRT model (S3 GET + decode + invoke + produce).
FALLBACK_THROUGHPUT = {1: 12.0, 2: 21.0, 4: 22.5, 8: 22.5}
FALLBACK_LATENCY_MS = {1: 83.0, 2: 95.0, 4: 178.0, 8: 356.0}


@dataclass(frozen=True)
class ReplicaProfile:
    throughput: dict[int, float]  # concurrency -> images/s of one replica
    latency_ms: dict[int, float]  # concurrency -> p50 latency (ms)
    source: str
    measured: bool

    def rate(self, k: float) -> float:
        """Images/s of one replica with k requests in flight (linear between measurements)."""
        xs = [0.0, *sorted(self.throughput)]
        ys = [0.0, *(self.throughput[c] for c in sorted(self.throughput))]
        return float(np.interp(k, xs, ys))

    def in_flight_for(self, rate: float, cap: int) -> float:
        """Requests in flight on one replica to sustain ``rate`` images/s (at most ``cap``)."""
        ks = np.linspace(0.0, cap, 401)
        rates = np.array([self.rate(k) for k in ks])
        return float(ks[min(int(np.searchsorted(rates, rate - 1e-9)), len(ks) - 1)])

    def service_s(self, k: float) -> float:
        """One request's latency at k in flight (Little's law: k / throughput(k))."""
        return max(1.0, k) / self.rate(max(1.0, k))

    def saturation(self, fraction: float = 0.9) -> int:
        """Smallest measured concurrency reaching ``fraction`` of the best throughput."""
        best = max(self.throughput.values())
        return min(c for c, x in self.throughput.items() if x >= fraction * best)


def load_replica(path: Path = RESULTS / "predict.json") -> ReplicaProfile:
    if not path.exists():
        return ReplicaProfile(
            FALLBACK_THROUGHPUT,
            FALLBACK_LATENCY_MS,
            source=f"FALLBACK numbers (not measured): {path.name} absent",
            measured=False,
        )
    data = json.loads(path.read_text())
    thr = {
        int(m[1]): float(v)
        for k, v in data.items()
        if (m := re.fullmatch(r"http_c(\d+)_images_per_s", k))
    }
    lat = {
        int(m[1]): float(v)
        for k, v in data.items()
        if (m := re.fullmatch(r"latency_p50_ms_c(\d+)", k))
    }
    if not thr:
        raise ValueError(f"{path} has no http_c<N>_images_per_s keys")
    return ReplicaProfile(thr, lat, source=str(path), measured=True)


@dataclass(frozen=True)
class Trace:
    base_rate: float = 6.0  # images/s, e.g. 30 drones x one photo every 5 s
    burst_factor: float = 10.0
    start_s: float = 30.0  # the service is at zero until the first sortie
    burst_start_s: float = 150.0
    burst_s: float = 20.0
    stop_s: float = 330.0  # the drones land
    duration_s: float = 540.0

    def rate(self, t: float) -> float:
        if not self.start_s <= t < self.stop_s:
            return 0.0
        in_burst = self.burst_start_s <= t < self.burst_start_s + self.burst_s
        return self.base_rate * (self.burst_factor if in_burst else 1.0)


PREDICT_SERVICE = Path(__file__).resolve().parents[1] / "knative" / "base" / "predict-service.yaml"


def manifest_template(path: Path = PREDICT_SERVICE) -> dict[str, Any]:
    """The predict Service's revision template: the simulation runs what is deployed."""
    return yaml.safe_load(path.read_text())["spec"]["template"]


def manifest_max_scale(path: Path = PREDICT_SERVICE) -> int:
    annotations = manifest_template(path)["metadata"]["annotations"]
    return int(annotations["autoscaling.knative.dev/max-scale"])


def manifest_container_concurrency(path: Path = PREDICT_SERVICE) -> int:
    return int(manifest_template(path)["spec"]["containerConcurrency"])


def manifest_target(path: Path = PREDICT_SERVICE) -> float:
    annotations = manifest_template(path)["metadata"]["annotations"]
    return float(annotations["autoscaling.knative.dev/target"])


@dataclass(frozen=True)
class Kpa:
    container_concurrency: int = field(default_factory=manifest_container_concurrency)
    target: float = field(default_factory=manifest_target)
    utilization: float = 0.7
    max_scale: int = field(default_factory=manifest_max_scale)  # see max_scale_sweep
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # 200%
    tick_s: float = 2.0
    max_scale_down_rate: float = 2.0
    scale_to_zero_grace_s: float = 30.0
    retention_s: float = 120.0  # scale-to-zero-pod-retention-period
    pod_start_s: float = 5.0
    # Assumption: an unordered KafkaSource consumer keeps about max.poll.records in flight.
    dispatcher_in_flight: int = 50


@dataclass
class State:
    lag: float = 0.0  # records in Kafka not yet dispatched
    outstanding: float = 0.0  # dispatched, not yet answered: at replicas or buffered
    pods: list[float] = field(default_factory=list)  # ready-at time per replica
    desired: int = 0
    panic_since: float | None = None
    zero_since: float | None = None

    def ready(self, t: float) -> int:
        return sum(1 for r in self.pods if r <= t)


def autoscale(kpa: Kpa, s: State, t: float, samples: list[float]) -> None:
    """One KPA tick: decide ``s.desired`` and add or remove replicas."""
    per_step = int(round(1 / DT))
    stable = float(np.mean(samples[-int(kpa.stable_window_s * per_step) :]))
    panic = float(np.mean(samples[-int(kpa.panic_window_s * per_step) :]))
    eff_target = kpa.target * kpa.utilization
    want_stable = math.ceil(stable / eff_target - 1e-9)
    want_panic = math.ceil(panic / eff_target - 1e-9)
    ready = max(1, s.ready(t))
    if panic / eff_target / ready >= kpa.panic_threshold:
        s.panic_since = t if s.panic_since is None else s.panic_since
        panic_fresh = t
    else:
        panic_fresh = None
    if (
        s.panic_since is not None
        and panic_fresh is None
        and t - s.panic_since >= kpa.stable_window_s
    ):
        s.panic_since = None
    if s.panic_since is not None:
        if panic_fresh is not None:
            s.panic_since = t  # the panic window is extended while the condition holds
        desired = max(want_panic, s.desired)
    else:
        desired = want_stable
    floor = math.floor(len(s.pods) / kpa.max_scale_down_rate)  # at most halve per tick
    desired = min(kpa.max_scale, max(desired, floor))
    if desired == 0 and s.pods:  # scale to zero only after grace/retention
        s.zero_since = t if s.zero_since is None else s.zero_since
        if t - s.zero_since < max(kpa.scale_to_zero_grace_s, kpa.retention_s):
            desired = 1
    else:
        s.zero_since = None
    s.desired = desired
    resize(kpa, s, t, desired)


def resize(kpa: Kpa, s: State, t: float, n: int) -> None:
    s.pods.sort()
    if n > len(s.pods):
        s.pods += [t + kpa.pod_start_s] * (n - len(s.pods))
    else:
        del s.pods[n:]  # not-yet-ready replicas go first (they sort last)


def simulate(replica: ReplicaProfile, kpa: Kpa, trace: Trace) -> dict[str, Any]:
    s = State()
    samples: list[float] = []
    steps = int(trace.duration_s / DT)
    rows = {
        k: np.zeros(steps)
        for k in (
            "t",
            "rate",
            "arrived",
            "done",
            "lag",
            "outstanding",
            "ready",
            "pods",
            "panic",
            "service",
        )
    }
    arrived = done = 0.0
    next_tick = 0.0
    for i in range(steps):
        t = i * DT
        incoming = trace.rate(t) * DT
        arrived += incoming
        s.lag += incoming
        push = min(s.lag, max(0.0, kpa.dispatcher_in_flight - s.outstanding))
        s.lag -= push
        s.outstanding += push
        if s.outstanding > 1e-9 and not s.pods:  # the activator wakes the revision at once
            s.desired = 1
            resize(kpa, s, t, 1)
        ready = s.ready(t)
        in_flight = service = 0.0
        if ready:
            capacity = ready * replica.rate(kpa.container_concurrency)  # every slot busy
            served = min(s.outstanding, capacity * DT)
            s.outstanding -= served
            done += served
            k = replica.in_flight_for(served / DT / ready, kpa.container_concurrency)
            in_flight, service = ready * k, replica.service_s(k)
        # What queue-proxies and the activator report: requests being served + waiting.
        samples.append(s.outstanding + in_flight)
        if t >= next_tick:
            autoscale(kpa, s, t, samples)
            next_tick += kpa.tick_s
        for key, value in (
            ("t", t),
            ("rate", trace.rate(t)),
            ("arrived", arrived),
            ("done", done),
            ("lag", s.lag),
            ("outstanding", s.outstanding),
            ("ready", s.ready(t)),
            ("pods", len(s.pods)),
            ("panic", s.panic_since is not None),
            ("service", service),
        ):
            rows[key][i] = value
    return summarize(rows, kpa, trace) | {"series": rows}


def summarize(rows: dict[str, np.ndarray], kpa: Kpa, trace: Trace) -> dict[str, Any]:
    """Latency of image n = (time the n-th image is served - time it arrived) + its service time."""
    total = rows["arrived"][-1]
    n = np.linspace(0.5, rows["done"][-1] - 0.5, 4000)
    t_out = np.interp(n, rows["done"], rows["t"])
    wait = t_out - np.interp(n, rows["arrived"], rows["t"])
    wait += rows["service"][np.minimum((t_out / DT).astype(int), len(rows["t"]) - 1)]
    after = rows["t"] >= trace.stop_s
    zero_at = rows["t"][after][rows["pods"][after] == 0]
    return {
        "images": round(float(total), 1),
        "unfinished": round(max(0.0, float(total - rows["done"][-1])), 1),
        "latency_p50_s": round(float(np.percentile(wait, 50)), 2),
        "latency_p95_s": round(float(np.percentile(wait, 95)), 2),
        "latency_max_s": round(float(wait.max()), 2),
        "max_backlog": round(float((rows["lag"] + rows["outstanding"]).max()), 1),
        "max_replicas": int(rows["pods"].max()),
        "replica_seconds": round(float(rows["pods"].sum() * DT), 1),
        "panic_seconds": round(float(rows["panic"].sum() * DT), 1),
        "zero_after_stop_s": round(float(zero_at[0] - trace.stop_s), 1) if len(zero_at) else None,
    }


def candidates(replica: ReplicaProfile, base: Kpa) -> list[Kpa]:
    ccs = sorted(set(replica.throughput) | {replica.saturation()})
    return [replace(base, container_concurrency=c, target=float(c)) for c in ccs]


def recommend(
    replica: ReplicaProfile, results: list[dict[str, Any]], slo_p95_s: float
) -> dict[str, Any]:
    """containerConcurrency = where one replica saturates (more in flight adds latency, not
    throughput); target = containerConcurrency. The simulation then checks the burst SLO."""
    cc = replica.saturation()
    chosen = next(r for r in results if r["kpa"]["container_concurrency"] == cc)
    return {
        "containerConcurrency": cc,
        "target": chosen["kpa"]["target"],
        "target_utilization_percentage": round(chosen["kpa"]["utilization"] * 100),
        "rule": "smallest measured concurrency reaching 90% of the best per-replica throughput",
        "littles_law_concurrency": {
            c: round(replica.throughput[c] * replica.latency_ms[c] / 1000, 2)
            for c in sorted(replica.throughput)
            if c in replica.latency_ms
        },
        "slo_p95_s": slo_p95_s,
        "meets_slo": chosen["latency_p95_s"] <= slo_p95_s and chosen["unfinished"] < 1,
    }


def plot(result: dict[str, Any], title: str, path: Path) -> None:
    plt = pyplot()

    s = result["series"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax1.plot(s["t"], s["rate"], label="uploads (images/s)")
    ax1.plot(s["t"][1:], np.diff(s["done"]) / DT, label="predicted (images/s)", alpha=0.8)
    ax1.set_ylabel("images/s")
    ax1.legend(loc="upper right")
    ax2.step(s["t"], s["pods"], where="post", label="replicas (requested)")
    ax2.step(s["t"], s["ready"], where="post", label="replicas (ready)")
    ax2.fill_between(
        s["t"], 0, s["panic"] * max(1, s["pods"].max()), alpha=0.15, color="red", label="panic mode"
    )
    ax2.set_ylabel("replicas")
    ax2.legend(loc="upper right")
    ax3.plot(s["t"], s["lag"] + s["outstanding"], label="backlog (Kafka lag + in flight)")
    ax3.plot(s["t"], s["outstanding"], label="in flight / buffered (autoscaler metric)", alpha=0.8)
    ax3.set_ylabel("images")
    ax3.set_xlabel("time (s)")
    ax3.legend(loc="upper right")
    fig.suptitle(title, fontsize=10)
    save_plot(fig, path, dpi=110)


def run(out_dir: Path | str = RESULTS, slo_p95_s: float = 5.0) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    measured = out / "predict.json"
    replica = load_replica(measured if measured.exists() else RESULTS / "predict.json")
    trace, base = Trace(), Kpa()
    results = [{"kpa": asdict(k)} | simulate(replica, k, trace) for k in candidates(replica, base)]
    rec = recommend(replica, results, slo_p95_s)
    chosen = next(
        r for r in results if r["kpa"]["container_concurrency"] == rec["containerConcurrency"]
    )
    chosen_kpa = Kpa(**chosen["kpa"])
    cold = {
        f"pod_start_{p:g}s": simulate(replica, replace(chosen_kpa, pod_start_s=p), trace)
        for p in (2.0, 5.0, 10.0, 20.0)
    }
    # max-scale: the fewest replicas that still meet the SLO through the burst
    sweep = {
        m: simulate(replica, replace(chosen_kpa, max_scale=m), trace)
        for m in (2, 3, 4, 5, 6, 8, 10, 20)
    }
    fits = [m for m, r in sweep.items() if r["latency_p95_s"] <= slo_p95_s and r["unfinished"] < 1]
    rec["max_scale_meeting_slo"] = min(fits) if fits else None
    # ordering: ordered allows one event in flight per partition (6 for topic `images`)
    ordered = simulate(replica, replace(chosen_kpa, dispatcher_in_flight=6), trace)
    label = "measured" if replica.measured else "FALLBACK numbers, not measured"
    plot(
        chosen,
        f"KPA, containerConcurrency={rec['containerConcurrency']}, target={rec['target']:g}, "
        f"base {trace.base_rate:g}/s, {trace.burst_factor:g}x burst for {trace.burst_s:g} s ({label})",
        out / "knative_autoscaler.png",
    )
    report = {
        "inputs": {
            "source": replica.source,
            "measured": replica.measured,
            "throughput_images_per_s": replica.throughput,
            "latency_p50_ms": replica.latency_ms,
        },
        "trace": asdict(trace),
        "candidates": [{k: v for k, v in r.items() if k != "series"} for r in results],
        "recommendation": rec,
        "pod_start_sensitivity": {
            k: {m: v for m, v in r.items() if m != "series"} for k, r in cold.items()
        },
        "max_scale_sweep": {
            str(m): {k: v for k, v in r.items() if k != "series"} for m, r in sweep.items()
        },
        "ordered_6_partitions": {k: v for k, v in ordered.items() if k != "series"},
        "plot": "knative_autoscaler.png",
    }
    (out / "knative_autoscaler.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> int:
    report = run()
    print(f"inputs: {report['inputs']['source']}")
    print(
        f"{'cc':>3} {'target':>6} {'p50 s':>6} {'p95 s':>6} {'max s':>6} {'backlog':>8} "
        f"{'max rep':>7} {'rep-s':>7} {'zero after':>10}"
    )
    for r in report["candidates"]:
        print(
            f"{r['kpa']['container_concurrency']:>3} {r['kpa']['target']:>6g} {r['latency_p50_s']:>6} "
            f"{r['latency_p95_s']:>6} {r['latency_max_s']:>6} {r['max_backlog']:>8} "
            f"{r['max_replicas']:>7} {r['replica_seconds']:>7} {r['zero_after_stop_s']!s:>10}"
        )
    print("recommendation:", json.dumps(report["recommendation"]))
    for m, r in report["max_scale_sweep"].items():
        print(
            f"max-scale {m:>2}: p95 {r['latency_p95_s']} s, max {r['latency_max_s']} s, "
            f"replica-s {r['replica_seconds']}, max backlog {r['max_backlog']}"
        )
    o = report["ordered_6_partitions"]
    print(
        f"ordering=ordered (6 in flight): p95 {o['latency_p95_s']} s, max {o['latency_max_s']} s, "
        f"backlog {o['max_backlog']}, max replicas {o['max_replicas']}"
    )
    for name, r in report["pod_start_sensitivity"].items():
        print(
            f"{name}: p95 {r['latency_p95_s']} s, max {r['latency_max_s']} s, backlog {r['max_backlog']}"
        )
    print(f"wrote {RESULTS / 'knative_autoscaler.json'} and knative_autoscaler.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
