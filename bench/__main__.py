"""`make bench`: every benchmark in one run, one report under bench/results/ (JSON and Markdown)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from bench import cda_bench, consent_bench, hub_bench, imaging_bench, registry_bench
from bench.common import Report

BENCHMARKS = {
    "registry": registry_bench.run,
    "consent": consent_bench.run,
    "hub": hub_bench.run,
    "imaging": imaging_bench.run,
    "cda": cda_bench.run,
}


async def main(selected: list[str]) -> None:
    report = Report()
    for name, run in BENCHMARKS.items():
        if selected and name not in selected:
            continue
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        await run(report)
        print(f"== {name} done in {time.perf_counter() - started:.0f}s", flush=True)
    path = report.write("latest")
    print(f"report: {path}")


if __name__ == "__main__":
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the federations started stop with it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(main(sys.argv[1:]))
