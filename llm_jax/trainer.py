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
from flax import linen as nn

from llm_jax import checkpoint as ckpt
from llm_jax import data as data_lib
from llm_jax import flops, pmap_mode, run_lock, sharding
from llm_jax.config import Config, ConfigError, dump_config, to_dict
from llm_jax.fault_tolerance import NonFiniteError, NonFiniteGuard, ProcessAgreement, SaveClock
from llm_jax.generate import generate
from llm_jax.metrics import MetricsWriter
from llm_jax.optim import describe_dtypes, make_optimizer
from llm_jax.steps import TrainState, eval_step, init_state, train_step
from llm_jax.stop_signal import StopSignal
from llm_jax.tokenizer import Tokenizer, load_or_train_tokenizer
from llm_jax.transformer import Transformer, count_params

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """What a run builds once: model, optimizer, mesh, shardings, tokenizer and data sources."""

    config: Config
    workdir: Path
    mesh: jax.sharding.Mesh
    model: Transformer
    tx: Any
    schedule: Any
    abstract_state: Any  # unboxed ShapeDtypeStructs of the TrainState
    state_shardings: Any
    tokenizer: Tokenizer | None  # None when built without data (bench)
    sources: Any

    @property
    def rules(self):
        return sharding.axis_rules(self.config)

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
    except ckpt.DamagedCheckpointError:
        pass
    finally:
        checkpointer.close()


def build(config: Config, mesh: jax.sharding.Mesh | None = None, with_data: bool = True) -> Setup:
    """Everything a run needs before the first step, in data-flow order."""
    workdir = Path(config.workdir)
    mesh = mesh if mesh is not None else sharding.make_mesh(config)
    sources = tokenizer = None
    if with_data:
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        sources = data_lib.open_sources(config)
        tokenizer = load_or_train_tokenizer(config, workdir, sources)
    model = Transformer(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps, scan_layers=config.model.scan_layers)

    rules = sharding.axis_rules(config)
    init_fn = functools.partial(init_state, model=model, tx=tx, seq_len=config.train.seq_len)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # An abstract key: nothing runs here, so planning for devices this host lacks works too.
        boxed = jax.eval_shape(init_fn, jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_shardings = sharding.logical_shardings(boxed, mesh, rules)  # pmap: all replicated
    abstract_state = ckpt.abstract_with_shardings(nn.unbox(boxed), state_shardings)
    return Setup(config, workdir, mesh, model, tx, schedule, abstract_state, state_shardings, tokenizer, sources)


def create_state(setup: Setup) -> TrainState:
    """A fresh state, initialised directly in its sharded layout (never whole on one device)."""
    init_fn = functools.partial(init_state, model=setup.model, tx=setup.tx, seq_len=setup.config.train.seq_len)
    rng = jax.random.key_data(jax.random.key(setup.config.seed))
    with setup.context():
        return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=setup.state_shardings)(rng)


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


