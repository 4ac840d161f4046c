"""House-style guards: file sizes, no print in the library, no silently unused params."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import ddpm, engine, upscale
from ldm.modules.conditioner import GeneralConditioner
from ldm.modules.diffusionmodules import denoiser, discretizer, loss, openaimodel, upscaling
from ldm.modules.diffusionmodules import model as ae_nets
from ldm.modules.diffusionmodules.sigma_sampling import DiscreteSampling
from ldm.modules.encoders import modules as encoders

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "ldm"
MAX_LINES = 600
MAX_MODEL_FILE_LINES = 450  # ldm/models/: the LightningModules stay readable in one sitting
MAX_FUNCTION_LINES = 60
MAX_CONSTRUCTOR_BODY_LINES = 40  # ldm/models/: constructors wire, helpers build


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_library_files_stay_small_and_print_free(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert not re.search(r"^\s*print\(", text, re.M), "use logging, not print"


def functions(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def body_lines(function: ast.FunctionDef, docstring: bool = False) -> int:
    """Lines of the body, with or without its docstring; a signature of the original config's
    params (DDPM has 40) does not count."""
    body = function.body
    has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    first = body[1] if has_docstring and len(body) > 1 and not docstring else body[0]
    return function.end_lineno - first.lineno + 1


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_functions_and_model_files_keep_the_house_sizes(path):
    too_long = [
        f"{f.name} ({body_lines(f, docstring=True)} lines)"
        for f in functions(path)
        if body_lines(f, docstring=True) > MAX_FUNCTION_LINES
    ]
    assert too_long == [], f"functions over {MAX_FUNCTION_LINES} lines"
    if path.is_relative_to(LIBRARY / "models"):
        assert len(path.read_text().splitlines()) <= MAX_MODEL_FILE_LINES
        constructors = [
            f"{f.name} ({body_lines(f)} lines)"
            for f in functions(path)
            if f.name == "__init__" and body_lines(f) > MAX_CONSTRUCTOR_BODY_LINES
        ]
        assert constructors == [], f"constructor bodies over {MAX_CONSTRUCTOR_BODY_LINES} lines"


CONFIG_CLASSES = [
    (openaimodel.UNetModel, openaimodel.COMPAT_PARAMS),
    (upscaling.ImageConcatWithNoiseAugmentation, upscaling.COMPAT_PARAMS),
    (ddpm.DDPM, ddpm.COMPAT_PARAMS),
    (ddpm.LatentDiffusion, ddpm.COMPAT_PARAMS),
    (upscale.LatentUpscaleDiffusion, {}),
    (AutoencoderKL, getattr(inspect.getmodule(AutoencoderKL), "COMPAT_PARAMS", {})),
    (ae_nets.Encoder, getattr(ae_nets, "COMPAT_PARAMS", {})),
    (ae_nets.Decoder, getattr(ae_nets, "COMPAT_PARAMS", {})),
    (encoders.FrozenCLIPEmbedder, encoders.FrozenCLIPEmbedder.COMPAT_PARAMS),
    (encoders.FrozenOpenCLIPEmbedder, encoders.FrozenOpenCLIPEmbedder.COMPAT_PARAMS),
    (encoders.FrozenOpenCLIPEmbedder2, encoders.FrozenOpenCLIPEmbedder.COMPAT_PARAMS),
    (encoders.ConcatTimestepEmbedderND, {}),
    (GeneralConditioner, {}),
    (engine.DiffusionEngine, engine.COMPAT_PARAMS),
    (denoiser.DiscreteDenoiser, {}),
    (discretizer.LegacyDDPMDiscretization, {}),
    (DiscreteSampling, {}),
    (loss.StandardDiffusionLoss, {}),
]


def project_sources() -> list[Path]:
    """The code that may read a model's attributes: the library, main.py and the scripts."""
    return [*library_files(), ROOT / "main.py", *sorted((ROOT / "scripts").glob("*.py"))]


@functools.cache
def attributes_read() -> frozenset[str]:
    """Every attribute name the project reads: `obj.name` loads and getattr(obj, "name", ...)."""
    names = set()
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                names.add(node.args[1].value)
    return frozenset(names)


def plain_copies(tree: ast.AST) -> dict[int, str]:
    """{id(Name node): attr} for each `self.attr = name` (also element-wise in tuples)."""
    copies = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts, strict=False))
            for lhs, rhs in pairs:
                if (
                    isinstance(lhs, ast.Attribute)
                    and isinstance(lhs.value, ast.Name)
                    and lhs.value.id == "self"
                    and isinstance(rhs, ast.Name)
                ):
                    copies[id(rhs)] = lhs.attr
    return copies


def dead_params(function, params: list[str]) -> list[str]:
    """The params of `function` that nothing reads.

    A param is used when its name is read in any expression of the body, except where it is only
    copied as `self.attr = param`; then it is used when `.attr` is read anywhere in the project.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    copies, read, dead = plain_copies(tree), attributes_read(), []
    for param in params:
        loads = [
            node
            for stmt in tree.body
            for node in ast.walk(stmt)
            if isinstance(node, ast.Name) and node.id == param and isinstance(node.ctx, ast.Load)
        ]
        if not any(id(node) not in copies or copies[id(node)] in read for node in loads):
            dead.append(param)
    return dead


@pytest.mark.parametrize("cls,compat", CONFIG_CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_every_constructor_param_is_used_or_listed_as_compat(cls, compat):
    signature = inspect.signature(cls.__init__).parameters
    params = [p for p, v in signature.items() if p != "self" and v.kind != v.VAR_KEYWORD]
    unused = [p for p in dead_params(cls.__init__, params) if p not in compat]
    assert unused == [], f"{cls.__name__}: params neither used nor in COMPAT_PARAMS"


class Toy:
    """Params used in each way the check knows, and dead in each way it must catch."""

    def __init__(self, read, copied_read, copied_dead, renamed_dead, in_tuple_dead, only_named):
        self.total = read + 1
        self.parameterization = copied_read  # read by the library (ddpm.py)
        self.no_such_attribute_anywhere = copied_dead
        self.alias_nobody_reads = renamed_dead
        self.total, self.tuple_attribute_nobody_reads = self.total, in_tuple_dead
        del only_named  # named, but never read


def test_dead_param_check_tells_real_use_from_a_name_that_merely_appears():
    params = list(inspect.signature(Toy.__init__).parameters)[1:]
    assert dead_params(Toy.__init__, params) == [
        "copied_dead",
        "renamed_dead",
        "in_tuple_dead",
        "only_named",
    ]
