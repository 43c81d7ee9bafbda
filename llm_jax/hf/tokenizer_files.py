"""Tokenizers in and out of Hugging Face folders (`llm-jax hf import` / `hf export` call these two).

Import: a model folder's `tokenizer.json` (+ tokenizer_config.json / special_tokens_map.json) is kept
as it is, read by data/hf_tokenizer.py; a folder with only a SentencePiece model (Llama-2's
`tokenizer.model`, T5's `spiece.model`) becomes `spm.model` with the tokens transformers adds after its
pieces (T5's sentinels) appended (data/tokenizer.py, `copy_tokenizer`). Either way the ids are those of
transformers' `AutoTokenizer.from_pretrained(hf_dir)` with add_special_tokens=False.

Export: a run with a tokenizer.json gives it back with its configs. A run with a SentencePiece model
(ours: BPE or unigram, byte fallback, identity normalization, no dummy prefix; or an imported Llama-2 /
T5 one) gets a `tokenizer.json` built with the `tokenizers` library that gives SentencePiece's ids on
any text (transformers is not needed at run time):
- model: BPE with merges derived from the pieces (every split of a piece into two pieces, ranked by the
  piece's score, as transformers' SentencePiece converter does: SentencePiece's BPE merges the pair whose
  result scores highest, leftmost first, which is what ranked merges do), or Unigram with the scores;
  byte fallback as the model has it.
- normalizer: SentencePiece's precompiled character map when it has one, extra whitespace removed when
  it removes it, then spaces to "\u2581" and the dummy prefix when it adds one. No pre-tokenizer:
  SentencePiece encodes the whole normalized text and no piece crosses a word, so none is needed.
- added tokens: control pieces (pad, bos, eos) and unk as special tokens, user-defined pieces as added
  tokens ([CLS] [SEP] [MASK] and the sentinels special, as transformers' BERT and T5 have them).
- decoder: "\u2581" back to spaces, byte pieces back to bytes; the dummy prefix's space stripped.
- post-processor: what our `generate` feeds the model, so AutoTokenizer's default encode matches it:
  bos + text for a decoder, text + eos for an encoder-decoder, [CLS] text [SEP] for an encoder.
A literal control piece in text ("<s>") is the exception: SentencePiece encodes its characters,
transformers matches it as the special token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import AddedToken, Regex, decoders, normalizers, processors

from llm_jax.config import ConfigError, ModelConfig
from llm_jax.data.hf_tokenizer import CONFIG_NAMES, JSON_NAME, HFTokenizer, HFTokenizerError
from llm_jax.data.tokenizer import MODEL_NAME, copy_tokenizer, open_tokenizer, tokenizer_file
from llm_jax.hf.errors import HFConversionError
from llm_jax.runtime.faults import first_line

_Type = sp_model.ModelProto.SentencePiece.Type
_UNIGRAM, _BPE = sp_model.TrainerSpec.ModelType.UNIGRAM, sp_model.TrainerSpec.ModelType.BPE
# User-defined pieces that transformers' BERT and T5 tokenizers hold as special tokens.
_SPECIAL_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")


def import_tokenizer(hf_dir: Path, dest: Path) -> None:
    """Writes into `dest` (an export's tokenizer/ folder) the tokenizer of the Hugging Face folder
    `hf_dir`, as our loader reads it. Raises HFConversionError (one line) when there is none usable."""
    hf_dir, dest = Path(hf_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        copy_tokenizer(hf_dir, dest, key=f"{hf_dir}")
        open_tokenizer(dest)
    except ConfigError as e:
        raise HFConversionError(first_line(e)) from None
    except (RuntimeError, OSError, HFTokenizerError) as e:
        raise HFConversionError(f"{hf_dir}: its tokenizer cannot be read ({first_line(e)})") from None


def export_tokenizer(tokenizer_dir: Path, out: Path, model: ModelConfig) -> None:
    """Writes into `out` the tokenizer of a run's (or an export's) tokenizer/ folder as files that
    `transformers.AutoTokenizer.from_pretrained(out)` loads with no extra code, giving our ids."""
    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    found = tokenizer_file(tokenizer_dir)
    if found is None:
        raise HFConversionError(f"{tokenizer_dir} holds no tokenizer ({MODEL_NAME} or {JSON_NAME})")
    out.mkdir(parents=True, exist_ok=True)
    if found.name == JSON_NAME:
        _export_json(tokenizer_dir, out)
        return
    try:
        proto = sp_model.ModelProto.FromString(found.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise HFConversionError(f"{found} is not a SentencePiece model ({first_line(e)})") from None
    tokenizer = _tokenizer_from_spm(proto, found)
    named = _special_tokens(proto)
    tokenizer.post_processor = _post_processor(model, named, tokenizer)
    tokenizer.save(str(out / JSON_NAME))
    _write_configs(out, named, model)


def _export_json(tokenizer_dir: Path, out: Path) -> None:
    """A tokenizer.json run: the file and its configs as they are; a bare file gets configs naming the
    special tokens our loader found in it, so transformers knows them too."""
    shutil.copyfile(tokenizer_dir / JSON_NAME, out / JSON_NAME)
    for name in CONFIG_NAMES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    if (out / CONFIG_NAMES[0]).is_file():
        return
    ours = HFTokenizer(tokenizer_dir)
    named = {key: ours.id_to_token(i) for key, i in (("bos_token", ours.bos_id), ("eos_token", ours.eos_id),
                                           ("unk_token", ours.unk_id), ("pad_token", ours.pad_id),
                                           ("cls_token", ours.cls_id), ("sep_token", ours.sep_id),
                                           ("mask_token", ours.mask_id)) if i is not None and i >= 0}
    _write_configs(out, named, None)


def _tokenizer_from_spm(proto: sp_model.ModelProto, path: Path) -> tokenizers.Tokenizer:
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    unk = next((i for i, p in enumerate(pieces) if p.type == _Type.UNKNOWN), None)
    if unk is None:
        raise HFConversionError(f"{path}: a SentencePiece model without an unknown piece cannot be converted")
    if trainer.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = tokenizers.models.BPE(vocab=vocab, merges=_merges(pieces), unk_token=pieces[unk].piece,
                                      fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        model = tokenizers.models.Unigram([(p.piece, p.score) for p in pieces], unk, trainer.byte_fallback)
    else:
        kind = sp_model.TrainerSpec.ModelType.Name(trainer.model_type)
        raise HFConversionError(f"{path}: a SentencePiece {kind} model has no Hugging Face tokenizer; "
                                "train the run's tokenizer with tokenizer.model_type=bpe or unigram")
    tokenizer = tokenizers.Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
         *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])])
    special = [p.piece for p in pieces if p.type in (_Type.CONTROL, _Type.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [p.piece for p in pieces if p.type == _Type.USER_DEFINED]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=_is_special_symbol(t)) for t in user])
    return tokenizer


def _is_special_symbol(text: str) -> bool:
    return text in _SPECIAL_SYMBOLS or (text.startswith("<extra_id_") and text.endswith(">"))


def _merges(pieces: list) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model: each split of a normal piece into two pieces that may
    take part in merges, ranked by the piece's score (higher first), then by the parts' ids."""
    ids = {p.piece: i for i, p in enumerate(pieces) if p.type == _Type.NORMAL}
    merges = []
    for piece, i in ids.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += [(-pieces[i].score, i, ids[a], ids[b], a, b) for a, b in pairs]
    return [(a, b) for *_, a, b in sorted(merges)]


