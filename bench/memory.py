"""Memory per GPU of SD 1.5 training at 512 px, computed from sizes measured on the CPU.

    python bench/memory.py [--batch 1 4] [--gpus 8]      # JSON lines on stdout

No GPU is needed: the models are built on the `meta` device, where shapes are real and nothing
is allocated. Parameter and optimizer sizes are counted; activations are what autograd saves
for backward in one training forward (`p_losses` on 64 x 64 x 4 latents, 77 context tokens),
recorded by a saved-tensors hook, with attention counted as a flash / memory-efficient kernel
saves it (q, k, v, output and the log-sum-exp, not the N x N weights the meta device's math
path would keep). Not counted: the CUDA context and kernels (about 0.5 GiB), the allocator's
fragmentation, and transient buffers inside a kernel; so read the totals as lower bounds.

Per GPU, for full fine-tuning (UNet trained, text encoder and autoencoder frozen) and LoRA
(configs/stable-diffusion/lora.yaml: UNet and text-encoder adapters), with fp32 weights and
optimizer state (as Lightning keeps them under `16-mixed` too) and activations traced in fp32
or in 16 bit ("16-bit": what `16-mixed` / `bf16-mixed` autocast keeps of conv and linear
inputs; autocast keeps the norms' inputs in fp32, so a mixed run lies between the two):
- DDP: everything whole on each GPU, plus its gradient buckets (a second copy of the gradients).
- DDP + CPU EMA (`ema_device: cpu`): the same without the EMA copy.
- FSDP (FULL_SHARD over --gpus): the UNet's weights and the gradients and AdamW state divided by
  the GPU count, plus the largest UNet block gathered whole; the text encoder and autoencoder
  stay whole (ldm's FSDP leaves frozen stages out of the sharding; the LoRA adapters of the
  text encoder are counted with it); with or without the EMA, which FSDP keeps in pieces like
  the weights (ldm.sharded_ema; refused for LoRA adapters under FSDP).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

CONFIGS = ROOT / "configs" / "stable-diffusion"
GIB = 2**30
LATENT, CONTEXT = (4, 64, 64), (77, 768)  # 512 px through the f = 8 autoencoder; CLIP ViT-L


class FlashAttention(torch.autograd.Function):
    """scaled_dot_product_attention that saves what a flash kernel keeps for backward (the
    meta trace only counts what forward saves, so it has no backward)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


@contextmanager
def flash_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: FlashAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def build(lora: bool, checkpointing: bool) -> torch.nn.Module:
    configs = [CONFIGS / "v1-finetune.yaml", *([CONFIGS / "lora.yaml"] if lora else [])]
    config = OmegaConf.merge(*(OmegaConf.load(c) for c in configs)).model
    config.params.unet_config.params.use_checkpoint = checkpointing
    with torch.device("meta"):
        return instantiate_from_config(config)


def saved_bytes(model, batch: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes autograd saves in one training forward, the most any one UNet block saves)."""
    params = {id(p) for p in model.parameters()}
    per_block: list[int] = []
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if id(t._base if t._base is not None else t) not in params:
            total += t.numel() * t.element_size()
        return t

    def start(*_):
        per_block.append(total)

    def end(*_):
        per_block.append(total - per_block.pop())

    blocks = [m for m in model.model.modules() if isinstance(m, TimestepEmbedSequential)]
    hooks = [
        h
        for b in blocks
        for h in (b.register_forward_pre_hook(start), b.register_forward_hook(end))
    ]
    with torch.device("meta"):
        x0, cond = (
            torch.randn(batch, *LATENT, dtype=dtype),
            torch.randn(batch, *CONTEXT, dtype=dtype),
        )
        t = torch.randint(0, 1000, (batch,))
    model.to(dtype)  # activations in `dtype`
    with flash_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.p_losses(x0, cond, t)
    model.to(torch.float32)
    for hook in hooks:
        hook.remove()
    return total, max(per_block)


def sizes(lora: bool) -> dict:
    model = build(lora, checkpointing=False)
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters
    blocks = [m for m in model.model.modules() if isinstance(m, TimestepEmbedSequential)]
    n = {
        "unet": sum(p.numel() for p in model.model.parameters()),
        "text_encoder": sum(p.numel() for p in model.cond_stage_model.parameters()),
        "autoencoder": sum(p.numel() for p in model.first_stage_model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "largest_block": max(sum(p.numel() for p in b.parameters()) for b in blocks),
    }
    checkpointing = build(lora, checkpointing=True)
    per_sample = {}
    for name, dtype in (("fp32", torch.float32), ("16-bit", torch.bfloat16)):
        full, block = saved_bytes(model, 1, dtype)
        checkpointed, _ = saved_bytes(checkpointing, 1, dtype)
        per_sample[name] = {"no_checkpointing": full, "checkpointing": checkpointed + block}
    return {"params": n, "activations_per_sample_bytes": per_sample}


def per_gpu(size: dict, layout: str, gpus: int, batch: int, precision: str, ckpt: bool) -> dict:
    """GiB per GPU of each part, for one layout (ddp, ddp_cpu_ema, fsdp, fsdp_ema)."""
    n = size["params"]
    trainable, whole = n["trainable"], n["text_encoder"] + n["autoencoder"]
    sharded = layout.startswith("fsdp")
    shard = gpus if sharded else 1  # FSDP shards the UNet, frozen (LoRA) or not
    activations = size["activations_per_sample_bytes"][precision]
    parts = {
        "weights": 4 * (n["unet"] / shard + whole),
        "gathered_block": 4 * n["largest_block"] if sharded else 0,
        "gradients": 4 * trainable / shard,
        "ddp_buckets": 0 if sharded else 4 * trainable,
        "adamw": 8 * trainable / shard,
        "ema": 4 * trainable / shard if layout in ("ddp", "fsdp_ema") else 0,
        "activations": batch * activations["checkpointing" if ckpt else "no_checkpointing"],
    }
    parts = {k: round(v / GIB, 2) for k, v in parts.items()}
    return {**parts, "total": round(sum(parts.values()), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the FSDP shards are split over")
    opt = parser.parse_args(argv)
    emit({"bench": "memory", "computed": "on the meta device, no GPU measured", "gpus": opt.gpus})
    rows = []
    for mode, lora in (("full", False), ("lora", True)):
        size = emit({"mode": mode, **sizes(lora)})
        layouts = ("ddp", "ddp_cpu_ema", "fsdp", *(() if lora else ("fsdp_ema",)))
        for layout in layouts:
            for precision in ("16-bit", "fp32"):
                for ckpt in (True, False):
                    for batch in opt.batch:
                        row = {"mode": mode, "layout": layout, "precision": precision}
                        row |= {"checkpointing": ckpt, "batch": batch}
                        gib = per_gpu(size, layout, opt.gpus, batch, precision, ckpt)
                        rows.append(emit({**row, "gib": gib}))
    return rows


if __name__ == "__main__":
    main()
