"""EleutherAI's lm-evaluation-harness scoring an llm_jax run or export: the lm-eval model `llm_jax`.

lm-eval finds models in its own registry only (lm_eval.api.registry; version 0.4 reads no entry
points), so `lm_eval --model llm_jax` knows this model once this module is imported in its process.
Three ways in, the same adapter behind each:
- `llm-jax harness WORKDIR --tasks T[,T]` (commands/harness.py),
- `python -m llm_jax.commands.harness --model llm_jax --model_args workdir=WORKDIR --tasks T`: lm_eval's
  own command line, every flag of it, with this module imported first,
- Python: `import llm_jax.commands.lm_eval_model`, then `lm_eval.simple_evaluate(model="llm_jax",
  model_args="workdir=WORKDIR", tasks=[...])`, or `model=LLMJaxLM(...)`.

A command-level module: it reads a run (train/loop.py) and words its texts as `llm-jax generate`
does (commands/generate.py); the numbers come from infer/scoring.py and infer/generate.py.

Token boundaries are those of lm-eval's Hugging Face adapter (TemplateLM, which this class extends):
a context's trailing spaces move to the continuation, context + continuation are encoded whole and
split where the context's own ids end (so a word keeps the ids it has in running text), and a row
longer than `max_length` loses context from the left. A decoder reads `[bos] text`, as it was trained
(data/pipeline.py); an empty context is bos alone. An encoder-decoder (t5) reads the context as its
encoder input (`context [eos]`) and scores the continuation as its target (infer/scoring.py). An
encoder (bert) has no likelihood of a continuation and is refused, as is a fine-tuned classifier.

loglikelihood_rolling: lm-eval's rolling windows (lm_eval.utils.get_rolling_token_windows, context 1,
made disjoint): every token scored once, the first after the prefix token (bos; eos for a tokenizer
without bos, as Hugging Face's adapter; with neither, the text's first token is context, not scored),
the last window given a full row of context.

generate_until: the batched compiled loop of infer/generate.py, greedy unless the request's
gen_kwargs sample (temperature, do_sample, top_k, top_p, ...), `max_gen_toks` new tokens at most, the
text cut before the first stop string (`until`). The prompt ids are cut from the left to leave room
for the new tokens within `max_length`.

Results come back in the order of the requests: each call sorts its rows by length (fewer padded
shapes, fewer compiles: scoring.score_ids buckets them) and puts the answers back in place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import lm_eval.models  # noqa: F401  lm-eval's own models, registered before ours (its registry loads them only when empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from llm_jax.commands.generate import worded
from llm_jax.config import ConfigError
from llm_jax.infer import scoring
from llm_jax.infer.generate import Decoding, generate_batch
from llm_jax.infer.sampling import Sampling
from llm_jax.train import loop

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until
# gen_kwargs read from a request besides `until`, `do_sample` and `max_gen_toks` (and its aliases): the
# Sampling / Decoding fields of those names. Another key is refused: ignoring it would score another decoding.
SAMPLING_KWARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
DECODING_KWARGS = ("num_beams", "length_penalty")


class HarnessError(ConfigError):
    """A model, option or request the adapter cannot serve: one line (exit 2 from the command line)."""


def _present(token_id: int | None) -> bool:
    return token_id is not None and token_id >= 0


@register_model("llm_jax")
class LLMJaxLM(TemplateLM):
    """An llm_jax decoder (gpt2, llama) or encoder-decoder (t5) as an lm-eval model.

    model_args: `workdir` (a run directory, its newest checkpoint; or an export: `llm-jax export`,
    `quantize`, `prune`, `hf import`), `batch_size` (rows scored or decoded together), `max_length`
    (tokens per row; default and upper bound model.max_len), `dtype` (compute dtype, e.g. float32 for
    exact comparisons), `max_gen_toks` (generate_until's default), `seed` (sampled generation).
    `device` and `max_batch_size`, which lm-eval passes to every model, are ignored: JAX places the
    model on this process's devices.

    Python users with a model in memory pass `setup` (loop.Setup: model, tokenizer, mesh) and
    `params` instead of `workdir`.
    """

    def __init__(self, workdir: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, dtype: str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, *, setup: Any = None, params: Any = None,
                 device: str | None = None, max_batch_size: int | None = None):
        super().__init__()
        del device, max_batch_size  # lm-eval's, for torch models
        if (workdir is None) == (setup is None):
            raise HarnessError("llm_jax model_args: give workdir=RUN_OR_EXPORT (or, from Python, setup= and params=)")
        if setup is None:
            overrides = [] if dtype is None else [f"model.dtype={dtype}"]
            setup, params, _ = loop.restore_for_inference(workdir, overrides, with_data=False)
        self._setup, self._params = setup, params
        self._check_model(str(workdir or "the model"))
        model_config = setup.config.model
        self._encoder_decoder = model_config.family.encoder_decoder
        self.backend = "seq2seq" if self._encoder_decoder else "causal"  # TemplateLM._encode_pair's switch
        self._batch_size = _batch_size(batch_size)
        self._max_length = int(max_length or model_config.max_len)
        if not 0 < self._max_length <= model_config.max_len:
            raise HarnessError(f"llm_jax model_args: max_length must be in [1, model.max_len={model_config.max_len}], "
                               f"got {max_length}")
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        tok = setup.tokenizer
        self.tokenizer = tok
        bos, eos = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
        self._bos = bos if _present(bos) else None
        self._eos = eos if _present(eos) else None

    def _check_model(self, where: str) -> None:
        config = self._setup.config
        if config.task.kind != "lm":
            raise HarnessError(f"lm-eval scores language models; {where} is fine-tuned for "
                               f"task.kind={config.task.kind} (use llm-jax predict)")
        if config.model.family.encoder:
            raise HarnessError(f"lm-eval scores the likelihood of text given text; {where} is an encoder "
                               f"(model.arch={config.model.arch}), which has none: use a decoder or an "
                               "encoder-decoder")

    # ------------------------------------------------------------------ what TemplateLM asks of a model

    @property
    def eot_token_id(self) -> int | None:
        return self._eos

    @property
    def prefix_token_id(self) -> int | None:
        """What an empty context is: bos for a decoder (eos without one), eos for an encoder-decoder
        (its encoder input ends with eos)."""
        if self._encoder_decoder:
            return self._eos
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids as the model reads them: a decoder's after bos, an encoder-decoder's input ended by
        eos; `add_special_tokens=False` (a continuation encoded alone): the text's ids only."""
        del kwargs
        ids = list(self.tokenizer.encode(string)) if string else []
        if add_special_tokens is False:
            return ids
        if self._encoder_decoder:
            return ids + ([self._eos] if self._eos is not None else [])
        return ([self._bos] if self._bos is not None else []) + ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ the three requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation ids | context ids), greedy) per ((context, continuation), context ids,
        continuation ids), in order; TemplateLM.loglikelihood prepares them from text."""
        del disable_tqdm, kwargs
        pairs = [(list(context), list(cont)) for _, context, cont in requests]
        if any(None in context for context, _ in pairs):  # TemplateLM's stand-in for an empty context
            raise HarnessError("llm_jax loglikelihood: an empty context is read as bos (or eos), and this "
                               "tokenizer has neither")
        results = self._score(pairs)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """scoring.score_ids, longest rows first (few padded shapes), answers put back in order."""
        if not pairs:
            return []
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        try:
            with self._setup.context(split_batch=False):
                scored = scoring.score_ids(self._setup.model, self._params, [pairs[i] for i in order],
                                           batch_size=self._batch_size, max_len=self._max_length)
        except ValueError as e:  # an empty continuation, or one longer than max_length
            raise HarnessError(f"llm_jax loglikelihood: {e}") from None
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for i, result in zip(order, scored):
            results[i] = result
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows of a text: (context ids, ids scored), every id once."""
        ids = list(self.tokenizer.encode(text)) if text else []
        prefix = self.prefix_token_id
        if prefix is None:  # no bos or eos: the first id is the first window's context, not scored
            prefix, ids = (ids[0], ids[1:]) if ids else (None, [])
        windows = lm_utils.get_rolling_token_windows(token_list=ids, prefix_token=prefix,
                                                     max_seq_len=self._max_length, context_len=1)
        return [lm_utils.make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text (a text of no tokens: 0)."""
        del disable_tqdm
        texts = [req.args[0] for req in requests]
        per_text = [self.rolling_windows(text) for text in texts]
        scores = iter(self._score([w for windows in per_text for w in windows]))
        totals = [sum(next(scores)[0] for _ in windows) for windows in per_text]
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's generated text, cut before its first stop string; requests that share
        gen_kwargs are decoded together."""
        del disable_tqdm
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        texts: list[str] = [""] * len(args)
        for indices in groups.values():
            contexts = [args[i][0] for i in indices]
            for i, text in zip(indices, self._generate(contexts, args[indices[0]][1])):
                texts[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return texts

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        decoding, stops = self.decoding(gen_kwargs)
        room = self._max_length if self._encoder_decoder else self._max_length - decoding.max_new_tokens
        if room < 1:
            raise HarnessError(f"llm_jax generate_until: max_gen_toks={decoding.max_new_tokens} leaves no room for a "
                               f"prompt within max_length={self._max_length}")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        try:
            with self._setup.context(split_batch=False):
                generations = generate_batch(self._setup.model, self._params, [prompts[i] for i in order], decoding,
                                             rng=jax.random.key(self.seed), eos_id=self._eos,
                                             batch_size=self._batch_size)
        except ValueError as e:
            raise HarnessError(f"llm_jax generate_until: {e}") from None
        texts = [""] * len(prompts)
        for i, [generation] in zip(order, generations):
            head = [] if self._encoder_decoder else prompts[i]
            _, text, cut = worded(self.tokenizer, head, generation, stops)  # as `llm-jax generate` words it
            texts[i] = text if cut is None else text[:cut]
        return texts

    def decoding(self, gen_kwargs: dict) -> tuple[Decoding, list[str]]:
        """(the Decoding, the stop strings) of a request's gen_kwargs, read as lm-eval's models read them
        (lm_eval.models.utils.normalize_gen_kwargs: do_sample=False is greedy)."""
        if not isinstance(gen_kwargs, dict):
            raise HarnessError(f"llm_jax generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        stops = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # the loop itself stops at eos
        max_new_tokens = int(kwargs.pop("max_gen_toks"))
        do_sample = kwargs.pop("do_sample", False)
        sampling, search = {}, {}
        for key, value in kwargs.items():
            if key in SAMPLING_KWARGS:
                sampling[key] = type(getattr(Sampling(), key))(value)  # int or float, as the field
            elif key in DECODING_KWARGS:
                search[key] = type(getattr(Decoding(1), key))(value)
            else:
                known = ["until", "max_gen_toks", "do_sample", *SAMPLING_KWARGS, *DECODING_KWARGS]
                raise HarnessError(f"llm_jax generate_until: gen_kwargs {key!r} is not supported (known: "
                                   f"{', '.join(known)})")
        if not do_sample:
            sampling["temperature"] = 0.0
        decoding = Decoding(max_new_tokens=max_new_tokens, sampling=Sampling(**sampling), **search)
        try:
            decoding.check()
        except ValueError as e:
            raise HarnessError(f"llm_jax generate_until: {e}") from None
        return decoding, stops


def _batch_size(value: int | str | None) -> int:
    """lm-eval's batch_size: a number (from the command line, maybe a string); "auto" (lm-eval's
    search for the largest batch that fits a GPU) is not ours: the default, said aloud."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("llm_jax: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise HarnessError(f"llm_jax model_args: batch_size must be a positive integer, got {value!r}")
    return size

