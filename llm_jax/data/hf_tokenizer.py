"""Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` library) behind the interface of
`data.tokenizer.Tokenizer`, so the data pipeline, generation and fine-tuning take either.

A run's folder (`WORKDIR/tokenizer/`, an export's `tokenizer/`) holds `tokenizer.json` and, beside it,
`tokenizer_config.json` / `special_tokens_map.json`: the files transformers' `save_pretrained` writes,
which name the special tokens (bos, eos, unk, pad, cls, sep, mask). A bare `tokenizer.json` names
none; they are then found by their usual spellings (`<s>`, `</s>`, `<|endoftext|>`, `[CLS]`, ...).

Ids are those of transformers' `AutoTokenizer` with `add_special_tokens=False`: `encode` adds nothing,
the pipeline puts bos/eos (decoders, encoder-decoders) or [CLS]/[SEP] (encoders) itself.

What Hugging Face tokenizers lack, decided here once:
- pad: padding is always id 0 with weight 0 (data/pipeline.py), masked from every loss and metric,
  so a tokenizer without a pad token (GPT-2's, Llama-2's) needs none; `pad_id` is then -1.
- bos, eos: -1 when absent, as SentencePiece says it. GPT-2's `<|endoftext|>` is bos, eos and unk
  at once. A run refuses a tokenizer that lacks an id its family needs (data/tokenizer.py,
  `_check_loaded`): a decoder needs bos and eos, an encoder-decoder eos, an encoder [CLS] and [SEP].
- unk: -1 when the model has none (byte-level BPE never needs one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from llm_jax.runtime.faults import first_line

JSON_NAME = "tokenizer.json"
CONFIG_NAMES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
# Usual spellings, for a bare tokenizer.json whose configs are absent (the first one present wins).
_USUAL = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>"),
    "eos_token": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "unk_token": ("<unk>", "[UNK]", "<|endoftext|>"),
    "pad_token": ("<pad>", "[PAD]"),
    "cls_token": ("[CLS]",),
    "sep_token": ("[SEP]",),
    "mask_token": ("[MASK]", "<mask>"),
}


class HFTokenizerError(ValueError):
    """A tokenizer.json that cannot be read, or special tokens that are not in it."""


def _content(value: Any) -> str | None:
    """A special token as the configs write it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_special_tokens(folder: Path) -> dict[str, str]:
    """{"bos_token": "<s>", ...} from tokenizer_config.json, then special_tokens_map.json (which wins,
    as in transformers); keys they do not name are absent."""
    tokens: dict[str, str] = {}
    for name in CONFIG_NAMES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise HFTokenizerError(f"{file} is not readable JSON ({e})") from None
        for key in SPECIAL_KEYS:
            token = _content(data.get(key))
            if token is not None:
                tokens[key] = token
    return tokens


