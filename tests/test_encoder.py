"""The BERT encoder (models/encoder.py): its parameter tree, bidirectional attention within documents,
the attention paths, remat, dtypes, FLOPs, and one trip through the train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transformer import LOGICAL_NAMES, draw_params, restack
from test_transformer import random_params as decoder_params

from llm_jax.config import Config, ModelConfig, OptimizerConfig, TrainConfig
from llm_jax.models import layers
from llm_jax.models.build import make_model
from llm_jax.models.decoder import Transformer, count_params
from llm_jax.models.encoder import Encoder
from llm_jax.models.flops import flops_per_token, matmul_param_count
from llm_jax.train.optim import make_optimizer
from llm_jax.train.steps import TrainState, init_state, train_step

V, E, F, P, N_LAYERS = 64, 32, 64, 32, 2


def tiny(**overrides) -> ModelConfig:
    values = dict(arch="bert", vocab_size=V, n_layers=N_LAYERS, d_model=E, n_heads=4, d_ff=F, max_len=P)
    values.update(overrides)
    return ModelConfig(**values)


def tokens_of(seed: int, shape=(2, 8)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, size=shape), jnp.int32)


def abstract_params(config: ModelConfig):
    """Boxed ShapeDtypeStructs of init, without compiling it."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: Encoder(config).init(jax.random.key(0), tokens))["params"]


def random_params(config: ModelConfig, seed: int = 0, std: float = 0.1):
    """Unboxed numpy-drawn params (compiling init costs seconds); scales near 1, biases nonzero."""
    return draw_params(abstract_params(config), seed, std)


@functools.cache
def forward(config: ModelConfig, output: str = "logits"):
    module = Transformer(config) if not config.family.encoder else Encoder(config)
    kwargs = {} if output == "logits" else {"output": output}
    return jax.jit(lambda params, tokens, positions=None, segment_ids=None, token_types=None:
                   module.apply({"params": params}, tokens, positions, segment_ids,
                                **({"token_types": token_types} if token_types is not None else {}), **kwargs))


# The tree of models/encoder.py's docstring, unscanned, with H = 4 heads of D = 8.
_BLOCK = {
    "attn/query/kernel": (E, 4, 8), "attn/query/bias": (4, 8), "attn/key/kernel": (E, 4, 8), "attn/key/bias": (4, 8),
    "attn/value/kernel": (E, 4, 8), "attn/value/bias": (4, 8), "attn/out/kernel": (4, 8, E), "attn/out/bias": (E,),
    "attn_norm/scale": (E,), "attn_norm/bias": (E,), "mlp/fc/kernel": (E, F), "mlp/fc/bias": (F,),
    "mlp/proj/kernel": (F, E), "mlp/proj/bias": (E,), "mlp_norm/scale": (E,), "mlp_norm/bias": (E,),
}
EXPECTED_TREE = {
    "embed/embedding": (V, E), "pos_embed/embedding": (P, E), "type_embed/embedding": (2, E),
    "embed_norm/scale": (E,), "embed_norm/bias": (E,),
    **{f"layer_{i}/{name}": shape for i in range(N_LAYERS) for name, shape in _BLOCK.items()},
    "mlm_head/transform/kernel": (E, E), "mlm_head/transform/bias": (E,), "mlm_head/transform_norm/scale": (E,),
    "mlm_head/transform_norm/bias": (E,), "mlm_head/bias": (V,), "pooler/kernel": (E, E), "pooler/bias": (E,),
}


def _tree(boxed) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {"/".join(k.key for k in path): box for path, box in leaves}


