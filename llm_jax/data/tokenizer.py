"""The run's tokenizer: SentencePiece trained on a sample of the corpus on the first run, or one given
by `tokenizer.path` (a SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a folder holding
either), then reused.

The tokenizer of a run lives in `WORKDIR/tokenizer/`: `spm.model` (+ `spm.vocab` for people to read),
or `tokenizer.json` (+ `tokenizer_config.json` / `special_tokens_map.json` naming its special tokens,
data/hf_tokenizer.py). A resumed run finds it there and loads it, so the ids the checkpoint was trained
with never change. A tokenizer given by `tokenizer.path` is copied there too, so the workdir alone is
enough to evaluate or generate later. `open_tokenizer` picks the implementation from the files present;
both have one interface (`Tokenizer`'s), so nothing downstream asks which it has. A Hugging Face folder
with only a SentencePiece model (`tokenizer.model` of Llama-2, `spiece.model` of T5) becomes `spm.model`,
with the tokens transformers adds after the SentencePiece vocabulary (T5's sentinels, in its descending
order) appended as user-defined pieces, so the ids are transformers' own.

Training settings are chosen for source code and exact round trips: identity normalization, no
dummy prefix, no whitespace squeezing (indentation is meaning in Python), whitespace-only pieces
allowed, and byte fallback so that any text, even characters never seen, encodes without <unk>.

Reserved ids: pad 0, unk 1, bos 2, eos 3. A tokenizer trained for a masked-LM run
(`train.objective=mlm`, e.g. `model.arch=bert`) also reserves `[CLS]` 4, `[SEP]` 5 and `[MASK]` 6 as
user-defined symbols, so each is always one piece, also inside text (`"for i in [MASK](10):"`
encodes the mask as id 6); `tokenizer.user_defined_symbols` follow them (from 4 in a clm run). A
tokenizer given or found for an mlm run must hold these three pieces (any ids); the masking never
selects, and never inserts at random, any special id (`Tokenizer.special_ids`). A span-corruption or
seq2seq run (encoder-decoder, e.g. `model.arch=t5`) reserves instead T5's sentinels `<extra_id_0>`
... `<extra_id_{N-1}>` (N = tokenizer.extra_ids: ids 4 ... 3 + N), which a tokenizer given or found
for such a run must hold too (`Tokenizer.sentinel_ids`); as user-defined symbols they are never split
and are special ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_model

from llm_jax.config import Config, ConfigError
from llm_jax.config.checks import reserved_symbols, sentinel_symbols
from llm_jax.data.hf_tokenizer import CONFIG_NAMES, JSON_NAME, HFTokenizer, HFTokenizerError
from llm_jax.runtime.faults import MachineFault, first_line

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The symbols a masked-LM run reserves (config.checks.MLM_SYMBOLS), right after the four above: ids 4, 5, 6.
CLS_ID, SEP_ID, MASK_ID = 4, 5, 6
MODEL_NAME = "spm.model"

# SentencePiece drops training sentences longer than max_sentence_length bytes, so documents are
# cut into runs of whole lines below this size (newlines stay inside, so pieces may hold "\n").
_SENTENCE_BYTES = 2048
# No single document may fill more than this share of the sample: keeps it diverse.
_MAX_DOC_SHARE = 0.02
# Above this sample size unigram training stops being quick (measured: ~10 s per MB on 2 cores,
# against ~1 s for 4 MB with BPE), so a larger unigram sample gets a warning.
_UNIGRAM_FAST_BYTES = 1_000_000


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with the ids the data pipeline uses.

    `cls_id`, `sep_id`, `mask_id` are None when the model has no such user-defined piece (a
    tokenizer trained for a clm run). `sentinel_ids` are the ids of <extra_id_0>, <extra_id_1>, ...
    in that order, as far as the model has them (empty for a tokenizer trained for clm or mlm).
    `special_ids` lists, ascending, every id that is not text: pad, unk, bos, eos (any control
    piece) and every user-defined symbol ([CLS], [SEP], [MASK] and the sentinels among them).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._load(spm.SentencePieceProcessor(model_file=os.fspath(self.path)))

    def _load(self, sp: spm.SentencePieceProcessor) -> None:
        self._sp = sp
        self.vocab_size: int = sp.get_piece_size()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        # SentencePiece's Python API cannot tell a user-defined piece: its type is in the model proto.
        proto = sp_model.ModelProto.FromString(sp.serialized_model_proto())
        kind = proto.SentencePiece.Type
        self.user_defined: dict[str, int] = {
            p.piece: i for i, p in enumerate(proto.pieces) if p.type == kind.USER_DEFINED}
        self.cls_id: int | None = self.user_defined.get("[CLS]")
        self.sep_id: int | None = self.user_defined.get("[SEP]")
        self.mask_id: int | None = self.user_defined.get("[MASK]")
        sentinels = []
        while f"<extra_id_{len(sentinels)}>" in self.user_defined:
            sentinels.append(self.user_defined[f"<extra_id_{len(sentinels)}>"])
        self.sentinel_ids: tuple[int, ...] = tuple(sentinels)
        # Not text: control pieces (pad, bos, eos, any other), unk, unused ones and user symbols.
        not_text = (kind.CONTROL, kind.UNKNOWN, kind.UNUSED, kind.USER_DEFINED)
        self.special_ids: tuple[int, ...] = tuple(i for i, p in enumerate(proto.pieces) if p.type in not_text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (the data pipeline adds them per document)."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; control ids (pad, bos, eos) decode to nothing, and so do ids beyond the
        tokenizer's pieces: a model's vocabulary may be padded past them (T5's 32128 rows for 32100
        pieces), and a model can still emit such an id."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size])

    def piece_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: the UTF-8 bytes of text each id stands for (a word's leading space, the
        piece's "\u2581", counted; a byte-fallback piece is one byte; ids that are not text, 0). Summed
        over scored targets it gives the bytes behind a loss, for bits per byte."""
        sizes = np.zeros(self.vocab_size, np.int64)
        special = set(self.special_ids)
        for i in range(self.vocab_size):
            if i in special:
                continue
            piece = self._sp.id_to_piece(i)
            is_byte = self._sp.is_byte(i)
            sizes[i] = 1 if is_byte else len(piece.replace("\u2581", " ").encode("utf-8"))
        return sizes

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, on all CPU cores (SentencePiece's own threads)."""
        return self._sp.encode(texts, num_threads=max(1, os.cpu_count() or 1))

    # Grain worker processes receive the tokenizer pickled: the model travels as bytes, so a worker
    # needs no access to the file (another host, a temporary folder already gone).
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "model": self._sp.serialized_model_proto()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._load(spm.SentencePieceProcessor(model_proto=state["model"]))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"


AnyTokenizer = Tokenizer | HFTokenizer
# The files of a run's tokenizer folder, in the order they are moved into place: the file that marks a
# tokenizer as present (spm.model or tokenizer.json, `tokenizer_file`) comes last.
TOKENIZER_FILES = ("spm.vocab", "summary.json", *CONFIG_NAMES, MODEL_NAME, JSON_NAME)
# SentencePiece models in Hugging Face folders: Llama-2's and T5's names.
_HF_SPM_NAMES = ("tokenizer.model", "spiece.model")


def tokenizer_file(folder: str | os.PathLike) -> Path | None:
    """The file that holds the tokenizer of a run's (or an export's) tokenizer folder: spm.model or
    tokenizer.json; None when there is neither."""
    for name in (MODEL_NAME, JSON_NAME):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def open_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer in `path`: a SentencePiece model, a tokenizer.json, or a folder holding either.

    Raises RuntimeError/OSError (SentencePiece) or HFTokenizerError (tokenizer.json) when unreadable.
    """
    path = Path(path)
    if path.is_dir():
        found = tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds neither {MODEL_NAME} nor {JSON_NAME}")
        path = found
    return HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)


def _hf_added_tokens(folder: Path) -> dict[int, str]:
    """{id: text} of the tokens transformers adds to a SentencePiece model of a Hugging Face folder:
    tokenizer_config.json's added_tokens_decoder, else added_tokens.json, else T5's `extra_ids`
    sentinels (<extra_id_0> last, as T5Tokenizer numbers them)."""
    config_file, added_file = folder / "tokenizer_config.json", folder / "added_tokens.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("added_tokens_decoder"):
        return {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    if added_file.is_file():
        return {int(i): t for t, i in json.loads(added_file.read_text(encoding="utf-8")).items()}
    extra = int(config.get("extra_ids", 100 if str(config.get("tokenizer_class", "")).startswith("T5") else 0))
    return {-1 - k: f"<extra_id_{k}>" for k in range(extra)}  # -1: the last id after the model's pieces


def hf_spm_model(model_file: Path) -> bytes:
    """The SentencePiece model of a Hugging Face folder with the tokens transformers adds after its
    pieces appended as user-defined pieces, at the ids transformers gives them."""
    proto = sp_model.ModelProto.FromString(model_file.read_bytes())
    n = len(proto.pieces)
    added = _hf_added_tokens(model_file.parent)
    if any(i < 0 for i in added):
        added = {n + len(added) + i: t for i, t in added.items()}
    extra = {i: t for i, t in added.items() if i >= n}
    if sorted(extra) != list(range(n, n + len(extra))):
        raise ConfigError(f"{model_file.parent}: the added tokens' ids {sorted(extra)[:4]}... do not follow the "
                          f"{n} pieces of {model_file.name}")
    for i in sorted(extra):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = extra[i], 0.0, sp_model.ModelProto.SentencePiece.Type.USER_DEFINED
    return proto.SerializeToString()


def copy_tokenizer(given: Path, dest: Path, key: str = "tokenizer.path") -> None:
    """Writes into `dest` the files of the tokenizer `given` names (a SentencePiece model, a tokenizer.json
    with the configs beside it, a run's or an export's tokenizer folder, or a Hugging Face model folder),
    as a run's tokenizer folder holds them. Raises ConfigError naming `key` when there is none."""
    if given.is_dir():
        found = tokenizer_file(given) or next(
            (given / n for n in _HF_SPM_NAMES if (given / n).is_file()), None)
        if found is None:
            raise ConfigError(f"{key}: {given} holds no tokenizer ({MODEL_NAME}, {JSON_NAME}, "
                              f"{' or '.join(_HF_SPM_NAMES)})")
        given = found
    elif not given.is_file():
        raise ConfigError(f"{key}: no such file {given}")
    if given.suffix == ".json":
        shutil.copyfile(given, dest / JSON_NAME)
        for name in CONFIG_NAMES:
            if (given.parent / name).is_file():
                shutil.copyfile(given.parent / name, dest / name)
    elif given.name in _HF_SPM_NAMES:
        try:
            (dest / MODEL_NAME).write_bytes(hf_spm_model(given))
        except DecodeError as e:
            raise ConfigError(f"{key}: {given} is not a SentencePiece model ({e})") from None
    else:
        shutil.copyfile(given, dest / MODEL_NAME)
        if given.with_suffix(".vocab").is_file():
            shutil.copyfile(given.with_suffix(".vocab"), dest / "spm.vocab")


def training_symbols(config: Config) -> tuple[str, ...]:
    """The user-defined symbols a tokenizer trained for `config` gets, in id order from 4: the
    objective's reserved symbols (masked LM: [CLS] [SEP] [MASK]; span, seq2seq: the sentinels), then
    tokenizer.user_defined_symbols (without repeats)."""
    return tuple(dict.fromkeys((*reserved_symbols(config), *config.tokenizer.user_defined_symbols)))


# ----------------------------------------------------------------------------- sampling


def sample_documents(source: Any, sample_bytes: int, seed: int = 0) -> list[str]:
    """About `sample_bytes` of text from a random-access `source` of documents.

    Documents are visited in a seeded random order, so the sample spans the whole corpus rather
    than its first files; each contributes at most a small share, whole lines only. A seq2seq
    example (an (input, target) pair) gives both texts: the tokenizer must know both sides' words.
    """
    n = len(source)
    if n == 0:
        return []
    max_doc_bytes = max(_SENTENCE_BYTES, int(sample_bytes * _MAX_DOC_SHARE))
    order = np.random.default_rng(seed).permutation(n)
    texts, total = [], 0
    for index in order:
        text = source[int(index)]
        if isinstance(text, tuple):
            text = "\n".join(text)
        if len(text.encode("utf-8")) > max_doc_bytes:
            text = _cut_at_line(text, max_doc_bytes)
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= sample_bytes:
            break
    return texts


def _cut_at_line(text: str, max_bytes: int) -> str:
    """A prefix of `text` of at most `max_bytes` (UTF-8), ending at a line end when there is one."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    newline = head.rfind("\n")
    return head[: newline + 1] if newline > 0 else head


def _sentences(texts: list[str]) -> Iterator[str]:
    """Runs of whole lines of at most _SENTENCE_BYTES; a longer single line is cut."""
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > _SENTENCE_BYTES:
                yield "".join(buf)
                buf, size = [], 0
            while n > _SENTENCE_BYTES:  # one very long line (minified data): cut at the limit
                part = _cut_at_line(line, _SENTENCE_BYTES)
                yield part
                line = line[len(part):]
                n = len(line.encode("utf-8"))
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


# ----------------------------------------------------------------------------- training


def train_tokenizer(texts: list[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
                    byte_fallback: bool = True, user_defined_symbols: Sequence[str] = ()) -> None:
    """Trains a SentencePiece model into `model_prefix`.model/.vocab.

    Raises ConfigError (one line naming model.vocab_size) when the text cannot support that many
    pieces, instead of SentencePiece's internal-check traceback.
    """
    if not texts:
        raise ConfigError("no text to train the tokenizer on: the training split is empty")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_prefix=os.fspath(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            character_coverage=0.9995 if byte_fallback else 1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_SENTENCE_BYTES * 4,
            input_sentence_size=0,  # the sample is already the size we want
            num_threads=max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(e))
        if too_high is not None:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is too large for this corpus: its tokenizer sample supports "
                f"at most {too_high.group(2)} pieces; lower model.vocab_size, raise tokenizer.sample_bytes "
                "or give more text"
            ) from None
        too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if too_low is not None:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is too small for this corpus: its special tokens, bytes and "
                f"characters need at least {too_low.group(2)} pieces; raise model.vocab_size"
            ) from None
        raise


def _check_loaded(tokenizer: AnyTokenizer, config: Config, shown_path: str | os.PathLike | None = None) -> AnyTokenizer:
    """Refuses a tokenizer this config cannot train with; `shown_path` is the file named in the
    errors (the user's tokenizer.path, not the temporary copy that was loaded).

    The ids each family puts around text must exist: a decoder starts documents and prompts with bos
    and ends them with eos; an encoder-decoder ends inputs and targets with eos (its decoder starts
    from pad, id 0, data/pipeline.py); an encoder frames text with [CLS] ... [SEP] and masks with [MASK].
    Padding needs no id of its own: it is id 0 with weight 0 everywhere.
    """
    shown = tokenizer.path if shown_path is None else shown_path
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}) in {shown}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    family = config.model.family
    where = "tokenizer.path" if config.tokenizer.path else "workdir"
    needs = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    if family.encoder_decoder:
        needs = {"eos": tokenizer.eos_id}
    elif family.encoder:
        needs = {"[CLS]": tokenizer.cls_id, "[SEP]": tokenizer.sep_id}
        if config.objective == "mlm":
            needs["[MASK]"] = tokenizer.mask_id
    missing = [name for name, i in needs.items() if i is None or i < 0]
    if missing:
        what = "train.objective=mlm" if config.objective == "mlm" else f"model.arch={config.model.arch}"
        raise ConfigError(
            f"{where}: the tokenizer {shown} lacks {', '.join(missing)}, which {what} needs; train one for it "
            f"(a fresh workdir without tokenizer.path, or `llm-jax tokenizer train model.arch={config.model.arch}`) "
            "or give one that has them (SentencePiece: as control or user-defined pieces; tokenizer.json: "
            "named in tokenizer_config.json)")
    needed = len(sentinel_symbols(config.tokenizer.extra_ids)) if config.objective in ("span", "seq2seq") else 0
    if len(tokenizer.sentinel_ids) < needed:
        raise ConfigError(
            f"{where}: the tokenizer {shown} has {len(tokenizer.sentinel_ids)} of the {needed} sentinels "
            f"<extra_id_0> ... <extra_id_{needed - 1}> (tokenizer.extra_ids) that train.objective={config.objective} "
            "needs; train one for it (a fresh workdir without tokenizer.path, or `llm-jax tokenizer train "
            "model.arch=t5`), give one that has them as user-defined symbols, or lower tokenizer.extra_ids")
    return tokenizer


def _train_into(config: Config, sources: Any, model_dir: Path) -> dict[str, Any]:
    """Trains the configured tokenizer on a sample of `sources.train` into `model_dir`/spm.*.

    Returns what was done, for logs and the `tokenizer train` summary.
    """
    t = config.tokenizer
    start = time.perf_counter()
    if t.model_type == "unigram" and t.sample_bytes > _UNIGRAM_FAST_BYTES:
        log.warning("unigram training takes about 10 s per MB of sample on 2 CPU cores; "
                    "tokenizer.sample_bytes=%d (bpe takes about 1 s for 4 MB)", t.sample_bytes)
    texts = sample_documents(sources.train, t.sample_bytes, seed=config.seed)
    nbytes = sum(len(text.encode("utf-8")) for text in texts)
    train_tokenizer(texts, model_dir / "spm", config.model.vocab_size, t.model_type, t.byte_fallback,
                    training_symbols(config))
    seconds = time.perf_counter() - start
    log.info("trained a %s tokenizer of %d pieces on %d documents (%.1f MB) in %.1fs",
             t.model_type, config.model.vocab_size, len(texts), nbytes / 1e6, seconds)
    return {"sample_documents": len(texts), "sample_bytes": nbytes, "train_seconds": round(seconds, 2)}


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """spm.model or tokenizer.json last: it is what marks a tokenizer as present."""
    for name in TOKENIZER_FILES:
        if (tmp_dir / name).is_file():
            os.replace(tmp_dir / name, out_dir / name)


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float | None:
    """UTF-8 bytes per token over `texts` (higher: the tokenizer compresses better); None without text."""
    tokens = sum(len(ids) for ids in tokenizer.encode_many(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / tokens if tokens else None


# Held-out text measured by `train_tokenizer_into`: enough for a stable ratio, seconds to encode.
_HELD_OUT_BYTES = 1_000_000


def train_tokenizer_into(config: Config, sources: Any, out_dir: str | os.PathLike) -> dict[str, Any]:
    """`llm-jax tokenizer train`: trains into `out_dir` (spm.model, spm.vocab, summary.json).

    The summary holds the vocabulary size and the bytes per token on a sample of the held-out split
    (`sources.eval`), which the tokenizer never saw. An existing model in `out_dir` is never
    replaced: a run's checkpoints depend on its ids. Raises ConfigError.
    """
    out_dir = Path(out_dir).expanduser()
    if (out_dir / MODEL_NAME).exists():
        raise ConfigError(f"{out_dir / MODEL_NAME} exists; a trained tokenizer is never replaced "
                          "(choose another --out or workdir)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_dir))
    try:
        done = _train_into(config, sources, tmp_dir)
        tokenizer = Tokenizer(tmp_dir / MODEL_NAME)
        held_out = sample_documents(sources.eval, _HELD_OUT_BYTES, seed=config.seed)
        ratio = bytes_per_token(tokenizer, held_out)
        summary = {
            "model": os.fspath(out_dir / MODEL_NAME),
            "vocab_size": tokenizer.vocab_size,
            "model_type": config.tokenizer.model_type,
            "byte_fallback": config.tokenizer.byte_fallback,
            "user_defined_symbols": list(training_symbols(config)),
            **done,
            "held_out_documents": len(held_out),
            "held_out_bytes": sum(len(t.encode("utf-8")) for t in held_out),
            "held_out_bytes_per_token": None if ratio is None else round(ratio, 4),
        }
        (tmp_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return summary


def _load_own(model_path: Path) -> AnyTokenizer:
    """The run's own tokenizer; a damaged one (a copy or a disk cut it short) is named, with the fix."""
    try:
        return open_tokenizer(model_path)
    except (RuntimeError, OSError, HFTokenizerError) as e:
        reason = first_line(e)
        raise MachineFault(
            f"the run's tokenizer {model_path} is damaged ({reason}); delete it and run again: the run trains "
            "it anew from the same corpus and settings, or copies tokenizer.path (e.g. an export's "
            "tokenizer/ folder)") from None


def _write_run_tokenizer(config: Config, sources: Any, out_dir: Path) -> None:
    """Puts the run's tokenizer in `out_dir` unless it is there: tokenizer.path copied, else trained.

    Writes go to a temporary folder that is renamed into place, so an interrupted run never leaves
    a truncated model for the next run to load.
    """
    if tokenizer_file(out_dir) is not None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".spm-", dir=out_dir))
    try:
        if config.tokenizer.path:
            given = Path(config.tokenizer.path).expanduser()
            copy_tokenizer(given, tmp_dir)
            try:
                tokenizer = open_tokenizer(tmp_dir)
            except (RuntimeError, OSError, HFTokenizerError) as e:
                reason = first_line(e)
                raise ConfigError(f"tokenizer.path: {given} is not a SentencePiece model or a Hugging Face "
                                  f"tokenizer.json ({reason})") from None
            _check_loaded(tokenizer, config, shown_path=given)
            log.info("using tokenizer %s", given)
        else:
            _train_into(config, sources, tmp_dir)
        _move_into_place(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_run_tokenizer(config: Config, workdir: str | os.PathLike) -> AnyTokenizer | None:
    """The tokenizer a run has already written (WORKDIR/tokenizer/spm.model or tokenizer.json), or None:
    what generation reads, without the data that trained it."""
    model_path = tokenizer_file(Path(workdir) / "tokenizer")
    if model_path is None:
        return None
    log.info("loading tokenizer %s", model_path)
    return _check_loaded(_load_own(model_path), config)


def load_or_train_tokenizer(config: Config, workdir: str | os.PathLike, sources: Any) -> AnyTokenizer:
    """The run's tokenizer: WORKDIR/tokenizer/ if it holds one, else tokenizer.path, else trained.

    `sources` is a `data.DataSources`; only `sources.train` is read (a sample of it). With several
    processes, process 0 alone trains (or copies) it while the others wait at a barrier, then all
    load the same file: one tokenizer per run, in the workdir they share.
    """
    import jax  # here, not at the top: data worker processes unpickle Tokenizers without JAX

    out_dir = Path(workdir) / "tokenizer"
    if jax.process_count() == 1:
        _write_run_tokenizer(config, sources, out_dir)
    else:
        from jax.experimental import multihost_utils

        failure = None
        if jax.process_index() == 0:
            try:
                _write_run_tokenizer(config, sources, out_dir)
            except Exception as e:  # raised after the barrier, so the others are not left waiting
                failure = e
        multihost_utils.sync_global_devices("llm_jax_tokenizer")  # every process, every run: no one waits alone
        if failure is not None:
            raise failure
        if tokenizer_file(out_dir) is None:
            raise ConfigError(f"workdir: process {jax.process_index()} finds no tokenizer in {out_dir} "
                              "after process 0's turn to write it: process 0 failed (see its log) or the workdir "
                              "is not shared")
    model_path = tokenizer_file(out_dir)
    log.info("loading tokenizer %s", model_path)
    return _check_loaded(_load_own(model_path), config)