def _has_type(node: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) is or holds `kind`."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    parts = node.get("decoders") or node.get("pretokenizers") or []
    return any(_has_type(p, kind) for p in parts)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable alphabet for bytes (the ByteLevel pre-tokenizer's), back to the byte values."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """`tokenizers.Tokenizer` with the ids and methods of `data.tokenizer.Tokenizer` (read that one's
    docstring): vocab_size, pad_id, unk_id, bos_id, eos_id (-1 when absent), cls_id, sep_id, mask_id
    (None when absent), sentinel_ids, special_ids, user_defined (the added tokens, by text)."""

    def __init__(self, path: str | os.PathLike):
        """`path`: a tokenizer.json, or a folder holding one (and its configs)."""
        self.path = Path(path)
        file = self.path / JSON_NAME if self.path.is_dir() else self.path
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:
            raise HFTokenizerError(f"cannot read {file} ({e.strerror or e})") from None
        self._load(text, read_special_tokens(file.parent))

    def _load(self, text: str, named: dict[str, str]) -> None:
        try:
            self._tok = tokenizers.Tokenizer.from_str(text)
            self._spec = json.loads(text)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise HFTokenizerError(f"{self.path} is not a Hugging Face tokenizer.json ({first_line(e)})") from None
        self._json, self._named = text, dict(named)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        added = self._tok.get_added_tokens_decoder()
        self.user_defined: dict[str, int] = {t.content: i for i, t in sorted(added.items())}

        def find(key: str) -> int | None:
            if key in named:
                if named[key] not in vocab:
                    raise HFTokenizerError(f"{self.path}: {key} {named[key]!r} is not in its vocabulary")
                return vocab[named[key]]
            if named:  # configs present: what they do not name, the tokenizer does not have
                return None
            return next((vocab[t] for t in _USUAL[key] if t in vocab), None)

        ids = {key: find(key) for key in SPECIAL_KEYS}
        model_unk = self._spec.get("model", {}).get("unk_token")
        if ids["unk_token"] is None and isinstance(model_unk, str) and model_unk in vocab:
            ids["unk_token"] = vocab[model_unk]
        minus = {key: -1 if ids[key] is None else ids[key]
                 for key in ("pad_token", "unk_token", "bos_token", "eos_token")}
        self.pad_id: int = minus["pad_token"]
        self.unk_id: int = minus["unk_token"]
        self.bos_id: int = minus["bos_token"]
        self.eos_id: int = minus["eos_token"]
        self.cls_id: int | None = ids["cls_token"]
        self.sep_id: int | None = ids["sep_token"]
        self.mask_id: int | None = ids["mask_token"]
        sentinels = []
        while f"<extra_id_{len(sentinels)}>" in vocab:
            sentinels.append(vocab[f"<extra_id_{len(sentinels)}>"])
        self.sentinel_ids: tuple[int, ...] = tuple(sentinels)
        named_ids = {i for i in ids.values() if i is not None}
        self.special_ids: tuple[int, ...] = tuple(sorted(named_ids | set(added)))
        # Decoded to nothing, as SentencePiece's control pieces: the ids the pipeline puts around text.
        self._control = {i for i in (self.pad_id, self.bos_id, self.eos_id, self.cls_id, self.sep_id)
                         if i is not None and i >= 0}

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens the configs named ({"bos_token": "<s>", ...}; empty for a bare file)."""
        return dict(self._named)

    def id_to_token(self, i: int) -> str | None:
        """The text of token `i` as the vocabulary spells it (byte-level: GPT-2's alphabet)."""
        return self._tok.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos/[CLS]/[SEP] (the data pipeline adds them)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, on all CPU cores (the tokenizers library's own threads)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; pad, bos, eos, [CLS] and [SEP] decode to nothing, other added tokens ([MASK],
        sentinels) to their text, as SentencePiece decodes user-defined pieces."""
        kept = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in self._control]
        return self._tok.decode(kept, skip_special_tokens=False)

    def piece_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: the UTF-8 bytes of text each id stands for; special and added ids 0.

        Byte-level BPE (GPT-2): the bytes behind the token's characters, exact. Byte-fallback pieces
        `<0xAB>`: one byte. SentencePiece-style pieces: "\u2581" is a space. WordPiece: a "##" piece
        continues a word (no space); another piece starting with a letter or digit is a new word with its
        leading space, punctuation is counted without one; text the normalizer changed (lower case,
        accents stripped) counts as normalized, so the sum is about the text's UTF-8 length.
        """
        sizes = np.zeros(self.vocab_size, np.int64)
        special = set(self.special_ids)
        byte_level = _has_type(self._spec.get("decoder"), "ByteLevel") or _has_type(
            self._spec.get("pre_tokenizer"), "ByteLevel")
        model = self._spec.get("model", {})
        wordpiece = model.get("type") == "WordPiece"
        prefix = model.get("continuing_subword_prefix") or "##"
        to_byte = _byte_level_decoder() if byte_level else {}
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            if i in special:
                continue
            if byte_level:
                sizes[i] = sum(1 for ch in token if ch in to_byte)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                sizes[i] = 1
            elif wordpiece:
                if token.startswith(prefix):
                    sizes[i] = len(token[len(prefix):].encode("utf-8"))
                else:
                    sizes[i] = len(token.encode("utf-8")) + (1 if token[:1].isalnum() else 0)
            else:
                sizes[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return sizes

    # Pickled for grain worker processes: the tokenizer travels as its JSON, needing no file.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "json": self._json, "named": self._named}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._load(state["json"], state["named"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size})"
