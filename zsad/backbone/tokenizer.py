"""Offline CLIP tokenizer: the real OpenAI BPE, built from the vocabulary file that ``open_clip_torch`` ships.

The hub tokenizer of ``openai/clip-vit-large-patch14-336`` needs network or a populated cache. The BPE merges are the
same for every OpenAI CLIP, and ``open_clip`` ships them (``bpe_simple_vocab_16e6.txt.gz``), so zsad builds a
transformers ``CLIPTokenizer`` from that file and never needs the hub for text. Token ids equal open_clip's
``tokenize`` (padding with 0 after the end-of-text token, like OpenAI and open_clip).
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from transformers import CLIPTokenizer

CONTEXT_LENGTH = 77
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
_VOCAB_SIZE = 49408
_N_MERGES = _VOCAB_SIZE - 256 * 2 - 2  # 48,894: the merges that fill the vocabulary up to 49,408 entries


def bpe_vocabulary_path() -> Path:
    """Path of OpenAI's BPE vocabulary inside the installed ``open_clip`` package.

    Raises:
        FileNotFoundError: If ``open_clip_torch`` is not installed.
    """
    try:
        path = Path(str(resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        msg = (
            "The CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) ships with open_clip_torch, which is not "
            "installed: run `pip install 'open_clip_torch<2.26.1'` (or `make setup`)."
        )
        raise FileNotFoundError(msg)
    return path


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte → printable-unicode table, in OpenAI's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


class CLIPBPETokenizer:
    """OpenAI CLIP tokenizer returning padded id tensors, as ``open_clip.tokenize`` does.

    Args:
        tokenizer: A transformers ``CLIPTokenizer`` (built offline by :func:`get_tokenizer`).
        context_length: Padded length (77 for CLIP).
    """

    def __init__(self, tokenizer: CLIPTokenizer, context_length: int = CONTEXT_LENGTH) -> None:
        self.hf = tokenizer
        self.context_length = context_length
        self.sot_token_id = tokenizer.convert_tokens_to_ids(SOT_TOKEN)
        self.eot_token_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Tokenise to ``[n, context_length]`` ids: SOT, BPE ids, EOT, zero padding (OpenAI layout).

        Raises:
            ValueError: If a text does not fit the context (CLIP would silently truncate its end-of-text token).
        """
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                msg = f"Prompt is {len(ids)} tokens, longer than CLIP's context of {self.context_length}: {text!r}"
                raise ValueError(msg)
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@cache
def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> CLIPBPETokenizer:
    """The CLIP tokenizer built offline from open_clip's BPE file (cached per process)."""
    lines = gzip.open(bpe_vocabulary_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    hf = CLIPTokenizer(vocab=vocab, merges=merges)
    return CLIPBPETokenizer(hf, context_length)
