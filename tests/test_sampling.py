"""The token filters and processors of infer/sampling.py on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.infer import sampling
from llm_jax.infer.sampling import Sampling


def logits_of(probs):
    return jnp.log(jnp.asarray([probs], jnp.float32))


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist())


# Binary fractions: their sums are exact in float32, so "reaches p" is never a rounding question.
PROBS = [0.125, 0.5, 0.125, 0.25]  # ranked: id 1, id 3, then ids 0 and 2 tied


@pytest.mark.parametrize("p, expected", [
    (0.3, {1}),             # the most likely token alone reaches 0.3
    (0.5, {1}),             # ... and exactly 0.5
    (0.6, {1, 3}),          # 0.5 < 0.6: the next one is needed
    (0.75, {1, 3}),         # 0.5 + 0.25 reaches 0.75 exactly
    (0.8, {1, 3, 0}),       # one of the tied 0.125s suffices: the lower id
    (0.99, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_exactly_the_smallest_set_that_reaches_p(p, expected):
    assert kept(sampling.top_p_filter(logits_of(PROBS), p)) == expected


def test_top_p_rows_are_independent():
    logits = jnp.concatenate([logits_of(PROBS), logits_of([0.25, 0.25, 0.25, 0.25])])
    filtered = np.asarray(sampling.top_p_filter(logits, 0.6))
    assert set(np.flatnonzero(np.isfinite(filtered[0]))) == {1, 3}
    assert set(np.flatnonzero(np.isfinite(filtered[1]))) == {0, 1, 2}  # uniform: three quarters reach 0.6


def test_top_k_min_p_and_their_ties():
    assert kept(sampling.top_k_filter(logits_of(PROBS), 1)) == {1}
    assert kept(sampling.top_k_filter(logits_of(PROBS), 3)) == {0, 1, 2, 3}  # the tie at the 3rd is kept
    assert kept(sampling.top_k_filter(logits_of(PROBS), 0)) == {0, 1, 2, 3}
    assert kept(sampling.min_p_filter(logits_of(PROBS), 0.5)) == {1, 3}  # at least 0.25 = 0.5 x 0.5
    assert kept(sampling.min_p_filter(logits_of(PROBS), 0.51)) == {1}


def test_repetition_penalty_is_hugging_faces():
    logits = jnp.asarray([[2.0, -2.0, 1.0, -1.0]])
    present = jnp.asarray([[True, True, False, False]])
    np.testing.assert_allclose(np.asarray(sampling.repetition_penalty(logits, present, 2.0)),
                               [[1.0, -4.0, 1.0, -1.0]])
    assert np.asarray(sampling.mark_present(present, jnp.asarray([3])))[0].tolist() == [True, True, False, True]


def test_eos_mask_and_draws_stay_in_the_filtered_set():
    logits = logits_of(PROBS)
    masked = sampling.mask_token(logits, jnp.int32(1), jnp.asarray(True))
    assert kept(masked) == {0, 2, 3}
    assert kept(sampling.mask_token(logits, jnp.int32(1), jnp.asarray(False))) == {0, 1, 2, 3}
    settings = Sampling(temperature=1.0, top_p=0.6)
    draws = {int(sampling.choose(logits, jax.random.key(s), settings)[0]) for s in range(40)}
    assert draws == {1, 3}
    assert int(sampling.choose(masked, jax.random.key(0), Sampling(temperature=0.0))[0]) == 3  # greedy: argmax
    np.testing.assert_allclose(np.asarray(sampling.token_logprob(logits * 3.0 - 7.0, jnp.asarray([3]))),
                               [np.log(0.25 ** 3 / sum(q ** 3 for q in PROBS))], rtol=1e-5)


@pytest.mark.parametrize("field, value, fragment", [
    ("temperature", -0.5, "--temperature"), ("top_p", 0.0, "--top-p"), ("min_p", 1.0, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"), ("top_k", -1, "--top-k")])
def test_impossible_settings_are_refused(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        Sampling(**{field: value}).check()
