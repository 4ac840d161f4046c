"""Speed options for a network that change neither its results (beyond float tolerance) nor its
state_dict keys: channels-last memory format and `torch.compile` with an eager fallback."""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

logger = logging.getLogger(__name__)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store 4-d weights as NHWC, so convolutions produce (and keep) channels-last outputs.

    Inputs need no conversion: a convolution with a channels-last weight returns channels-last.
    """
    return module.to(memory_format=torch.channels_last)


def compile_unavailable() -> str | None:
    """Why `torch.compile` cannot run here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python/platform"
    compilers = [shutil.which(cc) for cc in ("g++", "c++", "clang++")]
    if not torch.cuda.is_available() and not any(compilers):
        return "the inductor backend needs a C++ compiler on the CPU and none is on PATH"
    return None


def compile_forward(module: nn.Module, name: str) -> nn.Module:
    """Compile `module.forward` in place (parameters and their names are untouched).

    Where compilation is unavailable, or fails on the first call, the module runs eagerly and a
    warning says why.
    """
    reason = compile_unavailable()
    if reason is not None:
        logger.warning("%s: not compiled (%s); running eagerly", name, reason)
        return module
    eager = module.forward
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # a backend failure: fall back, and let eager raise real errors
            logger.warning("%s: torch.compile failed (%s); running eagerly", name, err)
            module.forward = eager
            return eager(*args, **kwargs)

    module.forward = forward
    return module


def accelerate(module: nn.Module, name: str, channels_last: bool, compile: bool) -> nn.Module:
    """Apply the chosen options to `module`, channels-last first (compile sees the layout)."""
    if channels_last:
        module = to_channels_last(module)
    if compile:
        module = compile_forward(module, name)
    return module
