"""The Transformer: shapes, masking, packing, parameter metadata, scan/remat, dtypes, KV cache."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from llm_jax.config import DEFAULT_AXIS_RULES, ModelConfig
from llm_jax.models.decoder import Transformer, count_params

LOGICAL_NAMES = {name for name, _ in DEFAULT_AXIS_RULES}
ROOT = Path(__file__).parent.parent


def tiny(arch: str = "gpt2", **overrides) -> ModelConfig:
    values = dict(arch=arch, vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32)
    if arch == "llama":
        values["n_kv_heads"] = 2
    values.update(overrides)
    return ModelConfig(**values)


def tokens_of(seed: int, shape=(2, 8), vocab: int = 64) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, size=shape), jnp.int32)


def abstract_variables(config: ModelConfig, batch: int = 1, length: int = 8, **kwargs):
    """Boxed ShapeDtypeStructs of init, without compiling it."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    return jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens, **kwargs))


def random_params(config: ModelConfig, seed: int = 0, std: float = 0.1):
    """Unboxed params drawn with numpy: compiling `init` costs seconds per model on a CPU (one
    threefry kernel per parameter), and these tests need weights, not the init scheme. Norm scales
    sit around 1 and biases are nonzero, so a bias or scale that is ignored shows up."""
    return draw_params(abstract_variables(config)["params"], seed, std)


