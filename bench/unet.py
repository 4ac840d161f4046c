"""UNet forward, ours against diffusers' UNet2DConditionModel with the same weights.

    python bench/unet.py [--config stable-diffusion/v1-inference.yaml] [--sizes 32,64]
        [--batches 1,2] [--dtypes fp32,bf16] [--repeats 3] [--device cpu|cuda] [--compile]

Prints one JSON object per (dtype, batch, latent size): median milliseconds of each and the
ratio ours / diffusers. bf16 and fp16 run under autocast, as `--precision autocast` samples.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench.common import compared, emit, environment, interleaved
from bench.reference import diffusers_unet, model_config, ours_unet

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", default="stable-diffusion/v1-inference.yaml")
    add("--sizes", default="32,64", help="latent sizes (32 = 256 px images, 64 = 512 px)")
    add("--batches", default="1,2")
    add("--dtypes", default="fp32,bf16", help=f"from {list(DTYPES)}; others run under autocast")
    add("--repeats", type=int, default=3)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--compile", action="store_true", help="torch.compile both UNets")
    add("--channels_last", action="store_true", help="run ours in channels-last memory format")
    return parser


def forward_fn(unet, ours: bool, x, t, context, dtype, channels_last: bool = False):
    """A no-grad forward of either UNet under autocast to `dtype` (None: fp32)."""
    autocast = (
        torch.autocast(x.device.type, dtype) if dtype is not None else contextlib.nullcontext()
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    if dtype is not None:  # weights cast once, as the sampling scripts do
        x, context = x.to(dtype), context.to(dtype)

    def run():
        with torch.no_grad(), autocast:
            if ours:
                return unet(x, t, context=context)
            return unet(x, t, encoder_hidden_states=context).sample

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    opt = get_parser().parse_args(argv)
    device = torch.device(opt.device)
    config = model_config(opt.config)
    ours = ours_unet(config).eval()
    theirs = diffusers_unet(config, ours).eval().to(device)
    ours = ours.to(device)
    if opt.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    if opt.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    params = config.params.unet_config.params
    emit({"bench": "unet", "config": opt.config, **environment()})
    results = []
    for dtype_name in opt.dtypes.split(","):
        ours.to(DTYPES[dtype_name] or torch.float32)
        theirs.to(DTYPES[dtype_name] or torch.float32)
        for batch in map(int, opt.batches.split(",")):
            for size in map(int, opt.sizes.split(",")):
                x = torch.randn(batch, params.in_channels, size, size, device=device)
                t = torch.full((batch,), 500, device=device)
                context = torch.randn(batch, 77, params.context_dim, device=device)
                dtype = DTYPES[dtype_name]
                cases = {
                    "ours": forward_fn(ours, True, x, t, context, dtype, opt.channels_last),
                    "diffusers": forward_fn(theirs, False, x, t, context, dtype),
                }
                times = interleaved(cases, opt.repeats, device=device)
                results.append(
                    emit(
                        {
                            "dtype": dtype_name,
                            "batch": batch,
                            "latent": size,
                            **compared(times["ours"], times["diffusers"]),
                            "compile": opt.compile,
                            "channels_last": opt.channels_last,
                        }
                    )
                )
    return results


if __name__ == "__main__":
    main()
