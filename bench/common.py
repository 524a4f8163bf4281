"""Timing helpers and the report every benchmark appends to (bench/results/)."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Figure:
    benchmark: str
    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        ratio = f"  ({figure.ratio:.2f}× {figure.baseline_name})" if figure.ratio is not None else ""
        print(f"  {figure.name:<52} {figure.value:>12.2f} {figure.unit:<10}{ratio}", flush=True)

    def write(self, stem: str = "latest") -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        machine = {"python": platform.python_version(), "system": platform.platform(), "cpus": _cpus()}
        data = {
            "started": self.started,
            "machine": machine,
            "figures": [asdict(f) | {"ratio": f.ratio} for f in self.figures],
        }
        (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
        lines = [
            f"# Benchmark results ({self.started})",
            "",
            "Machine: {system}, {cpus} CPUs, Python {python}".format(**machine),
            "",
            "| benchmark | figure | value | unit | baseline (same run) | ratio |",
            "|---|---|---:|---|---|---:|",
        ]
        for f in self.figures:
            baseline = f"{f.baseline_name}: {f.baseline_value:.2f}" if f.baseline_value is not None else ""
            ratio = f"{f.ratio:.2f}×" if f.ratio is not None else ""
            lines.append(f"| {f.benchmark} | {f.name} | {f.value:.2f} | {f.unit} | {baseline} | {ratio} |")
        path = RESULTS / f"{stem}.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Timing:
    count: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else float("nan")

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies) * 1000 if self.latencies else float("nan")


async def run_concurrently(
    operation: Callable[[int], Awaitable[None]], count: int, concurrency: int
) -> Timing:
    """Run ``operation(i)`` for i in range(count) with ``concurrency`` workers; time each call."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            await operation(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Timing(count, time.perf_counter() - started, latencies)
