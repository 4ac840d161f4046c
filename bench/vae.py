"""Autoencoder encode and decode, ours against diffusers' AutoencoderKL with the same weights.

    python -m bench.vae [--config stable-diffusion/v1-inference.yaml] [--size 256]
        [--batch 1] [--dtypes fp32,bf16] [--repeats 3] [--device cpu|cuda]

Prints one JSON object per (dtype, direction): median milliseconds and the ratio ours / diffusers.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import compared, emit, environment, interleaved
from bench.reference import diffusers_vae, model_config, ours_vae
from bench.unet import DTYPES


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default="stable-diffusion/v1-inference.yaml")
    add("--size", type=int, default=256, help="image size in pixels")
    add("--batch", type=int, default=1)
    add("--dtypes", default="fp32,bf16", help=f"from {list(DTYPES)}; others run under autocast")
    add("--repeats", type=int, default=3)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def timed(fn, dtype, device: torch.device):
    """`fn` under no_grad and, for a dtype, autocast."""

    def run():
        autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return fn()

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    opt = get_parser().parse_args(argv)
    device = torch.device(opt.device)
    config = model_config(opt.config)
    ours = ours_vae(config)
    theirs = diffusers_vae(config, ours).to(device)
    ours = ours.to(device)
    x = torch.rand(opt.batch, 3, opt.size, opt.size, device=device) * 2 - 1
    z = torch.randn(opt.batch, ours.embed_dim, opt.size // 8, opt.size // 8, device=device)
    emit({"bench": "vae", "config": opt.config, "size": opt.size, **environment()})
    results = []
    for dtype_name in opt.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        directions = {
            "encode": {
                "ours": lambda: ours.encode(x).mean,
                "diffusers": lambda: theirs.encode(x).latent_dist.mean,
            },
            "decode": {
                "ours": lambda: ours.decode(z),
                "diffusers": lambda: theirs.decode(z).sample,
            },
        }
        for direction, fns in directions.items():
            cases = {name: timed(fn, dtype, device) for name, fn in fns.items()}
            times = interleaved(cases, opt.repeats, device=device)
            results.append(
                emit(
                    {
                        "dtype": dtype_name,
                        "direction": direction,
                        "batch": opt.batch,
                        **compared(times["ours"], times["diffusers"]),
                    }
                )
            )
    return results


if __name__ == "__main__":
    main()