def _special_tokens(proto: sp_model.ModelProto) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the model's control pieces by the trainer's ids, and the user-defined
    [CLS] [SEP] [MASK] when it has them."""
    pieces, trainer = proto.pieces, proto.trainer_spec
    named = {}
    for key, i in (("unk_token", trainer.unk_id), ("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id),
                   ("pad_token", trainer.pad_id)):
        if 0 <= i < len(pieces):
            named[key] = pieces[i].piece
    user = {p.piece for p in pieces if p.type == _Type.USER_DEFINED}
    for key, symbol in zip(("cls_token", "sep_token", "mask_token"), _SPECIAL_SYMBOLS, strict=True):
        if symbol in user:
            named[key] = symbol
    return named


def _post_processor(model: ModelConfig, named: dict[str, str], tokenizer: tokenizers.Tokenizer):
    """What our generate and training put around text, for AutoTokenizer's add_special_tokens=True."""
    family = model.family

    def ids(*keys: str) -> list[tuple[str, int]] | None:
        if not all(k in named for k in keys):
            return None
        return [(named[k], tokenizer.token_to_id(named[k])) for k in dict.fromkeys(keys)]

    if family.encoder:
        special = ids("cls_token", "sep_token")
        single, pair = ("{cls} $A {sep}", "{cls} $A {sep} $B:1 {sep}:1")
    elif family.encoder_decoder:
        special = ids("eos_token")
        single, pair = ("$A {eos}", "$A {eos} $B:1 {eos}:1")
    else:
        special = ids("bos_token")
        single, pair = ("{bos} $A", "{bos} $A {bos}:1 $B:1")
    if special is None:
        return None
    fill = {"cls": named.get("cls_token"), "sep": named.get("sep_token"), "eos": named.get("eos_token"),
            "bos": named.get("bos_token")}
    return processors.TemplateProcessing(single=single.format(**fill), pair=pair.format(**fill), special_tokens=special)


def _write_configs(out: Path, named: dict[str, str], model: ModelConfig | None) -> None:
    """tokenizer_config.json and special_tokens_map.json: the class that reads tokenizer.json as it is,
    the special tokens, the longest input, and no clean-up of spaces (decoding gives our text)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **named}
    if model is not None:
        config["model_max_length"] = model.max_len
    (out / CONFIG_NAMES[0]).write_text(json.dumps(config, indent=2) + "\n")
    (out / CONFIG_NAMES[1]).write_text(json.dumps(named, indent=2) + "\n")
