"""Offline CLIP tokenizer giving the token ids of Hugging Face `openai/clip-vit-large-patch14`.

The BPE merges are the ones open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), the same file
OpenAI's CLIP repository (https://github.com/openai/CLIP) tokenizes with; the vocabulary is
rebuilt from them in memory, so nothing is downloaded. Prompts are cleaned as OpenAI's CLIP does
(ftfy, HTML unescape, whitespace collapse, lowercase), which transformers 5 no longer does.
`split_into_chunks` lays prompts longer than one context out in 77-token chunks, as the
AUTOMATIC1111 web UI and kohya's sd-scripts do.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import os
import re
from functools import cache

import ftfy
import torch
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer

BPE_PACKAGE = "open_clip"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges, so that 256 bytes + 256 end-of-word bytes + the
# merged tokens + 2 special tokens fill a vocabulary of exactly 49408.
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def clean_prompt(text: str) -> str:
    """Clean a prompt as OpenAI's CLIP does: fix mojibake, unescape HTML twice, collapse spaces."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def read_bpe_merges() -> list[tuple[str, str]]:
    """The merge pairs from open_clip's packaged BPE file (its first line is a version header)."""
    data = (importlib.resources.files(BPE_PACKAGE) / BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def make_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token → id in CLIP's order: bytes, bytes + `</w>`, merged pairs, then BOS and EOS."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TOKEN] != BOS_ID:
        raise RuntimeError(
            f"{BPE_PACKAGE}/{BPE_FILE} gave a vocabulary of {len(vocab)} tokens with BOS id "
            f"{vocab.get(BOS_TOKEN)}; expected {VOCAB_SIZE} and {BOS_ID}. "
            "Reinstall open_clip_torch."
        )
    return vocab


@cache
def clip_tokenizer() -> CLIPTokenizer:
    """The built-in CLIP ViT-L/14 tokenizer, built once per process from the packaged BPE file."""
    merges = read_bpe_merges()
    return CLIPTokenizer(vocab=make_vocab(merges), merges=merges)


def find_tokenizer_dir(directory: str) -> str | None:
    """`directory` if it holds a saved tokenizer, else None (the built-in one is used)."""
    has_files = any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)
    return directory if has_files else None


@cache
def load_tokenizer(directory: str | None = None) -> CLIPTokenizer:
    """The tokenizer saved in `directory` (loaded once per process), or the built-in one."""
    if directory is None:
        return clip_tokenizer()
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize(
    tokenizer: CLIPTokenizer, text: str | list[str], max_length: int = MAX_LENGTH
) -> torch.Tensor:
    """Token ids `(B, max_length)`: BOS, prompt, EOS, padded with EOS; long prompts truncated."""
    prompts = [text] if isinstance(text, str) else list(text)
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return batch["input_ids"]  # (B, max_length)


def prompt_ids(tokenizer: CLIPTokenizer, text: str | list[str]) -> list[list[int]]:
    """Each cleaned prompt's token ids, without BOS / EOS and not truncated."""
    prompts = [text] if isinstance(text, str) else list(text)
    cleaned = [clean_prompt(p) for p in prompts]
    return tokenizer(cleaned, add_special_tokens=False, verbose=False)["input_ids"]


def split_ids(ids: list[int], size: int) -> list[list[int]]:
    """`ids` in pieces of `size` (the last one shorter); the empty prompt is one empty piece."""
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]


def split_into_chunks(
    ids: list[list[int]],
    max_length: int,
    bos: int,
    eos: int,
    pad: int,
    max_chunks: int | None = None,
) -> torch.Tensor:
    """Token ids `(B*k, max_length)`: each prompt's ids (no BOS / EOS) in pieces of
    max_length - 2, each wrapped as BOS + piece + EOS + padding, prompt after prompt.

    k is the most pieces any prompt has (at most `max_chunks`; 1 truncates every prompt to
    its first piece); prompts with fewer get empty chunks, the tokens of the empty prompt.
    """
    size = max_length - 2
    if size < 1:
        raise ValueError(f"split_into_chunks: max_length={max_length}; pass at least 3")
    pieces = [split_ids(prompt, size)[:max_chunks] for prompt in ids]
    k = max(len(prompt) for prompt in pieces)
    rows = [
        [bos, *piece, eos] + [pad] * (size - len(piece))
        for prompt in pieces
        for piece in prompt + [[]] * (k - len(prompt))
    ]
    return torch.tensor(rows, dtype=torch.long)  # (B*k, max_length)
