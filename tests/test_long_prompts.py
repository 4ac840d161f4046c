"""Prompts longer than 77 CLIP tokens: truncated with a warning, or encoded in 77-token chunks
(`long_prompts: chunk`, as the AUTOMATIC1111 web UI), and guided against a shorter uncond."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import open_clip
import pytest
import torch
from conftest import load_config

from ldm.models.diffusion import sampling
from ldm.models.diffusion.conditioning import (
    CONTEXT_KEY,
    MOMENTS_KEY,
    drop_cached_context,
    match_context_lengths,
    pad_context,
)
from ldm.models.diffusion.guidance import cat_cond
from ldm.modules.encoders import modules
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import (
    BOS_ID,
    EOS_ID,
    clip_tokenizer,
    prompt_ids,
    split_into_chunks,
    tokenize,
)
from ldm.util import instantiate_from_config
from ldm.validation import ValidationPrompts
from scripts.common import conditionings

TINY_CLIP, TINY_OPENCLIP = "ldm/clip-tiny", "ldm/openclip-tiny"
# 30 words of one token each, 4 times: 120 tokens, so two chunks (75 + 45).
WORDS = (
    "a red cat sits on the blue mat near an old green door under the tall grey tree by the "
    "small white house in the cold dark night so still"
).split()
LONG = " ".join(WORDS * 4)
# The same prompt with its last words (beyond token 77) changed.
LONG_OTHER_TAIL = " ".join(WORDS * 3 + WORDS[:10] + ["dog"] * 20)
SHORT = ["a photo of a cat", "an astronaut riding a horse", ""]
ENCODERS = {
    "clip": lambda **kw: FrozenCLIPEmbedder(version=TINY_CLIP, **kw),
    "openclip": lambda **kw: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, **kw),
}
# The same tokens in batches of different sizes: float32 rounding of different matmul blockings
# (1.5e-6 seen on one CPU on values ~0.05; a wrong token moves them by ~1e-1).
ROUNDING = {"atol": 1e-5, "rtol": 1e-5}


def pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(truncating, chunking) encoders of one kind with the same random weights."""
    truncate, chunk = ENCODERS[name](), ENCODERS[name](long_prompts="chunk")
    chunk.load_state_dict(truncate.state_dict())
    return truncate, chunk


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a fresh process: no encoder has warned of truncation yet."""
    monkeypatch.setattr(modules, "TRUNCATION_WARNED", set())


def test_the_long_prompt_has_two_chunks_and_differs_only_after_token_77():
    ids, other = (
        clip_tokenizer()(p, add_special_tokens=False)["input_ids"] for p in (LONG, LONG_OTHER_TAIL)
    )
    assert len(ids) == len(other) == 120
    assert ids[:90] == other[:90] and ids[90:] != other[90:]


# ---------------------------------------------------------------- encoders


def test_chunked_clip_equals_each_chunk_encoded_alone_by_the_text_model():
    _, chunk = pair("clip")
    ids = clip_tokenizer()(LONG, add_special_tokens=False)["input_ids"]
    first = [BOS_ID, *ids[:75], EOS_ID]  # built by hand: BOS + 75 tokens + EOS
    second = [BOS_ID, *ids[75:], EOS_ID] + [EOS_ID] * (75 - len(ids[75:]))  # EOS padding
    text_model = chunk.transformer.text_model
    expected = [text_model(input_ids=torch.tensor([t])).last_hidden_state for t in (first, second)]
    out = chunk(LONG)
    assert out.shape == (1, 154, 32)
    torch.testing.assert_close(out[:, :77], expected[0], **ROUNDING)
    torch.testing.assert_close(out[:, 77:], expected[1], **ROUNDING)


@pytest.mark.parametrize("name", ENCODERS)
def test_chunks_keep_the_words_after_token_77_and_truncation_drops_them(name):
    truncate, chunk = pair(name)
    long, other = chunk([LONG]), chunk([LONG_OTHER_TAIL])  # (1, 154, D) each
    assert long.shape == other.shape == (1, 154, 32)
    assert torch.equal(long[:, :77], other[:, :77])
    assert not torch.allclose(long[:, 77:], other[:, 77:])
    assert truncate([LONG]).shape == (1, 77, 32)
    assert torch.equal(truncate([LONG]), truncate([LONG_OTHER_TAIL]))
    torch.testing.assert_close(truncate([LONG]), long[:, :77], **ROUNDING)


@pytest.mark.parametrize("name", ENCODERS)
def test_short_prompts_chunked_equal_truncated_bit_for_bit(name):
    truncate, chunk = pair(name)
    assert chunk(SHORT).shape == (3, 77, 32)
    assert torch.equal(chunk(SHORT), truncate(SHORT))
    assert torch.equal(chunk("a castle"), truncate("a castle"))


@pytest.mark.parametrize("name", ENCODERS)
def test_a_short_prompt_batched_with_a_long_one_gets_empty_chunks(name):
    _, chunk = pair(name)
    out = chunk([LONG, "a photo of a cat"])  # (2, 154, D)
    assert out.shape == (2, 154, 32)
    alone, empty = chunk(["a photo of a cat"]), chunk([""])  # (1, 77, D) each
    torch.testing.assert_close(out[1:, :77], alone, **ROUNDING)
    torch.testing.assert_close(out[1:, 77:], empty, **ROUNDING)
    torch.testing.assert_close(out[:1], chunk([LONG]), **ROUNDING)


def test_truncated_ids_are_the_tokenizers_own():
    prompts = [*SHORT, LONG, "x" * 400, "   odd \t spacing &amp; “quotes” 🐱"]
    ids = prompt_ids(clip_tokenizer(), prompts)
    ours = split_into_chunks(ids, 77, BOS_ID, EOS_ID, EOS_ID, max_chunks=1)
    assert torch.equal(ours, tokenize(clip_tokenizer(), prompts))
    tok = modules.OPENCLIP_TOKENIZER
    ids = [tok.encode(p) for p in prompts]
    ours = split_into_chunks(ids, 77, tok.sot_token_id, tok.eot_token_id, 0, max_chunks=1)
    assert torch.equal(ours, open_clip.tokenize(prompts))


def test_chunk_layout():
    tokens = split_into_chunks([[5] * 9, [], [7, 8]], 6, bos=1, eos=2, pad=0)
    assert tokens.tolist() == [
        [1, 5, 5, 5, 5, 2],
        [1, 5, 5, 5, 5, 2],
        [1, 5, 2, 0, 0, 0],
        [1, 2, 0, 0, 0, 0],  # the empty prompt: one empty chunk, then empty chunks
        [1, 2, 0, 0, 0, 0],
        [1, 2, 0, 0, 0, 0],
        [1, 7, 8, 2, 0, 0],
        [1, 2, 0, 0, 0, 0],
        [1, 2, 0, 0, 0, 0],
    ]


@pytest.mark.parametrize("name", ENCODERS)
def test_truncation_is_logged_once_per_process(name, caplog):
    truncate, chunk = pair(name)
    with caplog.at_level(logging.WARNING, logger=modules.__name__):
        truncate(SHORT)
        chunk([LONG])
        assert caplog.records == []
        truncate([LONG])
        truncate([LONG_OTHER_TAIL, "a cat"])
    (record,) = caplog.records
    message = record.getMessage()
    assert "122 tokens" in message and "truncated to max_length=77" in message
    assert "long_prompts: chunk" in message and "cond_stage_config.params" in message


@pytest.mark.parametrize("name", ENCODERS)
def test_a_bad_long_prompts_is_refused_by_name(name):
    with pytest.raises(ValueError, match=r"long_prompts='split'.*'truncate', 'chunk'"):
        ENCODERS[name](long_prompts="split")


def test_pooled_chunks_are_refused():
    with pytest.raises(ValueError, match=r"layer='pooled' with long_prompts='chunk'"):
        FrozenCLIPEmbedder(version=TINY_CLIP, layer="pooled", long_prompts="chunk")
    pooled = FrozenCLIPEmbedder(version=TINY_CLIP, layer="pooled")
    assert pooled([LONG, "a cat"]).shape == (2, 1, 32)


# ---------------------------------------------------------------- guidance and dropout


@pytest.fixture(scope="module")
def model():
    """The tiny txt2img model with long_prompts: chunk, its UNet's zero layers made live so
    that its output depends on the context."""
    config = load_config("tiny/txt2img.yaml")
    config.model.params.cond_stage_config.params.long_prompts = "chunk"
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return model


def guided(model, prompt: str, uncond=None, steps: int = 3) -> torch.Tensor:
    """DDIM latents for `prompt` against uncond (default: the empty prompt, as txt2img.py)."""
    cond, empty = conditionings(model, [prompt], scale=4.0)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, 4, 8, 8), generator=generator)
    uncond = empty if uncond is None else uncond
    return sampling.sample(model, cond, uncond, steps=steps, guidance_scale=4.0, x_T=x_T)


def test_guided_sampling_with_a_long_prompt_pads_the_empty_uncond(model):
    cond, uncond = conditionings(model, [LONG], scale=4.0)
    assert cond.shape == (1, 154, 32) and uncond.shape == (1, 77, 32)
    latents = guided(model, LONG)
    assert latents.shape == (1, 4, 8, 8) and latents.isfinite().all()
    # The empty prompt is one empty chunk: padding it is repeating it.
    assert torch.equal(latents, guided(model, LONG, uncond.repeat(1, 2, 1)))
    assert not torch.allclose(latents, guided(model, LONG_OTHER_TAIL))


def test_a_shorter_negative_prompt_is_padded_as_if_encoded_with_the_prompt(model):
    encoder = model.cond_stage_model
    cond, negative = encoder([LONG]), encoder(["blurry, low quality"])  # 154 and 77 positions
    padded_cond, padded = match_context_lengths(model, cond, negative)
    assert padded_cond is cond and padded.shape == (1, 154, 32)
    together = encoder([LONG, "blurry, low quality"])  # (2, 154, D)
    torch.testing.assert_close(padded, together[1:], **ROUNDING)
    assert match_context_lengths(model, negative, cond)[0].shape == (1, 154, 32)


def test_validation_prompts_sample_a_long_prompt(model):
    callback = ValidationPrompts([LONG, "a cat"], steps=2, n_per_prompt=1, guidance_scale=3.0)
    callback.setup(SimpleNamespace(strategy=None), model, "fit")
    images = callback.sample_prompts(model)
    assert [tuple(i.shape) for i in images] == [(1, 3, 32, 32)] * 2
    assert all(i.isfinite().all() for i in images)


def test_contexts_that_cannot_be_padded_are_refused():
    cond, uncond = torch.zeros(1, 100, 8), torch.zeros(1, 77, 8)
    with pytest.raises(ValueError, match=r"uncond \(1, 77, 8\) and cond \(1, 100, 8\)"):
        cat_cond(uncond, cond)
    with pytest.raises(ValueError, match="cannot be padded to 100 with empty chunks of 77"):
        pad_context(uncond, 100, uncond)


def test_cached_dropout_pads_the_empty_captions_context(model):
    encoder = model.cond_stage_model
    cached = encoder([LONG, "a photo of a cat"])  # (2, 154, D), as a latent cache holds it
    empty = encoder([""])  # (1, 77, D): constant_context("")
    dropped = drop_cached_context(cached, 1.0, empty)
    assert dropped.shape == (2, 154, 32)
    assert torch.equal(dropped, empty.repeat(2, 2, 1))
    torch.testing.assert_close(dropped[:1], encoder(["", LONG])[:1], **ROUNDING)
    assert torch.equal(drop_cached_context(cached, 0.0, empty), cached)
    with pytest.raises(ValueError, match="val='a cat'.*77 positions.*154"):
        drop_cached_context(cached, 1.0, encoder(["a cat"]), val="a cat")
    with pytest.raises(ValueError, match="cannot be padded"):
        drop_cached_context(cached[:, :100], 1.0, empty)


def test_get_input_drops_long_cached_contexts_to_the_padded_empty_caption(model, monkeypatch):
    encoder = model.cond_stage_model
    captions = [LONG, "a photo of a cat"]
    batch = {
        MOMENTS_KEY: torch.randn(2, 8, 8, 8),  # (B, 2C, h, w)
        CONTEXT_KEY: encoder(captions),  # (B, 154, D)
        "caption": captions,
    }
    monkeypatch.setitem(model.ucg_training["caption"], "p", 1.0)
    model.train()
    try:
        _, c = model.get_input(batch)
    finally:
        model.eval()
    assert torch.equal(c, encoder([""]).repeat(2, 2, 1))
