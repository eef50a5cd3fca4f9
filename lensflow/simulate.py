"""A drone fleet load generator: synthetic aerial photos uploaded at a planned rate.

``N`` drones share an aggregate rate of ``R`` images per second; bursts multiply it for a
while (``10:20:20``: ten times the rate from t=20 s for 20 s). The schedule is fixed in
advance (evenly spaced uploads, so a plan always makes the same number), and upload ``k``
belongs to drone ``k % N``; each drone is a thread that uploads its own photos in order,
catching up at once when it falls behind.

Every upload is what a drone does against MinIO: one PUT of the JPEG into the image
bucket (``lensflow.upload.upload_file``); the bucket's notification announces it. A
``labelled_fraction`` of the photos are also stored under ``labeled/<class>/`` in the
train bucket (a bucket of its own, so no event), so the next training round has new data.

Photos are rendered before the clock starts (``pool_size`` deterministic scenes, random
classes), so rendering never limits the rate.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from lensflow.scenes import CLASSES, scene_jpeg
from lensflow.upload import upload_file
from lensflow_core.settings import Config


@dataclass(frozen=True)
class Burst:
    factor: float
    start_s: float
    length_s: float

    @classmethod
    def parse(cls, text: str) -> Burst:
        """``FACTOR:START:LENGTH``, e.g. ``10:20:20``."""
        try:
            factor, start, length = (float(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(
                f"a burst is FACTOR:START:LENGTH (like 10:20:20), not {text!r}"
            ) from None
        if factor <= 0 or start < 0 or length <= 0:
            raise ValueError(f"burst {text!r}: factor and length must be > 0, start >= 0")
        return cls(factor, start, length)

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.length_s


@dataclass(frozen=True)
class Plan:
    drones: int = 4
    rate: float = 5.0  # images per second, all drones together, outside bursts
    duration_s: float = 60.0
    bursts: tuple[Burst, ...] = ()
    labelled_fraction: float = 0.1
    size: tuple[int, int] = (640, 480)
    seed: int = 0
    pool_size: int = 60
    prefix: str = "drones"

    def __post_init__(self) -> None:
        if self.drones < 1 or self.rate <= 0 or self.duration_s <= 0 or self.pool_size < 1:
            raise ValueError("drones, rate, duration and pool size must be positive")
        if not 0 <= self.labelled_fraction <= 1:
            raise ValueError("the labelled fraction is between 0 and 1")

    def rate_at(self, t: float) -> float:
        rate = self.rate
        for burst in self.bursts:
            if burst.active(t):
                rate *= burst.factor
        return rate

    def schedule(self) -> list[float]:
        """Send times (seconds from the start) of every upload: evenly spaced at the rate
        in force, so the count is the integral of the rate over the duration."""
        edges = sorted(
            {
                0.0,
                self.duration_s,
                *(
                    t
                    for b in self.bursts
                    for t in (b.start_s, b.start_s + b.length_s)
                    if 0 < t < self.duration_s
                ),
            }
        )
        times: list[float] = []
        done = 0.0  # uploads owed by the start of the segment (the rate's integral)
        for start, end in zip(edges, edges[1:], strict=False):
            rate = self.rate_at(start)
            owed = done + (end - start) * rate
            while len(times) < owed - 1e-9:
                times.append(start + (len(times) - done) / rate)
            done = owed
        return times


@dataclass
class Photo:
    cls: str
    jpeg: bytes


def render_pool(plan: Plan) -> list[Photo]:
    """``pool_size`` photos of random classes, deterministic in the plan's seed."""
    rng = random.Random(plan.seed)
    jobs = [(rng.choice(CLASSES), plan.seed * 1_000_000 + i) for i in range(plan.pool_size)]
    with ThreadPoolExecutor(4) as pool:  # Pillow releases the GIL while encoding
        blobs = pool.map(lambda job: scene_jpeg(job[0], job[1], plan.size), jobs)
        return [Photo(cls, blob) for (cls, _), blob in zip(jobs, blobs, strict=True)]


@dataclass
class Progress:
    planned: int
    uploaded: int = 0
    labelled: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str | None = None
    elapsed_s: float = 0.0
    per_drone: list[int] = field(default_factory=list)
    max_behind_s: float = 0.0  # how late the latest upload was against the schedule


