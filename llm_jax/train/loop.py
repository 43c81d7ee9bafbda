"""The training run: the one place that compiles steps, owns the loop, and talks to disk.

State init follows eval_shape -> shardings -> jit(init, out_shardings); the train step is
compiled once with explicit in/out shardings and a donated state. The host trails the device by
one step: metrics of step s are fetched only after step s+1 has been dispatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from llm_jax.config import Config, ConfigError, dump_config, to_dict
from llm_jax.data import objectives, shards
from llm_jax.data import pipeline as data_lib
from llm_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, load_run_tokenizer
from llm_jax.infer import fill_mask
from llm_jax.infer.generate import generate
from llm_jax.models import flops
from llm_jax.models.build import make_model
from llm_jax.models.decoder import count_params
from llm_jax.models.families import FAMILIES
from llm_jax.parallel import mesh as mesh_lib
from llm_jax.runtime.stop_signal import StopSignal
from llm_jax.train import checkpoint as ckpt
from llm_jax.train import distill, exported, pmap, run_lock, tasks
from llm_jax.train.early_stopping import EarlyStopping, best_metric
from llm_jax.train.fault_tolerance import NonFiniteError, NonFiniteGuard, ProcessAgreement, SaveClock
from llm_jax.train.metrics import MetricsWriter
from llm_jax.train.optim import describe_dtypes, keep_masked_zero, make_optimizer
from llm_jax.train.report import Reporter, log_eval
from llm_jax.train.steps import TrainState, eval_step, init_state, train_step
from llm_jax.train.task_steps import task_eval_step, task_loss_sums

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """What a run builds once: model, optimizer, mesh, shardings, tokenizer and data sources."""

    config: Config
    workdir: Path
    mesh: jax.sharding.Mesh
    model: nn.Module
    tx: Any
    schedule: Any
    abstract_state: Any  # unboxed ShapeDtypeStructs of the TrainState
    state_shardings: Any
    tokenizer: Tokenizer | None  # None when built without data (bench)
    sources: Any  # DataSources; a fine-tuning task's LabelledSources (train/tasks.py)
    labels: Any = None  # a fine-tuning task's LabelSet; None for language modelling

    @property
    def rules(self):
        return mesh_lib.axis_rules(self.config)

    def context(self, split_batch: bool = True):
        """Mesh and logical-axis rules, active while tracing so activation constraints apply.

        pmap brings its own device axis and refuses a context mesh; its state is replicated, so
        there is nothing for activation constraints to do. `split_batch=False` keeps the batch whole
        on every device: sampling decodes one sequence, which cannot be split.
        """
        stack = contextlib.ExitStack()
        if self.config.parallel.mode != "pmap":
            stack.enter_context(jax.set_mesh(self.mesh))
        rules = self.rules if split_batch else tuple((k, None if k == "batch" else v) for k, v in self.rules)
        stack.enter_context(nn.logical_axis_rules(rules))
        return stack


def check_workdir_matches(config: Config, workdir: Path) -> None:
    """A resumed run must build the state tree of the checkpoints in `workdir` (names, shapes, dtypes).

    The restore makes the same check (one mechanism); this one runs first, before any work and before
    config.yaml is replaced. Settings that leave the tree alone or only relayout it (scan_layers,
    remat, attention, dtype, the mesh) may change; a checkpoint whose files are damaged is left to
    the restore, which sets it aside.
    """
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return
    checkpointer = ckpt.Checkpointer(directory, config.checkpoint, read_only=True, run_config=to_dict(config))
    try:
        step = checkpointer.latest_step()
        if step is not None:  # the model and optimizer alone: cheap, no data is read
            checkpointer.check_fits(step, build(config, with_data=False).abstract_state)
            _check_same_objective(config, checkpointer.saved_config(step), checkpointer.directory / str(step))
    except ckpt.DamagedCheckpointError:
        pass
    finally:
        checkpointer.close()


def _check_same_objective(config: Config, saved: dict | None, checkpoint: Path) -> None:
    """A run learns one objective. A t5 run's two (span, seq2seq) build the same tree, so a resume on
    the other one would restore and go on with the first task's optimizer moments, schedule and data
    position without a word: refused. Moving to another task is a new run from the exported weights."""
    def section(name: str) -> dict:  # a damaged saved config is damage's to report, not this check's
        value = saved.get(name) if isinstance(saved, dict) else None
        return value if isinstance(value, dict) else {}

    saved_model, saved_train = section("model"), section("train")
    family = FAMILIES.get(saved_model.get("arch"))
    old = saved_train.get("objective") or (family.objective if family else None)
    if old is not None and old != config.objective:
        raise ConfigError(f"train.objective: checkpoint {checkpoint} was trained with train.objective={old}, this "
                          f"config says {config.objective}; resume with train.objective={old}, or start the new "
                          "task in a new workdir with init_from=<an `llm-jax export` of this run>")


def build(config: Config, mesh: jax.sharding.Mesh | None = None, with_data: bool = True) -> Setup:
    """Everything a run needs before the first step, in data-flow order."""
    workdir = Path(config.workdir)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
    sources = tokenizer = labels = None
    if with_data:
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        if tasks.is_task(config):
            sources, tokenizer = tasks.open_task_data(config, workdir)
            labels = sources.labels
        else:
            sources = data_lib.open_sources(config)
            tokenizer = load_or_train_tokenizer(config, workdir, sources)
    elif tasks.is_task(config):
        labels = tasks.required_labels(workdir)
    model = tasks.make_task_model(config, labels) if labels is not None else make_model(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps, scan_layers=config.model.scan_layers,
                                  finetune=config.finetune)
    masks = exported.load_export_mask(config.init_from) if config.init_from else None
    if masks is not None:  # a pruned export (infer/prune.py): its zeros stay zero while the run trains
        tx = optax.chain(tx, keep_masked_zero(masks))

    rules = mesh_lib.axis_rules(config)
    init_fn = functools.partial(init_state, model=model, tx=tx, seq_len=config.train.seq_len)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # An abstract key: nothing runs here, so planning for devices this host lacks works too.
        boxed = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)  # pmap: all replicated
    abstract_state = ckpt.abstract_with_shardings(nn.unbox(boxed), state_shardings)
    return Setup(config, workdir, mesh, model, tx, schedule, abstract_state, state_shardings, tokenizer, sources,
                 labels)


def create_state(setup: Setup) -> TrainState:
    """A fresh state, initialised directly in its sharded layout (never whole on one device)."""
    init_fn = functools.partial(init_state, model=setup.model, tx=setup.tx, seq_len=setup.config.train.seq_len)
    rng = jax.random.key_data(jax.random.key(setup.config.seed))

    def fresh_state(r):  # named: JAX's compile log (JAX_LOG_COMPILES) says `jit(fresh_state)`
        return nn.unbox(init_fn(r))

    with setup.context():
        return jax.jit(fresh_state, out_shardings=setup.state_shardings)(rng)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled steps of the run's parallel mode, and how batches and state enter them.

    `train` works on the state in its loop layout (`to_loop`); checkpoints, `eval` and sampling use
    the global layout (`to_global`). For the sharded path both layouts are the same arrays.
    """

    train: Any  # (loop-layout state, device batch) -> (state, metrics)
    eval: Any  # (global params, device batch) -> (loss sum, target count)
    put_batch: Any  # this process's numpy rows -> device batch
    to_loop: Any
    to_global: Any