@pytest.mark.parametrize("scan", [False, True])
def test_parameter_tree_is_the_documented_one_and_every_leaf_has_logical_axes(scan):
    tree = _tree(abstract_params(tiny(scan_layers=scan)))
    expected = dict(EXPECTED_TREE)
    if scan:
        expected = {k: v for k, v in expected.items() if not k.startswith("layer_")}
        expected.update({f"layers/{name}": (N_LAYERS, *shape) for name, shape in _BLOCK.items()})
    assert {path: tuple(box.value.shape) for path, box in tree.items()} == expected
    for path, box in tree.items():
        assert isinstance(box, nn.Partitioned), path
        assert len(box.names) == box.value.ndim
        # None: the two token-type rows are never sharded.
        assert set(box.names) <= LOGICAL_NAMES | {None}, (path, box.names)
        assert (box.names[0] == "layers") == path.startswith("layers/"), path
    assert isinstance(make_model(tiny()), Encoder) and isinstance(make_model(tiny(arch="gpt2")), Transformer)


def test_untied_embeddings_add_an_output_kernel():
    tree = _tree(abstract_params(tiny(tie_embeddings=False)))
    assert tuple(tree["mlm_head/decoder/kernel"].value.shape) == (E, V)
    assert "mlm_head/decoder/kernel" not in _tree(abstract_params(tiny()))


def test_scan_layers_gives_the_same_outputs():
    config, scanned = tiny(), tiny(scan_layers=True)
    params = random_params(config)
    tokens = tokens_of(0)
    logits = forward(config)(params, tokens)
    assert logits.shape == (2, 8, V) and logits.dtype == jnp.float32
    scanned_logits = forward(scanned)(restack(params), tokens)
    np.testing.assert_allclose(np.asarray(scanned_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    other = forward(scanned)(random_params(scanned, seed=1), tokens)
    assert np.abs(np.asarray(other - logits)).max() > 1e-4  # the comparison above is not vacuous


def test_changing_a_later_token_changes_earlier_outputs_unlike_a_decoder():
    tokens = tokens_of(1)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
    encoder = tiny()
    params = random_params(encoder)
    logits, changed_logits = (np.asarray(forward(encoder)(params, t)) for t in (tokens, changed))
    assert np.abs(changed_logits[:, :5] - logits[:, :5]).max() > 1e-4
    decoder = tiny(arch="gpt2")
    params = decoder_params(decoder)
    logits, changed_logits = (np.asarray(forward(decoder)(params, t)) for t in (tokens, changed))
    np.testing.assert_allclose(changed_logits[:, :5], logits[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(changed_logits[:, 5:] - logits[:, 5:]).max() > 1e-4


def test_packed_documents_do_not_see_each_other():
    config = tiny()
    params = random_params(config)
    run = forward(config)
    doc_a, doc_b = tokens_of(2, (1, 5)), tokens_of(3, (1, 4))
    # Row 0: A, B and 3 padding tokens, packed. Row 1: the same tokens as one document.
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]] * 2, jnp.int32)
    packed_logits = np.asarray(run(params, jnp.concatenate([packed, packed]), positions, segment_ids))
    alone_a, alone_b = np.asarray(run(params, doc_a)), np.asarray(run(params, doc_b))
    np.testing.assert_allclose(packed_logits[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 5:9], alone_b[0], rtol=1e-5, atol=1e-5)
    # As one document, A and B see each other (and the padding tokens) and their logits change.
    assert np.abs(packed_logits[1, :5] - alone_a[0]).max() > 1e-4
    assert np.abs(packed_logits[1, 5:9] - alone_b[0]).max() > 1e-4


def test_token_types_and_pooled_output():
    config = tiny()
    params = random_params(config)
    tokens = tokens_of(4)
    zeros, ones = jnp.zeros_like(tokens), jnp.ones_like(tokens)
    np.testing.assert_array_equal(np.asarray(forward(config)(params, tokens, None, None, zeros)),
                                  np.asarray(forward(config)(params, tokens)))
    assert np.abs(np.asarray(forward(config)(params, tokens, None, None, ones) -
                             forward(config)(params, tokens))).max() > 1e-4
    hidden_BLE = np.asarray(forward(config, "hidden")(params, tokens))
    pooled_BE = np.asarray(forward(config, "pooled")(params, tokens))
    pooler = params["pooler"]
    expected = np.tanh(hidden_BLE[:, 0] @ np.asarray(pooler["kernel"]) + np.asarray(pooler["bias"]))
    np.testing.assert_allclose(pooled_BE, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="encoder: it has no decode mode"):
        Encoder(config).apply({"params": params}, tokens, decode=True)


def _loss(config, tokens, targets):
    def loss(params):
        logits = Encoder(config).apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return loss


@functools.cache
def _reference_loss_and_grads():
    config = tiny(n_layers=1)
    params = random_params(config)
    return params, jax.jit(jax.value_and_grad(_loss(config, tokens_of(6), tokens_of(7))))(params)


@pytest.mark.parametrize("remat,scan,policy", [("full", False, "policy=None"),
                                               ("dots", True, "save_from_both_policies")])
def test_remat_gives_the_same_loss_and_gradients(remat, scan, policy):
    params, (loss, expected) = _reference_loss_and_grads()
    if scan:
        params, expected = restack(params), restack(expected)
    grad_fn = jax.value_and_grad(_loss(tiny(n_layers=1, scan_layers=scan, remat=remat), tokens_of(6), tokens_of(7)))
    jaxpr = str(jax.make_jaxpr(grad_fn)(params))
    assert "remat" in jaxpr and policy in jaxpr
    got_loss, grads = jax.jit(grad_fn)(params)
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_returns_float32_logits():
    config, low = tiny(), tiny(dtype="bfloat16")
    params = random_params(config)
    tokens = tokens_of(8)
    full_logits, low_logits = forward(config)(params, tokens), forward(low)(params, tokens)
    assert low_logits.dtype == jnp.float32
    assert np.abs(np.asarray(low_logits - full_logits)).max() > 1e-5  # bfloat16 really was used
    np.testing.assert_allclose(np.asarray(low_logits), np.asarray(full_logits), atol=0.15)
    stored = nn.unbox(abstract_params(tiny(dtype="bfloat16", param_dtype="bfloat16")))
    assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}


