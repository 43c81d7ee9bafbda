"""Log-likelihoods (infer/scoring.py) against plain forward passes, decoders and t5."""

import numpy as np
import pytest
from test_generate import PROMPT, setup

from llm_jax.infer import scoring
from llm_jax.infer.generate import DECODER_START_ID

LONG = [9, 8, 7, 6, 5, 4, 3, 2, 1, 11]  # beside PROMPT: a batch of two padded lengths


def reference_logprobs(arch, context, cont):
    """log-softmax over the positions that predict `cont`, by test_generate's jitted forward pass
    (no segment ids, trailing zeros that causality keeps out; t5: PROMPT is its encoder's input)."""
    model, _, full = setup(arch)
    if model.config.family.encoder_decoder:
        assert context == PROMPT
        row, first = [DECODER_START_ID, *cont[:-1]], 0
    else:
        row, first = context + cont[:-1], len(context) - 1
    padded = np.zeros((1, 12), np.int32)
    padded[0, :len(row)] = row
    logits = np.asarray(full(padded))[0, first:first + len(cont)].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_batched_scores_equal_plain_forward_passes(arch):
    model, params, _ = setup(arch)
    cont = [3, 42, 8]
    logprobs = reference_logprobs(arch, PROMPT, cont)
    best = int(np.argmax(logprobs[0]))  # the greedy first token
    pairs = [(PROMPT, cont), (LONG, [4]), (PROMPT, [best]), (PROMPT, [(best + 1) % 64])]
    scores = scoring.score_ids(model, params, pairs, batch_size=4)
    assert scores[0][0] == pytest.approx(logprobs[np.arange(3), cont].sum(), abs=1e-4)
    assert scores[0][1] == bool((np.argmax(logprobs, -1) == cont).all())
    assert scores[2] == (pytest.approx(logprobs[0, best], abs=1e-4), True)
    assert not scores[3][1] and scores[3][0] < scores[2][0]
    if not model.config.family.encoder_decoder:  # the long row, against its own plain pass
        assert scores[1][0] == pytest.approx(reference_logprobs(arch, LONG, [4])[0, 4], abs=1e-4)


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 30))
    windows = scoring.rolling_windows(ids, 8, encoder_decoder=False, bos_id=1)
    assert [w for _, w in windows] == [ids[:8], ids[8:16], ids[16:]]
    assert [c for c, _ in windows] == [[1], [ids[7]], [ids[15]]]