def compile_steps(setup: Setup, teacher: distill.Teacher | None = None) -> Steps:
    """Train and eval steps with explicit shardings; the train state is donated. With a `teacher`
    (distill.teacher) the train step distils: the teacher's parameters are its third input, sharded
    like the student's and not donated."""
    c = setup.config
    mesh = setup.mesh
    batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)
    task = setup.labels is not None  # fine-tuning: the task's loss and eval (train/task_steps.py)
    loss_fn = task_loss_sums if task else None
    eval_fn = jax.jit(
        functools.partial(task_eval_step, model=setup.model, num_labels=len(setup.labels)) if task
        else functools.partial(eval_step, model=setup.model),
        in_shardings=(setup.state_shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    if c.parallel.mode == "pmap":
        train_fn = pmap.compile_train_step(setup.model, setup.tx, setup.schedule, mesh=mesh,
                                           grad_accum=c.optimizer.grad_accum, use_dropout=c.model.dropout > 0,
                                           loss_fn=loss_fn)
        return Steps(train=train_fn, eval=eval_fn, put_batch=lambda b: pmap.put_batch(b, mesh),
                     to_loop=lambda s: pmap.to_stacked(s, mesh), to_global=lambda s: pmap.to_global(s, mesh))
    step_fn = functools.partial(train_step, model=setup.model, tx=setup.tx, schedule=setup.schedule,
                                grad_accum=c.optimizer.grad_accum, use_dropout=c.model.dropout > 0,
                                param_shardings=setup.state_shardings.params, loss_fn=loss_fn)
    if teacher is not None:
        distilling = jax.jit(distill.with_teacher(step_fn, teacher, c),
                             in_shardings=(setup.state_shardings, batch_sharding, teacher.shardings),
                             out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
        train_fn = functools.partial(_call_with, distilling, teacher.params)
    else:
        train_fn = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sharding),
                           out_shardings=(setup.state_shardings, replicated), donate_argnums=0)
    return Steps(train=train_fn, eval=eval_fn,
                 put_batch=lambda b: mesh_lib.global_batch(b, batch_sharding, c.train.batch_size),
                 to_loop=lambda s: s, to_global=lambda s: s)


def _call_with(step, teacher_params, state, batch):
    return step(state, batch, teacher_params)


def held_out_batches(setup: Setup) -> list[dict[str, np.ndarray]]:
    """The rows this process's devices hold of the fixed eval batches, built once per run.

    Refuses a masked-LM eval set with no masked position (tiny batches of very short pieces): it
    would score loss 0 and perplexity 1, and rank as the best checkpoint.
    """
    c = setup.config
    if setup.labels is not None:
        return tasks.held_out_batches(setup)
    batches = data_lib.make_eval_batches(c, setup.tokenizer, setup.sources,
                                         mesh_lib.batch_rows(setup.mesh, c.train.batch_size))
    if c.objective == "mlm" and batches:  # an empty eval split skips evaluation, as for any objective
        weight = np.float32(sum(float(b["weights"].sum()) for b in batches))
        if jax.process_count() > 1:  # every process builds its rows here: the sum is over all of them
            from jax.experimental import multihost_utils

            weight = np.sum(multihost_utils.process_allgather(weight))
        if weight == 0:
            raise ConfigError(
                f"the held-out batches hold no masked token to score (train.eval_batches={c.train.eval_batches} "
                f"of {c.train.batch_size} x {c.train.seq_len}): raise train.eval_batches, train.batch_size "
                "or train.seq_len")
    return batches


def evaluate(setup: Setup, eval_fn, params, eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean loss and perplexity over the held-out batches (sums first, one division); for masked LM
    also the accuracy over the masked positions. Fine-tuning tasks: their metrics (train/tasks.py)."""
    if setup.labels is not None:
        return tasks.evaluate_task(setup, eval_fn, params, eval_batches)
    batch_sharding = mesh_lib.batch_sharding(setup.mesh)
    sums = {"loss": jnp.zeros(()), "correct": jnp.zeros(()), "weight": jnp.zeros(())}
    with setup.context():
        for local in eval_batches:
            batch = mesh_lib.global_batch(local, batch_sharding, setup.config.train.batch_size)
            sums = jax.tree.map(jnp.add, sums, eval_fn(params, batch))
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    weight = max(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    if setup.config.objective == "mlm":
        result["eval_accuracy"] = sums["correct"] / weight
    return result


def sample_text(setup: Setup, params, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                seed: int) -> str:
    """What the model makes of `prompt`: a decoder continues it (the text returned starts with the
    prompt); an encoder-decoder reads it as its input, ended by eos as training's inputs are, and
    returns the target it generates (span corruption: the text of each sentinel <extra_id_N> of the
    prompt, after that sentinel)."""
    tok = setup.tokenizer
    encoder_decoder = setup.config.model.family.encoder_decoder
    prompt_ids = tok.encode(prompt) + [tok.eos_id] if encoder_decoder else [tok.bos_id] + tok.encode(prompt)
    limit = _max_decode_len(setup.config)
    used = 0 if encoder_decoder else len(prompt_ids)  # the decoder's positions the prompt takes
    if max_new_tokens > limit - used:  # said aloud: a silently short answer looks like a bug
        log.warning("generating %d new tokens, not the %d asked: the model's length (%d)%s leaves no room for more",
                    max(limit - used, 0), max_new_tokens, limit, f" less the prompt's {used} tokens" if used else "")
        max_new_tokens = limit - used
    with setup.context(split_batch=False):
        ids = generate(setup.model, params, prompt_ids, max_new_tokens=max(max_new_tokens, 0),
                       rng=jax.random.key(seed), temperature=temperature, top_k=top_k, eos_id=tok.eos_id)
    return tok.decode(ids if encoder_decoder else ids[1:])


def fill_mask_text(setup: Setup, params, text: str, top_k: int) -> list[list[fill_mask.Candidate]]:
    """The `top_k` most likely tokens at each [MASK] of `text` (masked-LM runs)."""
    with setup.context(split_batch=False):
        return fill_mask.fill_mask(setup.model, params, setup.tokenizer, text, top_k=top_k,
                                   max_len=setup.config.model.max_len)


def _check_sample_prompt(setup: Setup) -> None:
    """Refuses, before the first step, a masked-LM sample prompt the model cannot read (longer than
    model.max_len): found at the end, it would fail a finished run."""
    c = setup.config
    if c.objective == "mlm" and "[MASK]" in c.train.sample_prompt and setup.labels is None:
        fill_mask.encode_with_masks(setup.tokenizer, c.train.sample_prompt, c.model.max_len,
                                    option="train.sample_prompt")


def _final_sample(setup: Setup, params) -> str | None:
    """What the finished model makes of train.sample_prompt: a continuation (decoders), the target it
    generates for it (encoder-decoders: for span corruption, what fills the prompt's sentinels), or
    the predictions at its [MASK]s (masked LM; None when the prompt has none)."""
    c = setup.config
    if setup.labels is not None:  # a fine-tuned head has nothing to sample
        return None
    if c.objective == "mlm":
        if "[MASK]" not in c.train.sample_prompt:
            return None
        return fill_mask.describe(fill_mask_text(setup, params, c.train.sample_prompt, top_k=5))
    return sample_text(setup, params, c.train.sample_prompt, max_new_tokens=c.train.sample_tokens,
                       temperature=c.train.temperature, top_k=c.train.top_k, seed=c.seed)


def _max_decode_len(config: Config) -> int:
    """The most positions generation writes in the decoder: a decoder's prompt and continuation (learned
    positions: the table's length); an encoder-decoder's target alone, its prompt being the encoder's.
    Relative and computed positions have no table: as long as training's rows, or model.max_len."""
    if config.model.family.encoder_decoder:
        return max(config.model.max_len, config.target_len)
    if config.model.resolved_position == "learned":
        return config.model.max_len
    return max(config.model.max_len, config.train.seq_len)


# Data settings that change how batches are made, not which: no warning on resume.
_DATA_RUNTIME_KEYS = ("workers", "prefetch", "prepared_dir", "num_shards")


def _data_changes(saved: dict | None, current: dict) -> list[str]:
    """`key old -> new` for each setting that changes which batches follow a checkpoint's data position:
    the data section, and outside it the shuffle order (`seed`) and how documents are cut
    (`train.seq_len`; an encoder-decoder's `train.target_len`)."""
    changed = []
    for key in ("seed", "train.seq_len", "train.target_len"):
        old, new = saved or {}, current
        for part in key.split("."):
            old, new = (old or {}).get(part), (new or {}).get(part)
        if old is not None and old != new:
            changed.append(f"{key} {old!r} -> {new!r}")
    return changed + ckpt.changed_settings(saved, current, ("data",), ignore=_DATA_RUNTIME_KEYS)


def train(config: Config) -> dict[str, Any]:
    """Runs (or resumes) the training job of `config`; returns the final summary.

    The workdir's lock comes first: a second run on a busy workdir leaves it untouched. A signal
    before the first step ends the run at once (StartupInterrupted); in the loop, after its step.
    """
    with StopSignal() as stop, run_lock.hold(config.workdir), contextlib.ExitStack() as on_exit:
        return _train(config, stop, on_exit)


def _train(config: Config, stop: StopSignal, on_exit: contextlib.ExitStack) -> dict[str, Any]:
    """Start-up in data-flow order, then the step loop, then the run's end."""
    is_main = jax.process_index() == 0
    workdir = Path(config.workdir)
    if config.init_from:
        config = ckpt.check_init_from(config)  # before any work; brings the exported tokenizer
    config = distill.check_teacher(config)  # likewise: the teacher's tokenizer, its vocabulary checked
    check_workdir_matches(config, workdir)
    setup = build(config)
    _check_sample_prompt(setup)
    # Before any step: a teacher that cannot be used ends the run now, in one line.
    teacher = distill.load_teacher(config, setup.mesh, build, setup.labels) if config.distill.teacher else None
    if is_main:
        dump_config(config, workdir / "config.yaml")
    if setup.labels is not None:
        tasks.save_run_labels(config, setup.labels)
    _log_setup(setup)
    # Measured once (on CPU a ~0.1 s matmul) before the data pipeline's threads start, which would
    # share the cores with the measurement; only process 0 logs.
    peak_flops = flops.total_peak_flops() if is_main else None

    # Exactly the rows this process's devices hold of every step's global batch.
    rows = mesh_lib.batch_rows(setup.mesh, config.train.batch_size)
    make_iterator = tasks.make_train_iterator if setup.labels is not None else shards.make_train_iterator
    train_iter = make_iterator(config, setup.tokenizer, setup.sources, rows)
    # On a stop during the start-up too: its worker processes must end before the command does (it
    # may end the process at once, see cli._end_process). Closing twice is harmless (_finish closes it).
    on_exit.callback(train_iter.close)
    iter_ckpt = ckpt.IteratorCheckpoint(lambda: shards.iterator_state(train_iter))
    eval_batches = held_out_batches(setup)
    stopper = EarlyStopping.from_config(config.train.early_stopping)  # None: off
    # Early stopping keeps the best checkpoint whatever checkpoint.keep_best says: the final report is of it.
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, run_config=to_dict(config),
                                     best=best_metric(config), keep_best=config.checkpoint.keep_best or bool(stopper))
    state, start, metadata = _restore_or_init(setup, checkpointer, train_iter)
    if stopper is not None:
        stopper.restore(metadata.get("early_stopping"))  # counts on where the checkpoint's run was
    log.info("per-device bytes: params %d, optimizer state %d",
             mesh_lib.bytes_per_device(state.params), mesh_lib.bytes_per_device(state.opt_state))

    steps = compile_steps(setup, teacher)
    writer = MetricsWriter(workdir, enabled=is_main)
    on_exit.callback(writer.close)  # on a failure too: its event file thread must end before the process
    guard = NonFiniteGuard(config.train.max_nonfinite_steps, total=int(metadata.get("nonfinite_steps", 0)))
    reporter = Reporter(config, writer, guard, start, peak_flops, show_progress=is_main and config.train.progress)
    run = _StepLoop(setup, steps, steps.to_loop(state), start, train_iter, iter_ckpt, eval_batches,
                    checkpointer, guard, reporter, stopper)
    stop.running()
    with setup.context():
        run.run(stop)
    return _finish(run, writer)


def _log_setup(setup: Setup) -> None:
    c = setup.config
    log.info("model: %s, %.2fM parameters; mesh %s over %d devices", c.model.arch,
             count_params(setup.abstract_state.params) / 1e6, dict(setup.mesh.shape), setup.mesh.size)
    if setup.labels is None:  # a task's data said what it kept and skipped as it was read
        log.info("data: %s", data_lib.skip_summary(setup.sources))
    log.info("dtypes: %s", describe_dtypes(setup.abstract_state.params, setup.abstract_state.opt_state, c.model.dtype))
    used = objectives.span_targets_used(c.train.seq_len, c.target_len) if c.objective == "span" else c.target_len
    if used < c.target_len and jax.process_index() == 0:
        log.warning("span corruption fills %d of the %d decoder positions (train.target_len) before the inputs fill "
                    "train.seq_len=%d: the rest of every row is padding; leave train.target_len at 0 to derive it",
                    used, c.target_len, c.train.seq_len)
    if c.objective == "seq2seq" and jax.process_index() == 0:  # one log: every process reads the same examples
        read, inputs_cut, targets_cut = data_lib.cut_pairs(c, setup.tokenizer, setup.sources.train)
        if inputs_cut or targets_cut:
            log.warning("of the first %d training examples, %d inputs are longer than train.seq_len=%d and %d targets "
                        "longer than the target length %d: they are cut (a cut target loses its end); raise "
                        "train.seq_len or train.target_len to keep them whole", read, inputs_cut, c.train.seq_len,
                        targets_cut, c.target_len)


def _restore_or_init(setup: Setup, checkpointer: ckpt.Checkpointer, train_iter) -> tuple[TrainState, int, dict]:
    """The newest checkpoint's state, step and metadata (the data position restored with it), or a
    fresh state at step 0 (from `init_from`'s exported parameters when given)."""
    c = setup.config
    # The train state is restored alone, then the data from the states every process saved: this
    # process's shards may have been run by others (another process count or mesh).
    restored = checkpointer.restore_latest(
        setup.abstract_state, lambda data_dir: shards.restore_from_checkpoint_dir(train_iter, data_dir),
        ignore_damaged=c.checkpoint.ignore_damaged)
    if restored is None:
        state = create_state(setup)
        if c.init_from and setup.labels is not None:  # the body exported, the head fresh
            state = state.replace(params=tasks.params_from_export(c, state.params, setup.abstract_state.params))
            log.info("starting from the parameters exported in %s (the body; the task head is new)", c.init_from)
        elif c.init_from:  # exported parameters, a fresh optimizer and step 0
            state = state.replace(params=ckpt.load_exported_params(c.init_from, c.model, setup.abstract_state.params))
            log.info("starting from the parameters exported in %s", c.init_from)
        return state, 0, {}
    state, metadata = restored
    start = int(metadata["step"])
    log.info("resumed from step %d (%s)", start, checkpointer.directory / str(start))
    if start > c.train.steps:  # nothing to train: the final report is of step `start`, not train.steps
        log.warning("the run is already at step %d, past train.steps=%d: nothing is trained; raise "
                    "train.steps to train further", start, c.train.steps)
    # Not an error (a run may move on to new data), but the batches are no longer those an
    # uninterrupted run would have seen: say so.
    changed = _data_changes(metadata.get("config"), to_dict(c))
    if changed:
        log.warning("the data changed since step %d: %s", start, ", ".join(changed))
    return state, start, metadata


class _StepLoop:
    """The steps of one run, on the state it owns, with its hooks: report, evaluate, save."""

    def __init__(self, setup: Setup, steps: Steps, state, start: int, train_iter, iter_ckpt, eval_batches,
                 checkpointer: ckpt.Checkpointer, guard: NonFiniteGuard, reporter: Reporter,
                 stopper: EarlyStopping | None = None):
        c = setup.config
        self.setup, self.config, self.steps = setup, c, steps
        self.state = state  # in the loop layout (steps.to_loop)
        self.start = self.step = start
        self.train_iter, self.iter_ckpt, self.eval_batches = train_iter, iter_ckpt, eval_batches
        self.checkpointer, self.guard, self.reporter = checkpointer, guard, reporter
        self.stopper = stopper
        self.is_main = jax.process_index() == 0
        self.wall_start = time.time()
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.save_clock = SaveClock(c.checkpoint.every_minutes)  # process 0's clock decides, for all processes
        self.agreement = ProcessAgreement(setup.mesh, every=c.train.agree_every)

    def run(self, stop: StopSignal) -> None:
        """Steps until the last one, an agreed stop, or divergence; metrics of logged steps are read
        one step late, so the host never waits for the device in between."""
        c, reporter = self.config, self.reporter
        stop_agreed = False
        while self.step < c.train.steps and not stop_agreed and not self.guard.diverged and not self.early_stopped:
            t0 = time.perf_counter()
            local = next(self.train_iter)
            reporter.waited_for_data(time.perf_counter() - t0)
            self.state, metrics = self.steps.train(self.state, self.steps.put_batch(local))
            self.step += 1
            step = self.step
            self.guard.push(step, metrics["nonfinite"])  # reads the flag of step - 1, already done
            # A signal or a time-based save on one process acts on all of them, at the same step.
            decision = self.agreement.exchange(step, stop.requested, lambda: self.is_main and self.save_clock.due())
            stop_agreed = decision.stop
            if step == self.start + 1:  # the first step compiles: start the throughput clock after it
                jax.block_until_ready(metrics)
                reporter.start_clock(step)
            reporter.flush()
            if step % c.train.log_every == 0 or step == c.train.steps:
                reporter.due(step, metrics)
            reporter.step_done()
            if self.guard.diverged:
                break  # nothing more is saved; the error is raised once the writers are closed
            eval_due = step % c.train.eval_every == 0 or step == c.train.steps
            save_due = (step % c.checkpoint.every == 0 or step == c.train.steps or stop_agreed or decision.save
                        or (eval_due and self.checkpointer.keep_best))  # keep_best: the evaluated state is on disk
            if stop_agreed and step < c.train.steps:
                log.warning("stopping at step %d on a signal: saving a checkpoint", step)
            if eval_due or save_due:
                self._pause_for(metrics, eval_due, save_due)
        reporter.flush()

    def _pause_for(self, metrics, eval_due: bool, save_due: bool) -> None:
        """Evaluates and/or saves the current step; the time it takes is not training time."""
        self.reporter.flush()  # the device must finish training before the pause is timed
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        if eval_due:
            self.evaluate()
        if save_due:
            self.save()
        self.reporter.paused(time.perf_counter() - t0)

    def evaluate(self) -> None:
        self.last_eval = evaluate(self.setup, self.steps.eval, self.steps.to_global(self.state.params),
                                  self.eval_batches)
        self.last_eval_step = self.step
        self.reporter.eval_done(self.step, self.last_eval)
        if self.stopper is not None and self.stopper.update(self.step, self.last_eval):
            log.info("%s", self.stopper.reason())

    @property
    def early_stopped(self) -> bool:
        return self.stopper is not None and self.stopper.stopped

    def save(self) -> None:
        step = self.step
        self.guard.read_through(step)
        if self.guard.streak:  # the newest update was skipped as non-finite: keep the last good checkpoint as is
            log.warning("not saving step %d: its loss or gradient was non-finite", step)
            return
        tokens_per_step = self.config.train.batch_size * flops.tokens_per_row(self.config)
        metadata = {"step": step, "tokens_seen": step * tokens_per_step, "wall_time_s": time.time() - self.wall_start,
                    "config": to_dict(self.config), "nonfinite_steps": self.guard.total}
        if self.stopper is not None:
            metadata["early_stopping"] = self.stopper.state_dict()
        evaluated = self.last_eval if self.last_eval_step == step else None  # ranks it for keep_best
        if evaluated and self.stopper is not None and self.stopper.best_step != step:
            # Not an improvement by early stopping's rule (a tie, or less than min_delta): never ranked the best.
            evaluated = {k: v for k, v in evaluated.items() if k != self.stopper.metric}
        self.checkpointer.save(step, self.steps.to_global(self.state), self.iter_ckpt, metadata, eval_metrics=evaluated)
        self.save_clock.saved()


def _finish(run: _StepLoop, writer: MetricsWriter) -> dict[str, Any]:
    """Closes the data and the bar; raises on divergence; otherwise evaluates (if the last step was
    not) and samples the final state. Returns the run's summary."""
    c, step = run.config, run.step
    run.train_iter.close()  # stops data worker processes
    run.reporter.close()
    run.guard.read_through(step)
    if run.guard.diverged:
        last_good = run.checkpointer.latest_step()
        run.checkpointer.close()  # in-flight saves of good steps finish
        writer.close()
        raise NonFiniteError(run.guard.message(step, last_good))

    # stopped_early: by a signal, to be resumed; a run ended by early stopping is done.
    summary: dict[str, Any] = {"step": step, "stopped_early": step < c.train.steps and not run.early_stopped}
    try:
        if run.stopper is not None:
            _report_best(run, summary)
        elif not summary["stopped_early"]:
            params = run.steps.to_global(run.state.params)
            last_eval = run.last_eval
            if run.last_eval_step != step:  # a finished run started again: evaluate its final state
                last_eval = evaluate(run.setup, run.steps.eval, params, run.eval_batches)
                writer.write(step, last_eval)
                log_eval(None, step, last_eval)
            summary.update(last_eval)
            summary["sample"] = _final_sample(run.setup, params)
    finally:  # a failure in the final eval or sample must not abandon the last save, still in flight
        run.checkpointer.close()
    writer.close()
    return summary


def _report_best(run: _StepLoop, summary: dict[str, Any]) -> None:
    """With early stopping, the final report is of the best checkpoint: its eval metrics, its step
    (`best_step`) and its sample; `early_stopping` says why the run stopped, or that it ran to the end."""
    stopper = run.stopper
    summary["early_stopping"] = stopper.summary(run.step, run.config.train.steps, interrupted=summary["stopped_early"])
    if summary["stopped_early"]:
        return
    run.checkpointer.wait()  # the best may be the save still in flight
    best_step = run.checkpointer.best_step()
    if best_step is None:  # nothing evaluated was saved (e.g. every eval was non-finite)
        log.warning("early stopping: no checkpoint holds %s; the final report is of step %d", stopper.metric, run.step)
        params, best_step = run.steps.to_global(run.state.params), run.step
    else:
        state, _ = run.checkpointer.restore(best_step, run.setup.abstract_state)
        params = state.params
    result = evaluate(run.setup, run.steps.eval, params, run.eval_batches)
    log.info("the final report is of the best checkpoint, step %d (%s %.6g)", best_step, stopper.metric,
             result.get(stopper.metric, math.nan))
    summary.update(result, best_step=best_step)
    summary["sample"] = _final_sample(run.setup, params)



def restore_for_inference(workdir: str | Path, overrides=(), with_data: bool = True) -> tuple[Setup, Any, int]:
    """The run's own config and the params of its newest checkpoint, for eval and generate; or those
    of an export directory (`llm-jax export`, `quantize`, `prune`), read by train/exported.py.

    `with_data=False` (generate, fill-mask): the run's own tokenizer alone, so the corpus it was
    trained on may be gone, and is never opened or prepared again; the data only when the run has no
    tokenizer yet."""
    from llm_jax.config import load_config

    workdir = Path(workdir)
    if exported.is_export(workdir):
        return exported.restore_export(workdir, overrides, with_data)
    config_path = workdir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{workdir} is not a run directory (no config.yaml)")
    config = load_config(config_path, [f"workdir={workdir}", "parallel.mode=jit", *overrides])
    tokenizer = None if with_data else load_run_tokenizer(config, workdir)
    if tokenizer is None:
        setup = build(config)
    else:
        setup = dataclasses.replace(build(config, with_data=False), tokenizer=tokenizer)
    restored = ckpt.read_latest(workdir, config, setup.abstract_state)
    if restored is None:
        raise ConfigError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
    state, metadata = restored
    return setup, state.params, int(metadata["step"])
