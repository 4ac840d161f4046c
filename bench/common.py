"""Timing, memory and output helpers shared by the benchmarks."""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median seconds per call of each case, calling them in turn so drift hits all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device or CPU)
            start = time.perf_counter()
            fn()
            sync(device or CPU)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process on the CPU; peak allocated tensors on CUDA."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def emit(record: Mapping) -> Mapping:
    """Print `record` as one JSON line on stdout, and return it."""
    print(json.dumps(record), flush=True)
    return record


def environment() -> dict:
    """What the figures depend on: torch, threads, device."""
    import diffusers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
    }


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def compared(ours: float, diffusers: float) -> dict:
    """Both times in milliseconds and the headline ratio ours / diffusers."""
    return {"ours_ms": ms(ours), "diffusers_ms": ms(diffusers), "ratio": round(ours / diffusers, 3)}