def draw_params(abstract_params, seed: int, std: float):
    """Values for a (boxed or unboxed) abstract parameter tree: normal * std, norm scales around 1. The
    encoder and encoder-decoder tests draw theirs with it too."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape) * std
        if jax.tree_util.keystr(path).endswith("['scale']"):
            values = values + 1.0
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params))


def empty_cache(config: ModelConfig, batch: int, length: int):
    """The decode cache: zeros shaped by a decode-mode init over the full length."""
    cache = abstract_variables(config, batch, length, decode=True)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)


@functools.cache
def forward(config: ModelConfig):
    """Jitted apply, one per config, so tests that share a config and shapes share a compile."""
    return jax.jit(lambda params, tokens, positions=None, segment_ids=None:
                   Transformer(config).apply({"params": params}, tokens, positions, segment_ids))


def restack(params):
    """Unrolled params (layer_0, layer_1, ...) to the scanned layout (one "layers" subtree)."""
    layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layers])
    return stacked


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shapes_and_scan_gives_the_same_model(arch):
    config = tiny(arch)
    scanned = tiny(arch, scan_layers=True)
    params = random_params(config)
    scanned_params = random_params(scanned, seed=1)
    assert count_params(params) == count_params(scanned_params) > 0
    restacked = restack(params)
    assert jax.tree.map(jnp.shape, restacked) == jax.tree.map(jnp.shape, scanned_params)

    tokens = tokens_of(0)
    logits = forward(config)(params, tokens)
    assert logits.shape == (2, 8, 64) and logits.dtype == jnp.float32
    scanned_logits = forward(scanned)(restacked, tokens)
    np.testing.assert_allclose(np.asarray(scanned_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    # Other weights give other logits: the comparison above is not vacuous.
    assert np.abs(np.asarray(forward(scanned)(scanned_params, tokens) - logits)).max() > 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(arch):
    config = tiny(arch)
    params = random_params(config)
    tokens = tokens_of(1)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 64)
    logits, changed_logits = (np.asarray(forward(config)(params, t)) for t in (tokens, changed))
    np.testing.assert_allclose(changed_logits[:, :5], logits[:, :5], rtol=1e-6, atol=1e-6)
    assert np.abs(changed_logits[:, 5:] - logits[:, 5:]).max() > 1e-4


@pytest.mark.parametrize("arch,position", [("gpt2", "learned"), ("llama", "rope"), ("gpt2", "sinusoidal")])
def test_packed_documents_do_not_see_each_other(arch, position):
    config = tiny(arch, position=position)
    params = random_params(config)
    run = forward(config)
    doc_a, doc_b = tokens_of(2, (1, 5)), tokens_of(3, (1, 4))
    # Row 0: A, B and 3 padding tokens, packed. Row 1: the same tokens as one document.
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]] * 2, jnp.int32)
    packed_logits = np.asarray(run(params, jnp.concatenate([packed, packed]), positions, segment_ids))
    # Alone: A, and B followed by one token that causality keeps from B's logits.
    alone = np.asarray(run(params, jnp.concatenate([doc_a, jnp.pad(doc_b, ((0, 0), (0, 1)))])))
    np.testing.assert_allclose(packed_logits[0, :5], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 5:9], alone[1, :4], rtol=1e-5, atol=1e-5)
    # As one document, B attends to A and its logits change.
    assert np.abs(packed_logits[1, 5:9] - alone[1, :4]).max() > 1e-4


def test_grouped_query_attention_has_smaller_kv_projections():
    config = tiny("llama", n_heads=4, n_kv_heads=1)
    params = random_params(config)
    attn = params["layer_0"]["attn"]
    assert attn["query"]["kernel"].shape == (32, 4, 8)
    assert attn["key"]["kernel"].shape == (32, 1, 8)
    assert attn["value"]["kernel"].shape == (32, 1, 8)
    assert attn["out"]["kernel"].shape == (4, 8, 32)
    logits = forward(config)(params, tokens_of(4))
    assert logits.shape == (2, 8, 64) and bool(jnp.all(jnp.isfinite(logits)))


def _boxes(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parametrize("arch,scan", [("gpt2", False), ("llama", True)])
def test_every_param_has_logical_axis_names(arch, scan):
    config = tiny(arch, scan_layers=scan)
    abstract = abstract_variables(config)
    boxes = _boxes(abstract["params"])
    assert len(boxes) == len(jax.tree.leaves(abstract["params"])) > 5
    for box in boxes:
        assert isinstance(box, nn.Partitioned), box
        assert len(box.names) == len(box.value.shape)
        assert set(box.names) <= LOGICAL_NAMES
    layer_boxes = _boxes(abstract["params"]["layers" if scan else "layer_0"])
    assert all((box.names[0] == "layers") == scan for box in layer_boxes)
    specs = nn.get_partition_spec(abstract["params"])
    embed_spec = specs["embed"]["embedding"]
    assert tuple(embed_spec) == ("vocab", "embed")
    mesh_specs = nn.logical_to_mesh(specs, DEFAULT_AXIS_RULES)
    assert tuple(mesh_specs["embed"]["embedding"]) == ("tensor", "fsdp")


def test_runs_under_a_mesh_with_the_default_axis_rules():
    config = tiny("llama", scan_layers=True)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = random_params(config)
    tokens = tokens_of(5)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_AXIS_RULES):
        run = forward(config)
        assert "sharding_constraint" in run.lower(params, tokens).as_text()
        logits = run(params, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(config)(params, tokens)), rtol=1e-6, atol=1e-6)


def _loss(config, tokens):
    def loss(params):
        logits = Transformer(config).apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss


@functools.cache
def _reference_grads():
    config = tiny("llama", n_layers=1)  # one layer: gradient compiles are the slowest in this file
    params = random_params(config)
    return params, jax.jit(jax.grad(_loss(config, tokens_of(6, (2, 9)))))(params)


@pytest.mark.parametrize("remat,scan,policy", [("full", False, "policy=None"),
                                               ("dots", True, "save_from_both_policies")])
def test_remat_gives_the_same_gradients(remat, scan, policy):
    params, expected = _reference_grads()
    if scan:
        params, expected = restack(params), restack(expected)
    grad_fn = jax.grad(_loss(tiny("llama", n_layers=1, scan_layers=scan, remat=remat), tokens_of(6, (2, 9))))
    # Equal gradients alone cannot tell whether remat happened; the jaxpr can.
    jaxpr = str(jax.make_jaxpr(grad_fn)(params))
    assert "remat" in jaxpr and policy in jaxpr
    grads = jax.jit(grad_fn)(params)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_bfloat16_compute_returns_float32_logits_and_param_dtype_is_respected():
    config = tiny("llama", dtype="bfloat16", param_dtype="bfloat16")
    abstract = nn.unbox(abstract_variables(config)["params"])
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
    assert abstract_variables(config)["params"]["embed"]["embedding"].value.dtype == jnp.bfloat16
    # bfloat16 compute on float32 weights: stored in float32, results close to full float32.
    mixed = tiny("llama", dtype="bfloat16")
    abstract32 = nn.unbox(abstract_variables(mixed)["params"])
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract32)} == {jnp.dtype(jnp.float32)}
    params32 = random_params(mixed)
    low, full = forward(mixed)(params32, tokens_of(7)), forward(tiny("llama"))(params32, tokens_of(7))
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low - full)).max() > 1e-5  # bfloat16 really was used
    np.testing.assert_allclose(np.asarray(low), np.asarray(full), atol=0.1)


def test_cudnn_attention_path_equals_xla():
    config = tiny("llama")  # grouped-query, so the head grouping must agree too
    params = random_params(config)
    tokens = tokens_of(8)
    # Packed documents; both attention functions are also compared without segments in test_layers.
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8], jnp.int32)
    expected = forward(config)(params, tokens, None, segment_ids)
    got = forward(tiny("llama", attention="cudnn"))(params, tokens, None, segment_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_splash_attention_path_equals_xla_with_gradients():
    """model.attention=splash: the TPU kernel, here in the Pallas interpreter; GQA and documents."""
    config = tiny("llama", max_len=128)
    params = random_params(config)
    tokens = tokens_of(8, shape=(2, 128))
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 1, 1]], 32, axis=1), jnp.int32)

    def loss_and_grads(config):
        def loss(params):
            logits = Transformer(config).apply({"params": params}, tokens, None, segment_ids)
            return jnp.sum(jnp.sin(logits))
        return jax.jit(jax.value_and_grad(loss))(params)

    expected = loss_and_grads(config)
    got = loss_and_grads(tiny("llama", max_len=128, attention="splash"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_splash_attention_on_a_mesh_trains_like_explicit_attention_on_one_device():
    """Under data x fsdp x tensor sharding the kernel runs per device inside shard_map (8 fake devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "splash_mesh.py")], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    expected, got = runs["xla_single"], runs["splash_mixed222"]
    assert expected["losses"][-1] < expected["losses"][0]  # the steps change the model
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-4)
    np.testing.assert_allclose(got["grad_norms"], expected["grad_norms"], rtol=1e-3)
    assert runs["uneven_heads_difference"] < 1e-5


