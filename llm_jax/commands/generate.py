"""`llm-jax generate`: prompts in (options or a file), texts out (stdout, JSONL, or streamed as they grow).

Text <-> ids as training sees them (loop.sample_text): a decoder reads `[bos] prompt` and continues
it; an encoder-decoder reads `prompt [eos]` as its input and generates the target.

Stop strings are decided on the host, after the compiled loop has run (the device knows ids, not
text): a generation's text is cut just before the first place any stop string appears, its ids cut
to the shortest prefix whose text holds it, its log-probability summed over those ids (beam search:
the whole beam's), and its finish_reason is "stop". The loop itself stops only at eos and
max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import jax

from llm_jax.config import ConfigError
from llm_jax.infer.generate import Decoding, Generation, generate_batch

log = logging.getLogger(__name__)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a text file; or a JSONL file (*.jsonl, or every line a JSON object)
    whose objects hold a "prompt" field. Empty lines are skipped."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"generate --input {path} holds no prompt")
    if str(path).endswith(".jsonl") or all(line.lstrip().startswith("{") for line in lines):
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"generate --input {path}:{n} is not JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"generate --input {path}:{n} has no \"prompt\" string field")
            prompts.append(record["prompt"])
        return prompts
    return lines


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Where `text` is cut: the earliest start of any stop string in it, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def prompt_ids(tokenizer, prompt: str, encoder_decoder: bool) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ids + [tokenizer.eos_id] if encoder_decoder else [tokenizer.bos_id] + ids


def new_text(tokenizer, head_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after `head_ids` (a decoder's prompt; [] for an encoder-decoder's target).
    Decoded together, as SentencePiece gives a word's leading space only after other text."""
    head = tokenizer.decode(head_ids)
    full = tokenizer.decode(head_ids + ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids)


def worded(tokenizer, head_ids: list[int], generation: Generation,
           stops: list[str]) -> tuple[list[int], str, int | None]:
    """(the ids of a generation's text: its eos left out, that text, where a stop string cuts it or None)."""
    tokens = list(generation.tokens)
    text_ids = tokens[:-1] if generation.finish_reason == "eos" else tokens
    text = new_text(tokenizer, head_ids, text_ids)
    return text_ids, text, cut_at_stop(text, stops)


def _record(tokenizer, prompt: str, head_ids: list[int], generation: Generation,
            stops: list[str]) -> dict[str, Any]:
    """The JSONL record of one generation: prompt, text (the new text alone), tokens (the new ids),
    finish_reason, logprob (and score, for beam search)."""
    tokens = list(generation.tokens)
    text_ids, text, cut = worded(tokenizer, head_ids, generation, stops)
    reason, logprob = generation.finish_reason, generation.logprob
    if cut is not None:
        text, reason = text[:cut], "stop"
        kept = next(n for n in range(1, len(text_ids) + 1)
                    if cut_at_stop(new_text(tokenizer, head_ids, text_ids[:n]), stops) is not None)
        tokens = text_ids[:kept]
        if generation.token_logprobs is not None:
            logprob = sum(generation.token_logprobs[:kept])
    record = {"prompt": prompt, "text": text, "tokens": tokens, "finish_reason": reason, "logprob": logprob}
    if generation.score is not None:
        record["score"] = generation.score
    return record


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins some stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class _Streamer:
    """Prints one row's text as its ids arrive (the host callback of the compiled loop), then a newline.
    The text is decoded whole at each step and the new part printed, as SentencePiece joins pieces;
    an end that may begin a stop string waits until the next ids tell."""

    def __init__(self, tokenizer, head: str, head_ids: list[int], out: TextIO, stops: list[str]):
        self.tokenizer, self.head_ids, self.out, self.stops = tokenizer, head_ids, out, stops
        self.ids: list[int] = []
        self.shown = ""
        self.ended = False  # eos, or the row stopped running
        self.stopped = False  # a stop string appeared: the text is final
        out.write(head)
        out.flush()

    def __call__(self, step: int, token_R, running_R) -> None:
        if self.ended or self.stopped or not bool(running_R[0]):
            return
        token = int(token_R[0])
        if token == self.tokenizer.eos_id:
            self.ended = True
            return
        self.ids.append(token)
        text = new_text(self.tokenizer, self.head_ids, self.ids)
        cut = cut_at_stop(text, self.stops)
        if cut is not None:
            text, self.stopped = text[:cut], True
        else:  # hold back what may be the start of a stop string
            text = text[:len(text) - _stop_prefix_len(text, self.stops)]
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def end(self) -> None:
        if not self.stopped:  # the held-back end of the text, no stop string after all
            text = new_text(self.tokenizer, self.head_ids, self.ids)
            self.out.write(text[len(self.shown):] if text.startswith(self.shown) else "")
        self.out.write("\n")
        self.out.flush()


