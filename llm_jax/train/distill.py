"""Knowledge distillation: a student learns from a trained teacher's softened predictions.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss

as (sum, weight) pairs like every loss here: the KL divergence of each scored position (or row) is
summed with the task loss's weights and divided once, by the same count, at the end of the step.
T^2 keeps the soft term's gradient on the scale of the hard one's as T grows (Hinton et al. 2015).

The teacher (`distill.teacher`: a run directory or an `llm-jax export`) is restored once, onto the
student's mesh through the same logical axis rules, and enters the jitted train step as an input
that is neither donated nor differentiated (`stop_gradient`): its forward pass runs in the student's
step, it is never updated, and it is not part of the train state, so never in a checkpoint.

The logits come from a `LogitsSource`: language modelling (next-token or masked logits over the
vocabulary) or a fine-tuning task's head (logits over the labels, train/task_steps.py). Teacher and
student may differ in depth and width; they must share the vocabulary (and a task's label set).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.config import Config, ConfigError, load_config
from llm_jax.data.tokenizer import tokenizer_file
from llm_jax.models.decoder import count_params
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import task_steps
from llm_jax.train.losses import cross_entropy_sum
from llm_jax.train.steps import _logits as lm_logits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LogitsSource:
    """Where a model's logits and its task loss come from, for student and teacher alike."""

    logits: Callable  # (params, batch, model, rng or None) -> float32 logits [..., V or C]
    task_loss: Callable  # (logits, batch) -> (loss sum, weight sum)
    weights: Callable  # (logits, batch) -> the weight of each scored position, logits.shape[:-1]


LANGUAGE_MODEL = LogitsSource(
    logits=lm_logits,
    task_loss=lambda logits, batch: cross_entropy_sum(logits, batch["targets"], batch["weights"]),
    weights=lambda logits, batch: batch["weights"],
)


def _task_weights(logits, batch):
    return (task_steps._labels(logits, batch) >= 0).astype(jnp.float32)


TASK = LogitsSource(
    logits=task_steps.task_logits,
    task_loss=lambda logits, batch: task_steps._cross_entropy(logits, task_steps._labels(logits, batch)),
    weights=_task_weights,
)


def source_for(config: Config) -> LogitsSource:
    return LANGUAGE_MODEL if config.task.kind == "lm" else TASK


def kl_sum(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
           temperature: float) -> jax.Array:
    """sum over weighted positions of KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return jnp.sum(kl * weights)


def distill_loss_sums(params, batch: dict[str, jax.Array], model, rng: jax.Array | None, *, teacher_model,
                      teacher_params, source: LogitsSource, temperature: float, alpha: float):
    """(alpha * T^2 * KL sum + (1 - alpha) * task loss sum, weight sum): steps.train_step's loss_fn."""
    logits = source.logits(params, batch, model, rng)
    teacher_logits = jax.lax.stop_gradient(source.logits(teacher_params, batch, teacher_model, None))
    task_sum, weight_sum = source.task_loss(logits, batch)
    soft_sum = kl_sum(logits, teacher_logits, source.weights(logits, batch), temperature)
    return alpha * temperature**2 * soft_sum + (1.0 - alpha) * task_sum, weight_sum


@dataclasses.dataclass(frozen=True)
class Teacher:
    model: Any
    params: Any  # placed with `shardings`, the student's mesh and logical rules
    shardings: Any
    step: int  # the teacher's training step, for the log


def with_teacher(step_fn: Callable, teacher: Teacher, config: Config) -> Callable:
    """`step_fn(state, batch, loss_fn=...)` as a step of (state, batch, teacher params) that
    distils: the teacher's parameters are an input of the compiled step, not a constant in it."""
    d = config.distill

    def step(state, batch, teacher_params):
        loss_fn = functools.partial(distill_loss_sums, teacher_model=teacher.model, teacher_params=teacher_params,
                                    source=source_for(config), temperature=d.temperature, alpha=d.alpha)
        return step_fn(state, batch, loss_fn=loss_fn)

    return step


# ----------------------------------------------------------------------------- the teacher on disk

def _teacher_dir(config: Config) -> tuple[Path, bool]:
    """(the teacher's directory, whether it is an export); a path that is neither is a ConfigError."""
    path = Path(config.distill.teacher).expanduser().absolute()
    if (path / ckpt.EXPORT_PARAMS).is_dir() and (path / ckpt.EXPORT_CONFIG).is_file():
        return path, True
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return path, False
    raise ConfigError(f"distill.teacher: {path} is neither a run directory (config.yaml, checkpoints/) nor an "
                      f"`llm-jax export` directory ({ckpt.EXPORT_PARAMS}/, {ckpt.EXPORT_CONFIG})")