def test_cudnn_attention_path_equals_xla():
    config = tiny()
    params = random_params(config)
    tokens = tokens_of(9)
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8], jnp.int32)
    expected = forward(config)(params, tokens, None, segment_ids)
    got = forward(tiny(attention="cudnn"))(params, tokens, None, segment_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_splash_attention_both_ways_equals_explicit_attention():
    """The Pallas kernel (in its interpreter here) with a full mask: the encoder's attention."""
    shape = (1, 128, 2, 8)
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32) for i in range(3))
    segment_ids = jnp.asarray(np.repeat([[1, 2, 2, 0]], 32, axis=1), jnp.int32)
    got = layers.splash_attention_on("cpu", q, k, v, segment_ids, causal=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.bidirectional_attention(q, k, v, segment_ids)),
                               rtol=1e-5, atol=1e-5)


def test_cudnn_on_gpu_masks_packed_documents_both_ways(monkeypatch):
    """Traced as on a Hopper GPU (nothing runs): packed documents reach cuDNN with a padding mask,
    not its causal one."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    from test_layers import _equations

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    segment_ids = jnp.ones((1, 16), jnp.int32)

    def mask_types(causal):
        jaxpr = jax.make_jaxpr(lambda q: layers.fused_attention(q, q, q, segment_ids, "gpu", causal))(q).jaxpr
        return {eqn.params["mask_type"] for eqn in _equations(jaxpr) if "mask_type" in eqn.params}

    assert mask_types(causal=False) == {cudnn.MaskType.PADDING}
    assert mask_types(causal=True) == {cudnn.MaskType.PADDING_CAUSAL}


def test_flops_per_token_of_the_encoder():
    config = Config(model=tiny(), train=TrainConfig(seq_len=16))
    # Per layer q, k, v, out (4 E^2) and the MLP (2 E F); the MLM transform E^2 and the tied vocab E V.
    n = N_LAYERS * (4 * E * E + 2 * E * F) + E * E + E * V
    assert matmul_param_count(config) == n
    assert flops_per_token(config) == 6 * n + 12 * N_LAYERS * E * 16
    # The decoder of the same sizes has no MLM transform.
    assert matmul_param_count(Config(model=tiny(arch="gpt2"))) == n - E * E
    assert count_params(random_params(tiny())) > n  # embeddings, norms, biases, pooler are not matmul weights


def test_trains_through_the_step_functions():
    """Masked LM as the data side builds it: inputs with some tokens masked, targets the originals,
    weight 1 only at the masked positions; two packed documents and padding."""
    config = tiny(n_layers=1)
    model = make_model(config)
    tx, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), total_steps=100)
    # init_state's tree, traced (compiling init costs seconds), filled with numpy-drawn weights.
    abstract = jax.eval_shape(lambda r: nn.unbox(init_state(r, model, tx, seq_len=16)), jax.random.key(0))
    params = random_params(config)
    assert jax.tree.structure(params) == jax.tree.structure(abstract.params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    targets = np.asarray(tokens_of(10, (4, 16)))
    masked = np.random.default_rng(11).random((4, 16)) < 0.3
    segment_ids = np.asarray([[1] * 9 + [2] * 5 + [0] * 2] * 4, np.int32)
    masked &= segment_ids > 0
    batch = {"inputs": np.where(masked, 3, targets).astype(np.int32), "targets": targets,
             "weights": masked.astype(np.float32), "segment_ids": segment_ids,
             "positions": np.asarray([list(range(9)) + list(range(5)) + [0, 1]] * 4, np.int32)}
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert float(metrics["tokens"]) == masked.sum()
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5


def _numpy_bert(params, tokens, token_types, eps=1e-12):
    """BERT's forward pass as Devlin et al. and BertForMaskedLM write it, in float64 numpy."""
    from scipy.special import erf

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

    def norm(x, n):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * n["scale"] + n["bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

    length = tokens.shape[1]
    x = p["embed"]["embedding"][tokens] + p["pos_embed"]["embedding"][np.arange(length)][None] \
        + p["type_embed"]["embedding"][token_types]
    x = norm(x, p["embed_norm"])
    for i in range(N_LAYERS):
        b = p[f"layer_{i}"]
        q, k, v = (np.einsum("ble,ehd->bhld", x, b["attn"][n]["kernel"]) + b["attn"][n]["bias"][None, :, None, :]
                   for n in ("query", "key", "value"))
        scores = np.einsum("bhld,bhsd->bhls", q, k) / np.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = np.einsum("bhls,bhsd->blhd", probs, v)
        attn = np.einsum("blhd,hde->ble", context, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        x = norm(x + attn, b["attn_norm"])
        h = gelu(x @ b["mlp"]["fc"]["kernel"] + b["mlp"]["fc"]["bias"])
        x = norm(x + h @ b["mlp"]["proj"]["kernel"] + b["mlp"]["proj"]["bias"], b["mlp_norm"])
    head = p["mlm_head"]
    h = norm(gelu(x @ head["transform"]["kernel"] + head["transform"]["bias"]), head["transform_norm"])
    return h @ p["embed"]["embedding"].T + head["bias"]


def test_matches_bert_written_out_in_numpy():
    """Every piece where BERT differs from the decoders (post-norm, exact GELU, eps 1e-12, token
    types, the MLM transform and output bias, attention both ways) against an independent forward."""
    config = tiny()
    params = random_params(config)
    tokens = tokens_of(12)
    token_types = jnp.asarray(np.tile([0] * 5 + [1] * 3, (2, 1)), jnp.int32)
    got = np.asarray(forward(config)(params, tokens, None, None, token_types))
    np.testing.assert_allclose(got, _numpy_bert(params, np.asarray(tokens), np.asarray(token_types)),
                               rtol=1e-4, atol=1e-4)