def _fit_learned_positions(model_config, decoding: Decoding, longest_prompt: int) -> Decoding:
    """A decoder with learned positions can write no more than its table holds: fewer new tokens than
    asked, said aloud (a silently short answer looks like a bug); none left is an error."""
    if model_config.family.encoder_decoder or model_config.resolved_position != "learned":
        return decoding
    room = model_config.max_len - longest_prompt
    if room < 1:
        raise ConfigError(f"a prompt of {longest_prompt} tokens fills the model's {model_config.max_len} "
                          "positions (model.max_len): no room to generate")
    if decoding.max_new_tokens <= room:
        return decoding
    log.warning("generating %d new tokens, not the %d asked: the model's %d positions less the longest "
                "prompt's %d leave no room for more", room, decoding.max_new_tokens, model_config.max_len,
                longest_prompt)
    return dataclasses.replace(decoding, max_new_tokens=room, min_new_tokens=min(decoding.min_new_tokens, room))


def generate_texts(setup, params, prompts: list[str], decoding: Decoding, *, stops: list[str], seed: int,
                   batch_size: int, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """The JSONL records of every prompt's generations, in order (num_return_sequences per prompt).

    `stream`: print each prompt's text there as it is generated, a line per prompt (its prompt first
    for a decoder); prompts then go one at a time, and only greedy or sampled decoding streams."""
    tok = setup.tokenizer
    encoder_decoder = setup.config.model.family.encoder_decoder
    if stream is not None and (decoding.num_beams > 1 or decoding.num_return_sequences > 1):
        raise ConfigError("generate --stream shows one sequence per prompt as it grows: not with --num-beams or "
                          "--num-return-sequences above 1 (beam search knows its best beam only at the end)")
    ids = [prompt_ids(tok, p, encoder_decoder) for p in prompts]
    decoding = _fit_learned_positions(setup.config.model, decoding, max(map(len, ids)))
    rng = jax.random.key(seed)
    try:
        with setup.context(split_batch=False):
            if stream is None:
                results = generate_batch(setup.model, params, ids, decoding, rng=rng, eos_id=tok.eos_id,
                                         batch_size=batch_size)
            else:
                results = []
                for prompt, p_ids in zip(prompts, ids):
                    head = ("", []) if encoder_decoder else (prompt, p_ids)
                    streamer = _Streamer(tok, *head, stream, stops)
                    results += generate_batch(setup.model, params, [p_ids], decoding, rng=rng, eos_id=tok.eos_id,
                                              batch_size=1, on_step=streamer)
                    streamer.end()
    except ValueError as e:  # a prompt too long for the model's positions, an impossible option
        raise ConfigError(str(e)) from None
    heads = [[] if encoder_decoder else p_ids for p_ids in ids]
    return [_record(tok, prompt, head, g, stops) for prompt, head, gens in zip(prompts, heads, results) for g in gens]


def write_records(records: list[dict[str, Any]], path: str | None, *, encoder_decoder: bool) -> None:
    """JSONL to `path`; without one, each text on stdout (a decoder's after its prompt)."""
    if path is None:
        for r in records:
            print(r["text"] if encoder_decoder else r["prompt"] + r["text"])
        return
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(records)} generations -> {path}", file=sys.stderr)