def _teacher_config(config: Config, path: Path) -> Config:
    """The teacher's own config with the student's mesh and axis rules: it is sharded like the student."""
    try:
        teacher = load_config(path / "config.yaml", [f"workdir={path}"])
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {path / 'config.yaml'}: {e}") from e
    return dataclasses.replace(teacher, mesh=config.mesh, parallel=config.parallel)


def check_teacher(config: Config) -> Config:
    """Checks `distill.teacher` before any work (one-line ConfigError) and returns the config to run.

    The vocabulary must be the teacher's: the same size and, when the student names its tokenizer,
    the same SentencePiece model; with no `tokenizer.path` the student takes the teacher's, as
    `init_from` does. A task's label set must be the teacher's too (checked when both are known).
    """
    if not config.distill.teacher:
        return config
    path, _ = _teacher_dir(config)
    teacher = _teacher_config(config, path)
    ours, theirs = config.model.vocab_size, teacher.model.vocab_size
    if ours != theirs:
        raise ConfigError(f"distill.teacher: {path} has model.vocab_size={theirs}, the student {ours}: teacher and "
                          "student must share the vocabulary")
    if teacher.objective != config.objective:
        raise ConfigError(f"distill.teacher: {path} learns {teacher.objective} (model.arch={teacher.model.arch}), the "
                          f"student {config.objective}: their logits would not mean the same")
    if teacher.model.resolved_position == "learned" and teacher.model.max_len < config.train.seq_len:
        raise ConfigError(f"distill.teacher: {path} reads at most {teacher.model.max_len} positions (model.max_len), "
                          f"fewer than train.seq_len={config.train.seq_len}")
    if teacher.task.kind != config.task.kind:
        raise ConfigError(f"distill.teacher: {path} was trained for task.kind={teacher.task.kind}, the student for "
                          f"{config.task.kind}")
    spm = tokenizer_file(path / ckpt.EXPORT_TOKENIZER)  # spm.model or tokenizer.json
    if spm is None:
        raise ConfigError(f"distill.teacher: {path} has no tokenizer ({path / ckpt.EXPORT_TOKENIZER})")
    if not config.tokenizer.path:
        return dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer, path=str(spm)))
    given = Path(config.tokenizer.path).expanduser()
    given = (tokenizer_file(given) or given) if given.is_dir() else given
    if not given.is_file() or given.read_bytes() != spm.read_bytes():
        raise ConfigError(f"distill.teacher: tokenizer.path={config.tokenizer.path} is not the teacher's tokenizer "
                          f"({spm}): teacher and student must share the vocabulary")
    return config


def load_teacher(config: Config, mesh: jax.sharding.Mesh, build: Callable, labels: Any = None) -> Teacher:
    """The teacher's model and parameters on the student's `mesh`.

    `build` is loop.build (the student's own way from a config to a model and its shardings; passed
    in, as the loop imports this module). Damaged or missing files: one-line ConfigError.
    """
    path, is_export = _teacher_dir(config)
    teacher_config = _teacher_config(config, path)
    setup = build(teacher_config, mesh=mesh, with_data=False)
    if labels is not None and setup.labels is not None and list(setup.labels.names) != list(labels.names):
        raise ConfigError(f"distill.teacher: {path} was trained on the labels {list(setup.labels.names)}, the "
                          f"student's are {list(labels.names)}")
    abstract = setup.abstract_state.params
    try:
        if is_export:
            params = ckpt.load_exported_params(path, teacher_config.model, abstract)
            step = _export_step(path)
        else:
            restored = ckpt.read_latest(path, teacher_config, setup.abstract_state)
            if restored is None:
                raise ConfigError(f"distill.teacher: {path} has no checkpoint yet")
            state, metadata = restored
            params, step = state.params, int(metadata["step"])
    except ckpt.CheckpointError as e:
        raise ConfigError(f"distill.teacher: {e}") from e
    log.info("distilling from %s (step %d, %.2fM parameters): T=%g, alpha=%g", path, step,
             count_params(params) / 1e6, config.distill.temperature, config.distill.alpha)
    return Teacher(setup.model, params, setup.state_shardings.params, step)


def _export_step(path: Path) -> int:
    try:
        return int(ckpt.export_info(path).get("step", 0))
    except (OSError, ValueError, AttributeError):
        return 0
