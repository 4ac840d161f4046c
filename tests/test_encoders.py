"""Tests of the CLIP tokenizer and the frozen text encoders (tiny random weights, no network)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import open_clip
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders import modules
from ldm.modules.encoders.modules import (
    CLIP_CONFIGS,
    CLIP_SHARED,
    OPENCLIP_CONFIGS,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
)
from ldm.modules.encoders.tokenizer import BOS_ID, EOS_ID, clip_tokenizer, tokenize

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = [
    "a photo of a cat",
    "Hello, World!!! (a test) -- ok? yes; no: maybe...",
    "1234567 apples cost $3.14, 50% off",
    "“like this” and ‘single’ quotes",
    "ﬁne ﬂowers with ligatures",
    "ＡＢＣ ｄｅｆ １２３ full width",
    "fish &amp; chips &lt;b&gt; &amp;amp; double escaped",
    "café naïve Ζεύς 東京タワー 🐱🚀 ❤️ 👨‍👩‍👧",
    "   lots \t of\n\n  whitespace   ",
    "",
    "don't it's we're I'll you've they'd I'm",
    "ÃƒÂ© mojibake and snake_case-and/slashes\\",
    " ".join(["a very long prompt about a castle on a hill"] * 12),
    "x" * 400,
]
TINY_CLIP, TINY_OPENCLIP = "ldm/clip-tiny", "ldm/openclip-tiny"


def manifest(version: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """{key without `prefix`: shape} for the keys of an SD reference state dict under `prefix`."""
    raw = json.loads((FIXTURES / f"sd-{version}-state-dict.json").read_text())
    return {k[len(prefix) :]: tuple(v) for k, v in raw.items() if k.startswith(prefix)}


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def tiny_text_model() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**CLIP_SHARED, **CLIP_CONFIGS[TINY_CLIP])).eval()


def tiny_open_clip() -> open_clip.model.CLIP:
    """An open_clip CLIP of the tiny text config, with a minimal vision tower."""
    config = OPENCLIP_CONFIGS[TINY_OPENCLIP]
    vision_cfg = dict(image_size=32, patch_size=16, width=32, layers=1, head_width=8)
    return open_clip.model.CLIP(config["embed_dim"], vision_cfg, config["text_cfg"]).eval()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_matches_open_clip():
    ours = tokenize(clip_tokenizer(), PROMPTS)  # (B, 77), padded with EOS
    ref = open_clip.tokenize(PROMPTS)  # (B, 77), padded with 0
    assert ours.shape == ref.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, ref, strict=True):
        n = int((b == EOS_ID).nonzero()[0]) + 1  # up to and including the first EOS
        assert a[:n].tolist() == b[:n].tolist(), prompt
        assert (a[n:] == EOS_ID).all(), prompt


def test_tokenize_known_ids_and_truncation():
    ids = tokenize(clip_tokenizer(), "a photo of a cat")[0]
    expected = [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert open_clip.tokenize(["a photo of a cat"])[0, :7].tolist() == expected
    assert ids[:8].tolist() == expected + [EOS_ID]
    long = tokenize(clip_tokenizer(), "x " * 200)[0]
    assert long.shape == (77,) and long[0] == BOS_ID and long[-1] == EOS_ID
    assert (long[1:-1] != EOS_ID).all()
    assert clip_tokenizer() is clip_tokenizer()


# ---------------------------------------------------------------- FrozenCLIPEmbedder


def test_clip_parity_with_diffusers_conversion():
    encoder = FrozenCLIPEmbedder(version=TINY_CLIP)
    ldm_keys = {
        "cond_stage_model." + k: v for k, v in encoder.state_dict().items()
    }  # the layout of an SD v1 file
    converted = convert_ldm_clip_checkpoint(ldm_keys)
    # CLIPTextModel is flat since transformers 5.6, as diffusers' create_diffusers_clip_model_*.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    reference = tiny_text_model()
    result = reference.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    prompts = ["a photo of a cat", "an astronaut riding a horse, highly detailed"]
    expected = reference(input_ids=encoder.tokenize(prompts)).last_hidden_state
    out = encoder(prompts)
    assert out.shape == (2, 77, 32)
    assert (out - expected).abs().max() <= 1e-5
    assert torch.equal(encoder.encode(prompts), out)


def test_clip_layers():
    last = FrozenCLIPEmbedder(version=TINY_CLIP)
    weights = last.state_dict()
    hidden = FrozenCLIPEmbedder(version=TINY_CLIP, layer="hidden", layer_idx=-2)
    penultimate = FrozenCLIPEmbedder(version=TINY_CLIP, layer="penultimate")
    pooled = FrozenCLIPEmbedder(version=TINY_CLIP, layer="pooled")
    for encoder in (hidden, penultimate, pooled):
        encoder.load_state_dict(weights)
    prompts = ["a red cube", "two dogs"]
    tokens = last.tokenize(prompts)
    model = last.transformer.text_model
    states = model(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.equal(hidden(prompts), states[-2])
    assert torch.equal(penultimate(prompts), states[-2])
    # "last" is the final hidden state after the final LayerNorm, which "hidden" lacks.
    torch.testing.assert_close(last(prompts), model.final_layer_norm(states[-1]))
    first_eos = (tokens == EOS_ID).int().argmax(dim=1)  # (B,)
    expected = last(prompts)[torch.arange(2), first_eos][:, None, :]  # (B, 1, D)
    assert torch.equal(pooled(prompts), expected)


def test_clip_key_layout_on_meta():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
    got = shapes(encoder)
    assert len(got) == 196 and all(k.startswith("transformer.text_model.") for k in got)
    expected = manifest("v1", "cond_stage_model.transformer.")
    assert got == {"transformer.text_model." + k: v for k, v in expected.items()}
    assert not any("position_ids" in k for k in got)


def test_clip_loads_local_directory(tmp_path):
    saved = tiny_text_model()
    saved.save_pretrained(tmp_path / "model")
    encoder = FrozenCLIPEmbedder(version=str(tmp_path / "model"))
    prompts = ["a cat on a mat"]
    expected = saved(input_ids=encoder.tokenize(prompts)).last_hidden_state
    assert torch.equal(encoder(prompts), expected)
    clip_tokenizer().save_pretrained(tmp_path / "model")  # a saved tokenizer is used if present
    with_tokenizer = FrozenCLIPEmbedder(version=str(tmp_path / "model"))
    assert with_tokenizer.tokenizer is not clip_tokenizer()
    assert torch.equal(with_tokenizer.tokenize(PROMPTS), encoder.tokenize(PROMPTS))


# ---------------------------------------------------------------- FrozenOpenCLIPEmbedder


def test_openclip_matches_open_clip():
    reference = tiny_open_clip()
    last = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP)
    penultimate = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate")
    penultimate.load_state_dict(last.state_dict())
    result = reference.load_state_dict(last.model.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("visual.") for k in result.missing_keys)
    prompts = ["a photo of a cat", "a castle"]
    tokens = open_clip.tokenize(prompts)
    out = reference.forward_intermediates(
        text=tokens, text_indices=2, normalize_intermediates=True, normalize=False
    )
    torch.testing.assert_close(penultimate(prompts), out["text_intermediates"][0])
    torch.testing.assert_close(last(prompts), out["text_intermediates"][1])
    # The pooled, projected features need text_projection, as open_clip's encode_text does.
    features = last(prompts)[torch.arange(2), tokens.argmax(dim=1)] @ last.model.text_projection
    torch.testing.assert_close(features, reference.encode_text(tokens))
    assert not torch.allclose(last(prompts), penultimate(prompts))


def test_openclip_key_layout_on_meta():
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert shapes(encoder) == manifest("v2", "cond_stage_model.")
    assert len(encoder.state_dict()) == 294


def test_openclip_loads_weights_file(tmp_path):
    reference = tiny_open_clip()
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(reference.state_dict(), path)
    encoder = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, version=str(path))
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    with pytest.raises(ValueError, match="version="):
        FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, version=str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------- both


@pytest.mark.parametrize(
    "make",
    [
        lambda freeze: FrozenCLIPEmbedder(version=TINY_CLIP, freeze=freeze),
        lambda freeze: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, freeze=freeze),
    ],
)
def test_freeze(make):
    frozen = make(True)
    assert not any(p.requires_grad for p in frozen.parameters())
    parent = nn.Sequential(frozen).train()
    assert parent.training and not any(m.training for m in frozen.modules())
    trainable = make(False)
    assert all(p.requires_grad for p in trainable.parameters())
    nn.Sequential(trainable).train()
    assert trainable.training
    trainable(["a cat"]).sum().backward()
    assert trainable.state_dict().keys() == frozen.state_dict().keys()


def test_bad_arguments():
    hint = r"version='some/hub-model'.*ldm/clip-tiny.*local directory"
    with pytest.raises(ValueError, match=hint):
        FrozenCLIPEmbedder(version="some/hub-model")
    with pytest.raises(ValueError, match="version="):
        FrozenCLIPEmbedder(version="/no/such/directory")
    with pytest.raises(ValueError, match=r"layer='middle'.*'last'"):
        FrozenCLIPEmbedder(version=TINY_CLIP, layer="middle")
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(version=TINY_CLIP, layer="hidden")
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(version=TINY_CLIP, layer="penultimate", layer_idx=-3)
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPEmbedder(version=TINY_CLIP, max_length=78)
    with pytest.raises(ValueError, match=r"layer='pooled'.*'penultimate'"):
        FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="pooled")
    with pytest.raises(ValueError, match=r"arch='ViT-Q-99'.*ViT-H-14"):
        FrozenOpenCLIPEmbedder(arch="ViT-Q-99")


def test_device_is_compat_only():
    with pytest.warns(UserWarning, match="device='cuda' is ignored"):
        encoder = FrozenCLIPEmbedder(version=TINY_CLIP, device="cuda")
    assert encoder(["a cat"]).device.type == "cpu"
    for cls in (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder):
        params = inspect.signature(cls).parameters
        assert set(cls.COMPAT_PARAMS) <= set(params)
        assert set(cls.COMPAT_PARAMS) <= set(modules.COMPAT_PARAMS)
