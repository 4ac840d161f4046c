"""House-style guards: file sizes, no print in the library, no silently unused params."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import ddpm
from ldm.modules.diffusionmodules import model as ae_nets
from ldm.modules.diffusionmodules import openaimodel
from ldm.modules.encoders import modules as encoders

LIBRARY = Path(__file__).resolve().parents[1] / "ldm"
MAX_LINES = 600


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_library_files_stay_small_and_print_free(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert not re.search(r"^\s*print\(", text, re.M), "use logging, not print"


CONFIG_CLASSES = [
    (openaimodel.UNetModel, openaimodel.COMPAT_PARAMS),
    (ddpm.DDPM, ddpm.COMPAT_PARAMS),
    (ddpm.LatentDiffusion, ddpm.COMPAT_PARAMS),
    (AutoencoderKL, getattr(inspect.getmodule(AutoencoderKL), "COMPAT_PARAMS", {})),
    (ae_nets.Encoder, getattr(ae_nets, "COMPAT_PARAMS", {})),
    (ae_nets.Decoder, getattr(ae_nets, "COMPAT_PARAMS", {})),
    (encoders.FrozenCLIPEmbedder, encoders.FrozenCLIPEmbedder.COMPAT_PARAMS),
    (encoders.FrozenOpenCLIPEmbedder, encoders.FrozenOpenCLIPEmbedder.COMPAT_PARAMS),
]


def names_used_in_body(function) -> set[str]:
    """Every bare name read in `function`'s body (its signature excluded)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body
    return {node.id for stmt in body for node in ast.walk(stmt) if isinstance(node, ast.Name)}


@pytest.mark.parametrize("cls,compat", CONFIG_CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_every_constructor_param_is_used_or_listed_as_compat(cls, compat):
    signature = inspect.signature(cls.__init__).parameters
    params = [p for p, v in signature.items() if p != "self" and v.kind != v.VAR_KEYWORD]
    used = names_used_in_body(cls.__init__)
    unused = [p for p in params if p not in used and p not in compat]
    assert unused == [], f"{cls.__name__}: params neither used nor in COMPAT_PARAMS"
