"""A UNet training step (forward, backward, AdamW), ours against diffusers, with peak memory.

    python -m bench.train_step [--cases tiny,sd15] [--checkpointing 0,1] [--repeats 3]
        [--dtype fp32|bf16] [--device cpu|cuda]

Each (implementation, case, checkpointing) runs in its own process, so that peak memory is its
own (RSS on the CPU, max_memory_allocated on CUDA, from just before the first step: weights
and the process's baseline included) and two SD-1.5 optimizers never share the 24 GB. Prints
one JSON object per case and checkpointing setting: median step milliseconds, peak MB, the
MB the steps added to what was resident before them, and the ratios ours / diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import ROOT, compared, emit, environment, interleaved, peak_memory_mb
from bench.reference import diffusers_unet, model_config, ours_unet
from ldm.util import make_optimizer

# name: (config, batch, latent size)
CASES = {
    "tiny": ("tiny/txt2img.yaml", 8, 16),
    "sd15": ("stable-diffusion/v1-inference.yaml", 1, 32),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--cases", default="tiny,sd15", help=f"from {list(CASES)}")
    add("--checkpointing", default="0,1", help="gradient checkpointing off (0) and/or on (1)")
    add("--repeats", type=int, default=3)
    add("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype of the step")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--same_optimizer", action="store_true", help="plain torch.optim.AdamW on both sides")
    add("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    add("--case", help=argparse.SUPPRESS)
    return parser


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count now (Linux: writing 5 to clear_refs resets VmHWM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def proc_status_mb(field: str) -> float:
    """A memory figure of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return peak_memory_mb()


def build(implementation: str, case: str, checkpointing: bool, device: torch.device):
    """(unet, call(x, t, context)) of one implementation for a case, on `device`."""
    config = model_config(CASES[case][0])
    if implementation == "ours":
        unet = ours_unet(config, use_checkpoint=checkpointing).to(device).train()
        return unet, lambda x, t, c: unet(x, t, context=c)
    theirs = diffusers_unet(config, ours_unet(config)).to(device).train()  # ours freed here
    if checkpointing:
        theirs.enable_gradient_checkpointing()
    return theirs, lambda x, t, c: theirs(x, t, encoder_hidden_states=c).sample


def worker(opt) -> dict:
    """Time the steps of one implementation in this process; the parent compares."""
    device = torch.device(opt.device)
    checkpointing = opt.checkpointing == "1"
    unet, call = build(opt.worker, opt.case, checkpointing, device)
    _, batch, size = CASES[opt.case]
    params = model_config(CASES[opt.case][0]).params.unet_config.params
    x = torch.randn(batch, params.in_channels, size, size, device=device)
    target, t = torch.randn_like(x), torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, params.context_dim, device=device)
    # Each side's training default: ours make_optimizer's (fused AdamW), diffusers' training
    # scripts' torch.optim.AdamW (per-tensor); --same_optimizer gives both the latter.
    weights = list(unet.parameters())
    if opt.worker == "ours" and not opt.same_optimizer:
        optimizer = make_optimizer(None, weights, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(weights, lr=1e-5)
    dtype = DTYPES[opt.dtype]
    autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()

    def step():
        with autocast:
            loss = F.mse_loss(call(x, t, context).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    before = proc_status_mb("VmRSS") if before is None else before
    seconds = interleaved({"step": step}, opt.repeats, device=device)["step"]
    peak = peak_memory_mb(device) if device.type == "cuda" else proc_status_mb("VmHWM")
    return {"step_s": seconds, "peak_mb": peak, "added_mb": peak - before}


def run_worker(opt, implementation: str, case: str, checkpointing: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.train_step",
        "--worker",
        implementation,
        "--case",
        case,
        "--checkpointing",
        checkpointing,
        "--repeats",
        str(opt.repeats),
        "--dtype",
        opt.dtype,
        "--device",
        opt.device,
        *(["--same_optimizer"] if opt.same_optimizer else []),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} {case} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    opt = get_parser().parse_args(argv)
    if opt.worker:
        emit(worker(opt))
        return []
    optimizers = "same (AdamW)" if opt.same_optimizer else "ours: fused AdamW, diffusers: AdamW"
    emit({"bench": "train_step", "dtype": opt.dtype, "optimizers": optimizers, **environment()})
    results = []
    for case in opt.cases.split(","):
        for checkpointing in opt.checkpointing.split(","):
            ours, theirs = (run_worker(opt, i, case, checkpointing) for i in ("ours", "diffusers"))
            results.append(
                emit(
                    {
                        "case": case,
                        "batch": CASES[case][1],
                        "latent": CASES[case][2],
                        "checkpointing": checkpointing == "1",
                        **compared(ours["step_s"], theirs["step_s"]),
                        "ours_peak_mb": round(ours["peak_mb"]),
                        "diffusers_peak_mb": round(theirs["peak_mb"]),
                        "memory_ratio": round(ours["peak_mb"] / theirs["peak_mb"], 3),
                        "ours_added_mb": round(ours["added_mb"]),
                        "diffusers_added_mb": round(theirs["added_mb"]),
                    }
                )
            )
    return results


if __name__ == "__main__":
    main()