def test_dropout_is_active_only_when_not_deterministic():
    config = tiny("gpt2", dropout=0.5)
    params = random_params(config)
    tokens = tokens_of(9)

    @jax.jit
    def run(seed, deterministic_logits):
        model = Transformer(config)
        noisy = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(seed)})
        return noisy, model.apply({"params": params}, tokens) - deterministic_logits

    clean = forward(tiny("gpt2"))(params, tokens)
    noisy_0, diff = run(0, clean)
    noisy_1, _ = run(1, clean)
    np.testing.assert_allclose(np.asarray(diff), 0.0, atol=1e-6)
    assert np.abs(np.asarray(noisy_0 - clean)).max() > 1e-3
    assert np.abs(np.asarray(noisy_0 - noisy_1)).max() > 1e-3


def test_tied_and_untied_embeddings():
    assert "lm_head" not in abstract_variables(tiny("gpt2"))["params"]
    assert "lm_head" in abstract_variables(tiny("llama"))["params"]
    untied = abstract_variables(tiny("gpt2", tie_embeddings=False))["params"]
    assert untied["lm_head"]["kernel"].names == ("embed", "vocab")
    # Tied logits are the final hidden state against the token table.
    config = tiny("gpt2", n_layers=1)
    params = random_params(config)
    zeroed = jax.tree.map(jnp.zeros_like, params)
    zeroed["embed"] = params["embed"]
    zeroed["final_norm"] = params["final_norm"]
    tokens = tokens_of(10, (1, 4))
    logits = np.asarray(forward(config)(zeroed, tokens))
    hidden = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)[0]]
    hidden = (hidden - hidden.mean(-1, keepdims=True)) / np.sqrt(hidden.var(-1, keepdims=True) + 1e-5)
    hidden = hidden * np.asarray(params["final_norm"]["scale"]) + np.asarray(params["final_norm"]["bias"])
    np.testing.assert_allclose(logits[0], hidden @ np.asarray(params["embed"]["embedding"]).T, rtol=1e-4, atol=1e-4)


def test_init_scheme():
    # Scanned, so the compiled init holds one layer's initializers, not eight; rbg keys compile
    # faster than threefry on CPU and do not change the distributions.
    config = tiny("gpt2", n_layers=8, d_model=64, d_ff=256, vocab_size=512, init_std=0.05, scan_layers=True)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(lambda rng: nn.unbox(Transformer(config).init(rng, tokens)["params"]))(
        jax.random.key(0, impl="rbg"))
    params = dict(params, layer_0=jax.tree.map(lambda x: x[0], params["layers"]))
    layer = params["layer_0"]
    np.testing.assert_allclose(np.std(np.asarray(params["embed"]["embedding"])), 0.05, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(layer["mlp"]["fc"]["kernel"])), 0.05, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(layer["mlp"]["proj"]["kernel"])), 0.05 / 4, rtol=0.05)
    np.testing.assert_array_equal(np.asarray(layer["attn"]["query"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(layer["attn_norm"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(layer["attn_norm"]["bias"]), 0.0)


def test_count_params_matches_the_gpt2_formula():
    config = tiny("gpt2")
    v, e, f, p, n = 64, 32, 64, 32, 2
    per_layer = 4 * (e * e + e) + (e * f + f) + (f * e + e) + 2 * 2 * e
    expected = v * e + p * e + n * per_layer + 2 * e
    assert count_params(abstract_variables(config)["params"]) == expected


def test_kv_cache_decoding_matches_the_full_forward_pass():
    # Scanned llama: the cache gets a layers axis and RoPE must use absolute positions.
    # test_generate checks the unscanned gpt2 cache through greedy decoding.
    config = tiny("llama", scan_layers=True)
    params = random_params(config)
    cache = empty_cache(config, batch=2, length=12)
    tokens = tokens_of(11, (2, 8))
    model = Transformer(config)

    @jax.jit
    def step(cache, chunk):
        logits, mutated = model.apply({"params": params, "cache": cache}, chunk, decode=True, mutable=["cache"])
        return logits, mutated["cache"]

    pieces = []
    logits, cache = step(cache, tokens[:, :5])  # prefill
    pieces.append(logits)
    for i in range(5, 8):
        logits, cache = step(cache, tokens[:, i:i + 1])
        pieces.append(logits)
    decoded = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    expected = np.asarray(forward(config)(params, tokens))
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)