@dataclass
class Result:
    plan: dict[str, Any]
    planned: int
    uploaded: int
    labelled: int
    errors: int
    last_error: str | None
    bytes: int
    duration_s: float
    rate: float
    peak_planned_rate: float
    max_behind_s: float
    per_drone: list[int]
    per_class: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Simulator:
    """Runs one ``Plan`` against ``config``'s image bucket and images topic."""

    def __init__(self, config: Config, plan: Plan, *, s3=None):
        from lensflow_core.s3 import s3_client

        self.config = config
        self.plan = plan
        self.s3 = s3 or s3_client(config)
        self.photos: list[Photo] = []
        self.progress = Progress(0, per_drone=[0] * plan.drones)
        self._lock = threading.Lock()
        self._per_class: dict[str, int] = {}
        self.uploaded_at: dict[str, float] = {}  # "<bucket>/<key>" -> when its PUT completed

    def prepare(self) -> Simulator:
        if not self.photos:
            self.photos = render_pool(self.plan)
        return self

    def run(
        self,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Result:
        """Fly the plan (until it ends or ``stop`` is set)."""
        self.prepare()
        stop = stop or threading.Event()
        times = self.schedule = self.plan.schedule()
        self.progress.planned = len(times)
        labelled = random.Random(self.plan.seed + 1)
        flags = [labelled.random() < self.plan.labelled_fraction for _ in times]
        picks = random.Random(self.plan.seed + 2)
        photos = [picks.randrange(len(self.photos)) for _ in times]
        start = time.monotonic()
        drones = [
            threading.Thread(
                target=self._fly,
                name=f"drone-{d}",
                daemon=True,
                args=(d, start, times, photos, flags, stop),
            )
            for d in range(self.plan.drones)
        ]
        for drone in drones:
            drone.start()
        while any(d.is_alive() for d in drones):
            for drone in drones:
                drone.join(0.1)
            self.progress.elapsed_s = time.monotonic() - start
            if on_progress is not None:
                on_progress(self.progress)
        elapsed = time.monotonic() - start
        self.progress.elapsed_s = elapsed
        if on_progress is not None:
            on_progress(self.progress)
        p = self.progress
        return Result(
            plan={**asdict(self.plan), "bursts": [asdict(b) for b in self.plan.bursts]},
            planned=p.planned,
            uploaded=p.uploaded,
            labelled=p.labelled,
            errors=p.errors,
            last_error=p.last_error,
            bytes=p.bytes,
            duration_s=round(elapsed, 3),
            rate=round(p.uploaded / elapsed, 2) if elapsed else 0.0,
            peak_planned_rate=max((self.plan.rate_at(t) for t in times), default=0.0),
            max_behind_s=round(p.max_behind_s, 3),
            per_drone=list(p.per_drone),
            per_class=dict(sorted(self._per_class.items())),
        )

    def _fly(
        self,
        drone: int,
        start: float,
        times: list[float],
        photos: list[int],
        flags: list[bool],
        stop: threading.Event,
    ) -> None:
        for k in range(drone, len(times), self.plan.drones):
            late = time.monotonic() - start - times[k]
            if late < 0 and stop.wait(-late):
                return
            if stop.is_set():
                return
            self._upload(drone, k, self.photos[photos[k]], flags[k], max(late, 0.0))

    def _upload(self, drone: int, k: int, photo: Photo, labelled: bool, late: float) -> None:
        bucket = self.config.image_buckets[0]
        key = f"{self.plan.prefix}/drone-{drone:02d}/{self.plan.seed}-{k:06d}.jpg"
        try:
            upload_file(
                self.s3,
                bucket,
                key,
                photo.jpeg,
                "image/jpeg",
                {"drone": str(drone), "class": photo.cls},
            )
            self.uploaded_at[f"{bucket}/{key}"] = time.time()
            if labelled:
                upload_file(
                    self.s3,
                    self.config.train_bucket,
                    f"labeled/{photo.cls}/{self.plan.prefix}-{self.plan.seed}-{k:06d}.jpg",
                    photo.jpeg,
                    "image/jpeg",
                )
        except Exception as exc:  # a drone keeps flying; the count says it
            with self._lock:
                self.progress.errors += 1
                self.progress.last_error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            p = self.progress
            p.uploaded += 1
            p.labelled += labelled
            p.bytes += len(photo.jpeg)
            p.per_drone[drone] += 1
            p.max_behind_s = max(p.max_behind_s, late)
            self._per_class[photo.cls] = self._per_class.get(photo.cls, 0) + 1
