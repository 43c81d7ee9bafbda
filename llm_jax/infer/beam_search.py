"""Beam search with Hugging Face `generate`'s semantics (its `_beam_search`, transformers 5), in one
compiled loop; the beams of a prompt are rows of the batch (T5X's flattening), the cache gathered by
beam index after each step.

Per prompt and step, as Hugging Face does:
- every running beam's log-probabilities (log_softmax, then the processors: repetition penalty, eos
  masked before min_new_tokens) are added to its running sum; of the K x V continuations the best 2K
  are kept;
- a continuation ends when it chooses eos or reaches max_new_tokens. Of the 2K only those ranked in
  the first K may enter the finished set, scored sum / n ** length_penalty, n = the generated tokens
  (eos included) — for decoders as for encoder-decoders: transformers 5 counts the new tokens only
  (transformers 4 counted a decoder's prompt too);
- the K best that did not end run on (the others at -1e9);
- the finished set keeps the K best scores. It closes (no more entries) once full when
  early_stopping is True; and when the best running beam cannot beat its worst entry: with
  early_stopping False that is judged at the current length (running sum / n ** length_penalty,
  Hugging Face's heuristic), with "never" and length_penalty > 0 at max_new_tokens;
- the search ends when every prompt's set is closed, or every candidate ended.
The returned sequences are the finished set's best, in order of score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.infer import generate as gen
from llm_jax.infer import sampling
from llm_jax.models.decoder import SCANNED_LAYERS

NEG = -1.0e9  # Hugging Face's score of what may not be chosen


def gather_rows(cache, rows_R: jax.Array):
    """Every cache array's batch rows reordered by `rows_R` (a beam's parent row). The batch is axis 0,
    or axis 1 under the scanned stack (its leaves have a leading [n_layers] axis); scalars and
    per-layer indices have no batch axis and stay."""
    def take(path, leaf):
        axis = 1 if any(getattr(k, "key", None) == SCANNED_LAYERS for k in path) else 0
        return leaf if leaf.ndim <= axis else jnp.take(leaf, rows_R, axis=axis)
    return jax.tree_util.tree_map_with_path(take, cache)


def _take(x_BK, index_BJ):
    """x [B, K, ...] gathered along axis 1 by index [B, J]."""
    return jax.vmap(lambda x, i: x[i])(x_BK, index_BJ)


@functools.partial(jax.jit, static_argnames=("config", "decoding"))
def search_rows(config: ModelConfig, params, prompt_RP: jax.Array, real_RP: jax.Array, eos_id: jax.Array,
                *, decoding: gen.Decoding):
    """The compiled beam search over prepared rows R = B x K (each prompt repeated K times, side by
    side; `pad_prompts`). Returns the finished set, best first:
    (ids [B, K, N], lengths [B, K], summed log-probabilities [B, K], scores [B, K])."""
    k, n, lp = decoding.num_beams, decoding.max_new_tokens, decoding.length_penalty
    rows = prompt_RP.shape[0]
    batch = rows // k
    fn, cache, logits_RV, present_RV = gen.start(config, params, prompt_RP, real_RP, n)
    vocab = logits_RV.shape[-1]
    top_k_mask_2K = jnp.arange(2 * k) < k
    never = decoding.early_stopping == "never" and lp > 0

    def body(state):
        (step, logits_RV, present_RV, cache, run_seq_BKN, run_sum_BK, fin_seq_BKN, fin_len_BK, fin_sum_BK,
         fin_score_BK, fin_done_BK, open_B, _) = state
        logprobs_RV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1)
        logprobs_RV = gen.process_logits(logprobs_RV, present_RV, step, eos_id, decoding)
        total_BKV = logprobs_RV.reshape(batch, k, vocab) + run_sum_BK[:, :, None]
        cand_sum_B2, flat_B2 = jax.lax.top_k(total_BKV.reshape(batch, k * vocab), 2 * k)
        parent_B2, token_B2 = flat_B2 // vocab, (flat_B2 % vocab).astype(jnp.int32)
        cand_seq_B2N = _take(run_seq_BKN, parent_B2).at[:, :, step].set(token_B2)
        ends_B2 = jnp.logical_or(token_B2 == eos_id, step + 1 >= n)

        # The K best that run on.
        keep_BK = jax.lax.top_k(cand_sum_B2 + ends_B2 * NEG, k)[1]
        run_seq_BKN = _take(cand_seq_B2N, keep_BK)
        run_sum_BK = _take(cand_sum_B2 + ends_B2 * NEG, keep_BK)
        run_parent_BK = _take(parent_B2, keep_BK)

        # The finished set: its K best with the new endings among the first K candidates.
        cand_score_B2 = cand_sum_B2 / ((step + 1.0) ** lp)
        full_B1 = jnp.logical_and(jnp.all(fin_done_BK, axis=1, keepdims=True), decoding.early_stopping is True)
        # (Hugging Face's bookkeeping: a closed set's candidates are pushed down, yet marked done.)
        done_B2 = ends_B2 & top_k_mask_2K[None, :]
        may_enter_B2 = done_B2 & ~full_B1 & open_B[:, None]
        cand_score_B2 = jnp.where(may_enter_B2, cand_score_B2, cand_score_B2 + NEG)
        merged_score = jnp.concatenate([fin_score_BK, cand_score_B2], axis=1)
        best_BK = jax.lax.top_k(merged_score, k)[1]
        fin_score_BK = _take(merged_score, best_BK)
        fin_seq_BKN = _take(jnp.concatenate([fin_seq_BKN, cand_seq_B2N], axis=1), best_BK)
        fin_len_BK = _take(jnp.concatenate([fin_len_BK, jnp.full_like(token_B2, step + 1)], axis=1), best_BK)
        fin_sum_BK = _take(jnp.concatenate([fin_sum_BK, cand_sum_B2], axis=1), best_BK)
        fin_done_BK = _take(jnp.concatenate([fin_done_BK, done_B2], axis=1), best_BK)

        # The running beams' next logits: their parents' caches, then their new tokens.
        parent_R = (run_parent_BK + jnp.arange(batch)[:, None] * k).reshape(rows)
        token_R = run_seq_BKN[:, :, step].reshape(rows)
        cache = gather_rows(cache, parent_R)
        present_RV = sampling.mark_present(present_RV[parent_R], token_R)
        cache, logits_RV = fn(cache, token_R[:, None], step)

        # Can a running beam still beat the worst finished one?
        best_len = jnp.float32(n) if never else step + 1.0
        best_running_B = run_sum_BK[:, 0] / (best_len ** lp)
        worst_BK = jnp.where(fin_done_BK, jnp.min(fin_score_BK, axis=1, keepdims=True), NEG)
        open_B = open_B & jnp.any(best_running_B[:, None] > worst_BK, axis=1)
        go_on = jnp.any(open_B) & ~(jnp.all(fin_done_BK) & (decoding.early_stopping is True)) & ~jnp.all(ends_B2)
        return (step + 1, logits_RV, present_RV, cache, run_seq_BKN, run_sum_BK, fin_seq_BKN, fin_len_BK,
                fin_sum_BK, fin_score_BK, fin_done_BK, open_B, go_on)

    def cond(state):
        return jnp.logical_and(state[0] < n, state[-1])

    run_sum_BK = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG)  # one beam at first: no duplicates
    zeros_BK = jnp.zeros((batch, k), jnp.int32)
    state = (jnp.array(0, jnp.int32), logits_RV, present_RV, cache, jnp.zeros((batch, k, n), jnp.int32), run_sum_BK,
             jnp.zeros((batch, k, n), jnp.int32), zeros_BK, jnp.zeros((batch, k), jnp.float32),
             jnp.full((batch, k), NEG, jnp.float32), jnp.zeros((batch, k), bool), jnp.ones((batch,), bool),
             jnp.array(True))
    state = jax.lax.while_loop(cond, body, state)
    return state[6], state[7], state[8], state[9]


def search(config: ModelConfig, params, prompt_RP: jax.Array, real_RP: jax.Array, eos: jax.Array,
           decoding: gen.Decoding, *, eos_id: int | None) -> list[list[gen.Generation]]:
    """Per prompt (rows R = prompts x num_beams, each prompt repeated), its num_return_sequences best
    beams."""
    seq, length, total, score = jax.device_get(
        search_rows(config, params, prompt_RP, real_RP, eos, decoding=decoding))
    results = []
    for b in range(seq.shape[0]):
        gens = []
        for j in range(decoding.num_return_sequences):
            tokens = [int(t) for t in np.asarray(seq[b, j, :length[b, j]])]
            reason = "eos" if eos_id is not None and tokens and tokens[-1] == eos_id else "length"
            gens.append(gen.Generation(tokens, reason, float(total[b, j]), float(score[b, j])))
        results.append(gens)
    return results