def compile_steps(setup: Setup) -> Steps:
    """Train and eval steps with explicit shardings; the train state is donated."""
    c = setup.config
    mesh = setup.mesh
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    eval_fn = jax.jit(
        functools.partial(eval_step, model=setup.model),
        in_shardings=(setup.state_shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    if c.parallel.mode == "pmap":
        train_fn = pmap_mode.compile_train_step(setup.model, setup.tx, setup.schedule, mesh=mesh,
                                                grad_accum=c.optimizer.grad_accum, use_dropout=c.model.dropout > 0)
        return Steps(train=train_fn, eval=eval_fn, put_batch=lambda b: pmap_mode.put_batch(b, mesh),
                     to_loop=lambda s: pmap_mode.to_stacked(s, mesh), to_global=lambda s: pmap_mode.to_global(s, mesh))
    train_fn = jax.jit(
        functools.partial(train_step, model=setup.model, tx=setup.tx, schedule=setup.schedule,
                          grad_accum=c.optimizer.grad_accum, use_dropout=c.model.dropout > 0,
                          param_shardings=setup.state_shardings.params),
        in_shardings=(setup.state_shardings, batch_sharding),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=0,
    )
    return Steps(train=train_fn, eval=eval_fn, put_batch=lambda b: sharding.global_batch(b, batch_sharding),
                 to_loop=lambda s: s, to_global=lambda s: s)


def held_out_batches(setup: Setup) -> list[dict[str, np.ndarray]]:
    """This process's rows of the fixed eval batches, built once per run."""
    return data_lib.make_eval_batches(setup.config, setup.tokenizer, setup.sources,
                                      jax.process_index(), jax.process_count())


def evaluate(setup: Setup, eval_fn, params, eval_batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean loss and perplexity over the held-out batches (sums first, one division)."""
    batch_sharding = sharding.batch_sharding(setup.mesh)
    loss_sum = jnp.zeros(())
    weight_sum = jnp.zeros(())
    with setup.context():
        for local in eval_batches:
            batch_loss, batch_weight = eval_fn(params, sharding.global_batch(local, batch_sharding))
            loss_sum, weight_sum = loss_sum + batch_loss, weight_sum + batch_weight
    loss_sum, weight_sum = jax.device_get((loss_sum, weight_sum))
    loss = float(loss_sum) / max(float(weight_sum), 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def sample_text(setup: Setup, params, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                seed: int) -> str:
    tok = setup.tokenizer
    prompt_ids = [tok.bos_id] + tok.encode(prompt)
    limit = _max_decode_len(setup.config)
    if max_new_tokens > limit - len(prompt_ids):  # said aloud: a silently short answer looks like a bug
        log.warning("generating %d new tokens, not the %d asked: the prompt's %d tokens and the model's length "
                    "(%d) leave no room for more", max(limit - len(prompt_ids), 0), max_new_tokens,
                    len(prompt_ids), limit)
        max_new_tokens = limit - len(prompt_ids)
    with setup.context(split_batch=False):
        ids = generate(setup.model, params, prompt_ids, max_new_tokens=max(max_new_tokens, 0),
                       rng=jax.random.key(seed), temperature=temperature, top_k=top_k, eos_id=tok.eos_id)
    return tok.decode(ids[1:])


def _max_decode_len(config: Config) -> int:
    if config.model.resolved_position == "learned":
        return config.model.max_len
    return max(config.model.max_len, config.train.seq_len)


def _log_eval(bar, step: int, result: dict[str, float]) -> None:
    """One console line per evaluation, as it happens (metrics.jsonl has them too, but no one watches it)."""
    message = f"step {step}: eval loss {result['eval_loss']:.4f}, eval perplexity {result['eval_perplexity']:.2f}"
    if bar is None:
        log.info(message)
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # printed above the bar rather than through it
        log.info(message)


def _progress_bar(config: Config, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)


# Data settings that change how batches are made, not which: no warning on resume.
_DATA_RUNTIME_KEYS = ("workers", "prefetch", "prepared_dir", "num_shards")


def _data_changes(saved: dict | None, current: dict) -> list[str]:
    """`key old -> new` for each setting that changes which batches follow a checkpoint's data position:
    the data section, and outside it the shuffle order (`seed`) and how documents are cut (`train.seq_len`)."""
    changed = []
    for key in ("seed", "train.seq_len"):
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
    is_main = jax.process_index() == 0
    workdir = Path(config.workdir)
    if config.init_from:
        config = ckpt.check_init_from(config)  # before any work; brings the exported tokenizer
    check_workdir_matches(config, workdir)
    setup = build(config)
    c = config
    if is_main:
        dump_config(c, workdir / "config.yaml")
    log.info("model: %s, %.2fM parameters; mesh %s over %d devices", c.model.arch,
             count_params(setup.abstract_state.params) / 1e6, dict(setup.mesh.shape), setup.mesh.size)
    log.info("data: %s", data_lib.skip_summary(setup.sources))
    log.info("dtypes: %s", describe_dtypes(setup.abstract_state.params, setup.abstract_state.opt_state, c.model.dtype))
    # Measured once (on CPU a ~0.1 s matmul) before the data pipeline's threads start, which would
    # share the cores with the measurement; only process 0 logs.
    peak_flops = flops.total_peak_flops() if is_main else None

    train_iter = data_lib.make_train_iterator(c, setup.tokenizer, setup.sources,
                                              jax.process_index(), jax.process_count())
    iter_ckpt = ckpt.IteratorCheckpoint(lambda: data_lib.iterator_state(train_iter),
                                        lambda s: data_lib.restore_iterator_state(train_iter, s))
    eval_batches = held_out_batches(setup)
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", c.checkpoint, run_config=to_dict(c))
    # A checkpoint saved by another number of processes holds no data state for this process: the
    # train state is restored alone, then the data restarts from every old process's position.
    latest = checkpointer.latest_step()
    own_data = latest is None or data_lib.has_own_saved_state(
        checkpointer.directory / str(latest) / "data", jax.process_index(), jax.process_count())
    restored = checkpointer.restore_latest(setup.abstract_state, iter_ckpt if own_data else None,
                                           ignore_damaged=c.checkpoint.ignore_damaged)
    if restored is None:
        state = create_state(setup)
        if c.init_from:  # exported parameters, a fresh optimizer and step 0
            state = state.replace(params=ckpt.load_exported_params(c.init_from, c.model, setup.abstract_state.params))
            log.info("starting from the parameters exported in %s", c.init_from)
        start = 0
        metadata = {}
    else:
        state, metadata = restored
        start = int(metadata["step"])
        log.info("resumed from step %d (%s)", start, checkpointer.directory / str(start))
        # Not an error (a run may move on to new data), but the batches are no longer those an
        # uninterrupted run would have seen: say so.
        changed = _data_changes(metadata.get("config"), to_dict(c))
        if changed:
            log.warning("the data changed since step %d: %s", start, ", ".join(changed))
        if not own_data:
            data_lib.restore_from_checkpoint_dir(train_iter, checkpointer.directory / str(start) / "data")
    log.info("per-device bytes: params %d, optimizer state %d",
             sharding.bytes_per_device(state.params), sharding.bytes_per_device(state.opt_state))

    steps = compile_steps(setup)
    state = steps.to_loop(state)
    writer = MetricsWriter(workdir, enabled=is_main)
    on_exit.callback(writer.close)  # on a failure too: its event file thread must end before the process
    tokens_per_step = c.train.batch_size * c.train.seq_len
    bar = _progress_bar(c, start, enabled=is_main and c.train.progress)
    wall_start = time.time()
    last_eval: dict[str, float] = {}
    last_eval_step = -1
    guard = NonFiniteGuard(c.train.max_nonfinite_steps, total=int(metadata.get("nonfinite_steps", 0)))
    save_clock = SaveClock(c.checkpoint.every_minutes)  # process 0's clock decides, for all processes
    agreement = ProcessAgreement(setup.mesh, every=c.train.agree_every)

    def save(step: int) -> None:
        guard.read_through(step)
        if guard.streak:  # the newest update was skipped as non-finite: keep the last good checkpoint as is
            log.warning("not saving step %d: its loss or gradient was non-finite", step)
            return
        metadata = {"step": step, "tokens_seen": step * tokens_per_step, "wall_time_s": time.time() - wall_start,
                    "config": to_dict(c), "nonfinite_steps": guard.total}
        eval_loss = last_eval["eval_loss"] if last_eval_step == step else None  # ranks it for keep_best
        checkpointer.save(step, steps.to_global(state), iter_ckpt, metadata, eval_loss=eval_loss)
        save_clock.saved()

    pending = None  # (step, device metrics) of the last dispatched step that is due for logging
    # Throughput between two reports; time spent in eval and checkpointing is not training time.
    clock = {"time": time.perf_counter(), "step": start, "wait": 0.0, "paused": 0.0}

    def report(step: int, device_metrics) -> None:
        host = jax.device_get(device_metrics)  # blocks until `step` is done; step + 1 is queued
        now = time.perf_counter()
        elapsed = max(now - clock["time"] - clock["paused"], 1e-9)
        row = {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
               "tokens_per_sec": (step - clock["step"]) * tokens_per_step / elapsed,
               "data_wait_frac": min(clock["wait"] / elapsed, 1.0)}
        step_mfu = flops.mfu(row["tokens_per_sec"], c, peak_flops)
        if step_mfu is not None:
            row["mfu"] = step_mfu
        guard.read_through(step)
        row["nonfinite_steps"] = guard.total  # steps skipped so far, this one included
        writer.write(step, row)
        if bar is not None:
            # On CPU the peak is one short matmul measured on cores other processes share: an MFU
            # against it says little, so the bar shows it on accelerators only (metrics.jsonl keeps it).
            mfu_shown = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row and jax.default_backend() != "cpu" else {}
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", **mfu_shown,
                            refresh=False)
        clock.update(time=now, step=step, wait=0.0, paused=0.0)

    step = start
    stop_agreed = False
    stop.running()
    with setup.context():
        while step < c.train.steps and not stop_agreed and not guard.diverged:
            t0 = time.perf_counter()
            local = next(train_iter)
            clock["wait"] += time.perf_counter() - t0
            state, metrics = steps.train(state, steps.put_batch(local))
            step += 1
            guard.push(step, metrics["nonfinite"])  # reads the flag of step - 1, already done
            # A signal or a time-based save on one process acts on all of them, at the same step.
            decision = agreement.exchange(step, stop.requested, lambda: is_main and save_clock.due())
            stop_agreed = decision.stop
            if step == start + 1:  # the first step compiles: start the throughput clock after it
                jax.block_until_ready(metrics)
                clock.update(time=time.perf_counter(), step=step, wait=0.0)
            if pending is not None:
                report(*pending)
                pending = None
            if step % c.train.log_every == 0 or step == c.train.steps:
                pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            if guard.diverged:
                break  # nothing more is saved; the error is raised once the writers are closed
            eval_due = step % c.train.eval_every == 0 or step == c.train.steps
            save_due = (step % c.checkpoint.every == 0 or step == c.train.steps or stop_agreed or decision.save
                        or (eval_due and c.checkpoint.keep_best))  # keep_best: the evaluated state is on disk
            if stop_agreed and step < c.train.steps:
                log.warning("stopping at step %d on a signal: saving a checkpoint", step)
            if eval_due or save_due:
                if pending is not None:  # the device must finish training before the pause is timed
                    report(*pending)
                    pending = None
                jax.block_until_ready(metrics)
                t0 = time.perf_counter()
                if eval_due:
                    last_eval = evaluate(setup, steps.eval, steps.to_global(state.params), eval_batches)
                    last_eval_step = step
                    writer.write(step, last_eval)
                    _log_eval(bar, step, last_eval)
                if save_due:
                    save(step)
                clock["paused"] += time.perf_counter() - t0
        if pending is not None:
            report(*pending)
    train_iter.close()  # stops data worker processes
    if bar is not None:
        bar.close()
    guard.read_through(step)
    if guard.diverged:
        last_good = checkpointer.latest_step()
        checkpointer.close()  # in-flight saves of good steps finish
        writer.close()
        raise NonFiniteError(guard.message(step, last_good))

    summary: dict[str, Any] = {"step": step, "stopped_early": step < c.train.steps}
    if not summary["stopped_early"]:
        params = steps.to_global(state.params)
        if last_eval_step != step:  # a finished run started again: evaluate its final state
            last_eval = evaluate(setup, steps.eval, params, eval_batches)
            writer.write(step, last_eval)
            _log_eval(None, step, last_eval)
        summary.update(last_eval)
        summary["sample"] = sample_text(setup, params, c.train.sample_prompt,
                                        max_new_tokens=c.train.sample_tokens, temperature=c.train.temperature,
                                        top_k=c.train.top_k, seed=c.seed)
    checkpointer.close()
    writer.close()
    return summary


def restore_for_inference(workdir: str | Path, overrides=()) -> tuple[Setup, Any, int]:
    """The run's own config and the params of its newest checkpoint, for eval and generate."""
    from llm_jax.config import load_config

    workdir = Path(workdir)
    config_path = workdir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{workdir} is not a run directory (no config.yaml)")
    config = load_config(config_path, [f"workdir={workdir}", "parallel.mode=jit", *overrides])
    setup = build(config)
    # Read-only: safe while a training run still writes to this directory.
    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", config.checkpoint, read_only=True,
                                     run_config=to_dict(config))
    try:  # the tree is compared first, as in training: a mismatch is a ConfigError
        restored = checkpointer.restore_latest(setup.abstract_state, None)
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"{workdir} has no checkpoint yet (checkpoints/ is empty)")
    state, metadata = restored
    return setup, state.params, int(metadata["step"])
