"""Run ``telehealth.cli`` with every garbage-collector pause longer than 5 ms (and every full
collection) logged to stderr, for ``bench/signaling_load.py --gc-trace``.

    python bench/gc_trace_server.py --config CFG serve

Each pause is one line ``GC gen<g> <ms> ms collected=<n> at=<time.monotonic()>``; the monotonic
clock is the machine's, so the benchmark lines the pauses up with its own timeline. With
``BENCH_GC_THRESHOLD=a,b,c`` in the environment the thresholds are set with
``gc.set_threshold(a, b, c)`` first: an experiment on the collector's tuning that changes nothing
in the server's code. It is only for servers older than 0ed36e8: since then `serve` sets the
thresholds itself from ``server.gc_thresholds``, which the benchmark writes into its config."""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
from typing import Any

LOG_OVER_MS = 5.0
_started = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    if info["generation"] == 2 or ms > LOG_OVER_MS:
        print(f"GC gen{info['generation']} {ms:.1f} ms collected={info['collected']} "
              f"at={time.monotonic():.3f}", file=sys.stderr, flush=True)


def main() -> None:
    threshold = os.environ.get("BENCH_GC_THRESHOLD", "")
    if threshold:
        gc.set_threshold(*(int(part) for part in threshold.split(",")))
    gc.callbacks.append(_on_gc)
    sys.argv = ["telehealth.cli", *sys.argv[1:]]
    runpy.run_module("telehealth.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
