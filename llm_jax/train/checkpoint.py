"""Orbax checkpoints of a run: train state, data iterator position and metadata, saved together;
and exported parameters (`llm-jax export`), the start of a new run with `init_from`.

Layout: `workdir/checkpoints/<step>/{state,data,metadata}`. Orbax writes each checkpoint under a
temporary name (`<step>.orbax-checkpoint-tmp-<time>`) and renames it when complete, so a save cut
short (even by SIGKILL) is never taken for a checkpoint; a training run removes such leftovers
when it opens the directory, and saving that step again works.

Export layout: `OUT/{params/, config.yaml, tokenizer/, export.json}`; a pruned export also holds
`mask/` (infer/prune.py), and export.json says whether the parameters are int8 (`quantization`,
infer/quantize.py) or pruned (`pruning`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from llm_jax.config import CheckpointConfig, Config, ConfigError, ModelConfig, dump_config, load_config, to_dict
from llm_jax.data.position import DamagedDataState
from llm_jax.data.tokenizer import TOKENIZER_FILES, tokenizer_file
from llm_jax.runtime import faults
from llm_jax.train import checkpoint_tree

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored; the message is one line."""


class DamagedCheckpointError(CheckpointError):
    """The files of a checkpoint are unreadable or truncated: the one reason to set it aside."""


# Restore rules. A checkpoint whose tree (names, shapes, dtypes) does not fit the config is a config
# error, found from its metadata before anything is restored. Of the errors while reading, only those
# that say the bytes are bad mean damage; a storage error may pass (permissions fixed, disk freed, the
# mount back) and moves nothing; anything else is reported and leaves the checkpoint where it is.
_STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO,
                             errno.ESTALE, errno.ETIMEDOUT})
_STORAGE_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED")
# TensorStore's words for bytes that are missing or do not decode (truncated, zeroed, garbled, deleted).
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")
_DAMAGE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError, DamagedDataState)
# grain's handler words a missing data state file as a plain ValueError, not a FileNotFoundError.
_DAMAGE_MESSAGES = re.compile(r"File .+ does not exist\.$")


DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: unreadable checkpoints set aside, never deleted


class IteratorCheckpoint:
    """Adapts a data iterator to grain's checkpoint handler for saving, which writes one file per process.

    Restoring goes around the handler (`Checkpointer.restore`'s `restore_data`), since a process
    may need the files of every process of another layout.
    """

    def __init__(self, get_state: Callable[[], dict]):
        self._get_state = get_state

    def get_state(self) -> bytes:
        return json.dumps(self._get_state()).encode()


class _DropReadOnlyNotice(logging.Filter):
    """Drops Orbax's 'Given directory is read only' warning, and only it.

    Read-only is what eval, generate and export ask for, so the warning (printed once per manager)
    says nothing; Orbax has no option to leave it out. Every other Orbax message still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


# Orbax's wording of an array that could not be read (its cause, TensorStore's error, is not always kept).
_FAILED_ARRAY_READ = "Encountered error while reading array index"


def _is_failed_read(error: BaseException | None) -> bool:
    return error is not None and (str(error).startswith(_FAILED_ARRAY_READ) or _error_kind(error)[0] != "other")


class _DropEchoesOfFailedReads(logging.Filter):
    """Drops asyncio's '<Task|Future> exception was never retrieved' reports of failed checkpoint reads.

    Orbax reads the arrays of a checkpoint in many asyncio tasks; the first failure ends the restore,
    and the other tasks' failures, never retrieved, are reported with a traceback each when the tasks
    are collected (by asyncio's logger, or as 'Exception ignored in: <coroutine ...>'): thousands of
    lines after the one that said the checkpoint is damaged (or cannot be read) and what was done
    about it. Anything else still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
            return True
        return not _is_failed_read(record.exc_info[1])


_DROP_ECHOES = _DropEchoesOfFailedReads()


def _quiet_echoes_of_failed_reads() -> None:
    """Installed once a read has failed (its one line is told by the caller)."""
    logging.getLogger("asyncio").addFilter(_DROP_ECHOES)  # the same filter is added only once
    hook = sys.unraisablehook
    if getattr(hook, "drops_failed_reads", False):
        return

    def quiet_unraisablehook(unraisable):
        if not _is_failed_read(unraisable.exc_value):
            hook(unraisable)

    quiet_unraisablehook.drops_failed_reads = True
    sys.unraisablehook = quiet_unraisablehook


class Checkpointer:
    """The checkpoints of one run directory.

    Kept: the newest `checkpoint.keep`, plus with `checkpoint.keep_best` (or `keep_best=True`) the best
    by `best` = (eval metric, min | max): the lowest eval loss unless early stopping names another
    metric (early_stopping.best_metric). `read_only` (eval, generate, export) never deletes, moves or
    cleans up anything, so it is safe beside a training run writing to the same directory.
    """

    def __init__(self, directory: str | Path, config: CheckpointConfig, read_only: bool = False,
                 run_config: dict | None = None, best: tuple[str, str] = ("eval_loss", "min"),
                 keep_best: bool | None = None):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self.run_config = run_config  # this run's resolved config: names the settings behind a mismatch
        self._last_save: int | None = None  # the step of the save that may still be in flight
        if not read_only and self.directory.exists() and not self.directory.is_dir():
            # Orbax would only fail at the first save, after the steps before it were trained.
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.directory))
        self.keep_best = config.keep_best if keep_best is None else keep_best
        self.best_metric, best_mode = best
        keep = {"max_to_keep": config.keep}
        if self.keep_best:
            # Orbax's `best_fn` alone would keep only the best `max_to_keep`; both policies together
            # keep the newest K (what resume needs) and the best one. A checkpoint counts for "best"
            # only if it was saved with the metric.
            rank = functools.partial(_metric, name=self.best_metric, mode=best_mode)
            keep = {
                "preservation_policy": pp.AnyPreservationPolicy([
                    pp.LatestN(n=config.keep),
                    # BestN keeps the last of the sorted list: descending for min, ascending for max.
                    pp.BestN(get_metric_fn=rank, reverse=best_mode == "min", n=1,
                             keep_checkpoints_without_metrics=False),
                ]),
                "best_fn": rank,  # makes Orbax write the metrics and answer best_step()
                "best_mode": best_mode,
            }
        if read_only:
            # Nothing is saved or deleted: give Orbax no saving or pruning settings, which it would
            # otherwise reset to these values with a warning each.
            keep.update(max_to_keep=None, save_interval_steps=0)
        options = ocp.CheckpointManagerOptions(
            **keep,
            enable_async_checkpointing=config.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of saves cut short by a crash
        )
        quiet = _DropReadOnlyNotice()
        absl_log = logging.getLogger("absl")  # Orbax logs through absl, whose records reach this logger
        absl_log.addFilter(quiet)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(),
                    "metadata": ocp.JsonCheckpointHandler(),
                },
            )
        finally:
            absl_log.removeFilter(quiet)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the best eval metric among the kept checkpoints (needs keep_best)."""
        if not self.keep_best:
            return None
        best = self.manager.best_step()
        return best if best is not None and self.manager.metrics(best) is not None else None

    def save(self, step: int, state: Any, data: IteratorCheckpoint | None, metadata: dict,
             eval_metrics: dict[str, float] | None = None) -> None:
        """Starts a save (async by default); the state arrays are copied before this returns.

        `eval_metrics` (of this very state) rank the checkpoint for keep_best.
        """
        items = {
            "state": ocp.args.StandardSave(state),
            "metadata": ocp.args.JsonSave(metadata),
        }
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        metrics = {k: float(v) for k, v in (eval_metrics or {}).items() if math.isfinite(v)} or None
        with self._save_faults(step):  # also reports a failure of the previous async save
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        self._last_save = step

    @contextlib.contextmanager
    def _save_faults(self, step: int | None = None):
        """A save that fails on the machine (disk full, read-only, no permission) ends the run in one
        line that names the step and the checkpoints kept. Orbax leaves the failed save under its
        temporary name, which the next run cleans up; no finished checkpoint is touched."""
        try:
            yield
        except Exception as e:
            error = faults.os_error_in(e)
            if error is None:
                raise
            # The save that failed: the one its path names (an async save fails at the next call).
            named = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(error.filename or ""))
            failed = int(named.group(1)) if named else step if step is not None else self._last_save
            with contextlib.suppress(Exception):  # let Orbax's threads end before the process does
                self.manager.close()
            # The writes of the failed save that never ran are collected as the process ends, each with a
            # RuntimeWarning ('coroutine ... was never awaited') after the one line below.
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()) \
                if self.directory.is_dir() else []
            raise faults.MachineFault(
                f"checkpoint {failed} could not be saved: {faults.describe(error)}; "
                f"the checkpoints saved before it are kept (steps: {', '.join(map(str, kept)) or 'none'})") from e

    def restore(self, step: int, abstract_state: Any,
                restore_data: Callable[[Path], None] | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs).

        `restore_data` moves the data pipeline to the position saved in the checkpoint's data folder
        (every process's file, whatever the layout): read here, so that a damaged data file counts as
        a damaged checkpoint like any other of its files.

        ConfigError: the checkpoint's tree does not fit (nothing was read but metadata).
        DamagedCheckpointError: its files are unreadable or truncated. CheckpointError: anything else,
        such as a storage error that may pass. Scanned and unrolled layers restore into each other.
        """
        saved_tree = self.check_fits(step, abstract_state)
        convert = checkpoint_tree.flat(saved_tree).keys() != checkpoint_tree.flat(abstract_state).keys()
        target = checkpoint_tree.restore_target(saved_tree, abstract_state) if convert else abstract_state
        items = {
            "state": ocp.args.StandardRestore(target),
            "metadata": ocp.args.JsonRestore(),
        }
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            if restore_data is not None:
                restore_data(self.directory / str(step) / "data")
        except ConfigError:  # e.g. data.virtual_shards changed: the files are fine, the config is not
            raise
        except Exception as e:  # orbax raises many types: sorted into damage and the rest
            raise self._failure(step, e) from e
        metadata = _checked_metadata(restored["metadata"], step, self.directory / str(step))
        state = restored["state"]
        if convert:
            state = checkpoint_tree.to_expected_layout(state, abstract_state)
            log.info("checkpoint %d: layers converted between the scanned and unrolled layouts", step)
        return state, metadata

    def check_fits(self, step: int, abstract_state: Any) -> Any:
        """The checkpoint's own state tree (orbax metadata: names, shapes, dtypes), after checking that it
        restores into `abstract_state`; a one-line ConfigError names the first difference."""
        try:
            saved = self.manager.item_metadata(step).get("state")
        except Exception as e:  # e.g. truncated _METADATA, a missing manifest, no permission
            raise self._failure(step, e) from e
        if saved is None:  # the state item is gone or its metadata file is missing
            raise DamagedCheckpointError(f"checkpoint {self.directory / str(step)} has no readable state metadata")
        saved_tree = saved.tree
        difference = checkpoint_tree.difference(checkpoint_tree.specs(checkpoint_tree.flat(saved_tree)),
                                                checkpoint_tree.specs(checkpoint_tree.flat(abstract_state)))
        if difference is not None:
            changed = changed_settings(self.saved_config(step), self.run_config,
                                       ("model", "optimizer", "finetune"), ignore=SAME_TREE_MODEL_KEYS)
            because = f" (changed since: {', '.join(changed)})" if changed else ""
            raise ConfigError(f"checkpoint {self.directory / str(step)} does not fit this config: {difference}"
                              f"{because}; use the settings the run was trained with, a new workdir, or "
                              "init_from=<an `llm-jax export` of this run>")
        return saved_tree

    def saved_config(self, step: int) -> dict | None:
        """The resolved config saved with a checkpoint (its metadata item), or None if unreadable."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
            return dict(restored["metadata"]).get("config")
        except Exception:  # only used to explain a mismatch; damage is found by the restore itself
            return None

    def restore_latest(self, abstract_state: Any, restore_data: Callable[[Path], None] | None = None,
                       ignore_damaged: bool = False, _rereads: int = 5) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores, or None when there is none.

        A damaged checkpoint is reported, set aside (never deleted) and an older one is used. Training
        must never be lost without a word, so unless `ignore_damaged` (checkpoint.ignore_damaged) a
        training run stops with a one-line CheckpointError when an earlier run left a damaged step newer
        than every good checkpoint, or when every checkpoint is damaged (it would start over at step 0).
        A read-only reader (eval, generate, export) whose checkpoint is deleted while it reads it, by a
        training run beside it that saved a newer one, reads the newest again.
        """
        steps = self.all_steps()
        damaged = self.damaged_steps()
        if not self.read_only and damaged and damaged[-1] > max(steps, default=-1):
            if not steps and not ignore_damaged:
                raise CheckpointError(
                    f"{self.directory.parent / DAMAGED_DIR} holds step {damaged[-1]} and checkpoints/ holds no good "
                    "checkpoint: the run would start over at step 0; to do so anyway, set "
                    "checkpoint.ignore_damaged=true")
            # Set aside by this run or an earlier one (which may have been killed before its next save):
            # the newest good checkpoint is where that run went on from, so this one does too.
            if steps:
                log.warning("%s holds step %d, newer than every good checkpoint: resuming from the newest good one",
                            self.directory.parent / DAMAGED_DIR, damaged[-1])
        failures = []
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state, restore_data)
            except CheckpointError as e:
                if self.read_only and _rereads and self._saved_since(step):  # pruned: neither damage nor storage
                    log.info("checkpoint %d was replaced by a newer one while it was read; reading the newest", step)
                    return self.restore_latest(abstract_state, restore_data, ignore_damaged, _rereads - 1)
                if not isinstance(e, DamagedCheckpointError):
                    raise
                if self.read_only:
                    log.warning("%s; trying an older one", e)
                else:
                    moved_to = self._set_aside(step)
                    log.warning("%s; moved it to %s and trying an older one", e, moved_to)
                failures.append(str(e))
        if failures and (self.read_only or not ignore_damaged):
            advice = "" if self.read_only else (f"; every checkpoint was set aside in {DAMAGED_DIR}/; to start "
                                                 "again from step 0, set checkpoint.ignore_damaged=true")
            raise CheckpointError(failures[0] + advice)
        return None

    def _saved_since(self, step: int) -> bool:
        """Whether a newer checkpoint than `step` appeared since the listing (a training run saved one,
        and may have deleted `step` as the oldest kept)."""
        try:
            self.manager.reload()
            return max(self.all_steps(), default=-1) > step
        except Exception:  # the listing itself fails: the caller reports the original error
            return False

    def damaged_steps(self) -> list[int]:
        """The steps set aside in damaged_checkpoints/ (by this run or earlier ones), in order."""
        folder = self.directory.parent / DAMAGED_DIR
        names = [p.name.split("-")[0] for p in folder.iterdir()] if folder.is_dir() else []
        return sorted(int(n) for n in names if n.isdigit())

    def _failure(self, step: int, error: BaseException) -> CheckpointError:
        """A one-line error for a failed read: damage (set aside) or not (left in place)."""
        where = self.directory / str(step)
        kind, cause = _error_kind(error)
        _quiet_echoes_of_failed_reads()  # told here, once
        reason = _first_line(cause)
        if kind == "storage" or not _is_dir(where):  # a lost mount reads as missing files
            return CheckpointError(f"checkpoint {where} cannot be read, a storage error: {reason}; nothing was "
                                   "moved: fix the storage and run again")
        if kind == "damage":
            return DamagedCheckpointError(f"checkpoint {where} is damaged: {reason}")
        return CheckpointError(f"checkpoint {where} cannot be restored: {reason}; it was left in place")

    def _set_aside(self, step: int) -> Path:
        """Moves a checkpoint that cannot be restored out of Orbax's sight (it would block a new
        save of the same step) into `damaged_checkpoints/` beside it: kept, never deleted."""
        target = self.directory.parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.directory / str(step)), str(target))
            except OSError as e:
                raise CheckpointError(f"cannot move the damaged checkpoint {self.directory / str(step)} to "
                                      f"{target}: {e}") from e
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"llm_jax_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until async saves are on disk."""
        with self._save_faults():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._save_faults():
            self.manager.wait_until_finished()
        self.manager.close()


def _checked_metadata(metadata: Any, step: int, where: Path) -> dict:
    """The metadata item as a save writes it (a dict naming this step; a config dict and a count of
    non-finite steps if present). Readable JSON of another shape is damage, like unreadable bytes."""
    fits = (isinstance(metadata, dict) and type(metadata.get("step")) is int and metadata["step"] == step
            and isinstance(metadata.get("config", {}), dict)
            and type(metadata.get("nonfinite_steps", 0)) is int)
    if not fits:
        raise DamagedCheckpointError(f"checkpoint {where} is damaged: its metadata is not what a save of step "
                                     f"{step} writes ({json.dumps(metadata)[:100]})")
    return dict(metadata)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring onto any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _metric(metrics: dict, name: str, mode: str) -> float:
    """A checkpoint's rank: its metric, or the worst value when it was saved without it (e.g. before
    early stopping named the metric)."""
    if name in metrics:
        return float(metrics[name])
    return math.inf if mode == "min" else -math.inf


def changed_settings(saved: dict | None, current: dict | None, sections: tuple[str, ...],
                     ignore: tuple[str, ...] = ()) -> list[str]:
    """`section.key old -> new` for each setting of `sections` that differs between two resolved configs."""
    changed = []
    for section in sections:
        old, new = (saved or {}).get(section) or {}, (current or {}).get(section) or {}
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key] and key not in ignore:
                changed.append(f"{section}.{key} {old[key]!r} -> {new[key]!r}")
    return changed


def _causes(error: BaseException):
    """The error, its causes and contexts, and the members of exception groups (asyncio)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _error_kind(error: BaseException) -> tuple[str, BaseException]:
    """("storage" | "damage" | "other", the error that says so). Storage wins: bytes that cannot be
    read for lack of permission or space say nothing about whether they are damaged."""
    causes = list(_causes(error))
    for e in causes:
        if (isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS) or str(e).startswith(_STORAGE_CODES):
            return "storage", e
    for e in causes:
        if isinstance(e, _DAMAGE_TYPES) or str(e).startswith(_DAMAGE_CODES) or _DAMAGE_MESSAGES.match(str(e)):
            return "damage", e
    return "other", error


def _first_line(error: BaseException) -> str:
    line = faults.first_line(error)
    return line if len(line) <= 300 else line[:297] + "..."


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a stale mount
        return False


# ----------------------------------------------------------------------------- exported parameters

EXPORT_PARAMS = "params"
EXPORT_CONFIG = "config.yaml"
EXPORT_TOKENIZER = "tokenizer"
EXPORT_INFO = "export.json"
# Model keys that change how the model runs, not what its parameters are: a run started from
# exported parameters may set them differently (e.g. dropout for fine-tuning).
RUNTIME_MODEL_KEYS = ("dropout", "dtype", "remat", "attention", "init_std", "max_documents_per_row")
# Model keys that leave a run's checkpoints restorable as they are (scan_layers: converted on restore).
SAME_TREE_MODEL_KEYS = (*RUNTIME_MODEL_KEYS, "scan_layers")


def check_out(out: str | Path) -> None:
    """Refuses an OUT that holds anything: every command that writes a new directory (export, quantize,
    prune, hf import/export) calls it before reading any weight."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; write to a new directory")


@contextlib.contextmanager
def directory_in_place(out: Path):
    """A new directory beside `out` to write into, renamed to `out` (absent or empty) when the block
    completes, removed when it fails: an interrupted write leaves no directory that looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty: checked by the caller
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_params(out: str | Path, params: Any, config: Config, tokenizer_dir: Path, info: dict,
                  extra: dict[str, Any] | None = None) -> Path:
    """Writes the parameters alone, the run's config and its tokenizer to `out` (a new directory);
    `extra` trees are written beside `params/`, each under its name (a pruned export's `mask`).

    Everything is written beside `out` first and renamed into place, so an interrupted export
    leaves no directory that looks complete.
    """
    out = Path(out).absolute()
    check_out(out)
    with directory_in_place(out) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / EXPORT_PARAMS, params)
            for name, tree in (extra or {}).items():
                checkpointer.save(tmp / name, tree)
            checkpointer.wait_until_finished()
        dump_config(config, tmp / EXPORT_CONFIG)
        (tmp / EXPORT_TOKENIZER).mkdir()
        for name in TOKENIZER_FILES:  # spm.model or tokenizer.json, with what goes beside it
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / EXPORT_TOKENIZER / name)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def _export_dir(path: str | Path) -> Path:
    path = Path(path).expanduser().absolute()
    if not (path / EXPORT_PARAMS).is_dir() or not (path / EXPORT_CONFIG).is_file():
        raise ConfigError(f"init_from: {path} is not an `llm-jax export` directory (no {EXPORT_PARAMS}/ "
                          f"and {EXPORT_CONFIG})")
    return path


def read_latest(workdir: str | Path, config: Config, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, metadata) of a run directory's newest checkpoint, or None when it has none. Read-only, so
    safe while a training run still writes to the directory; the tree is compared first, as in
    training (a mismatch is a ConfigError)."""
    reader = Checkpointer(Path(workdir) / "checkpoints", config.checkpoint, read_only=True,
                          run_config=to_dict(config))
    try:
        return reader.restore_latest(abstract_state)
    finally:
        reader.close()


def export_info(path: str | Path) -> dict:
    """The export's export.json: its step and source, and `quantization` / `pruning` when it has them."""
    file = Path(path) / EXPORT_INFO
    return json.loads(file.read_text()) if file.is_file() else {}


def check_init_from(config: Config) -> Config:
    """Checks `init_from` before any work (ConfigError) and returns the config to run.

    With no `tokenizer.path`, the run uses the exported model's tokenizer: the parameters only
    mean something with the token ids they were trained on.
    """
    path = _export_dir(config.init_from)
    if "quantization" in export_info(path):
        raise ConfigError(f"init_from: {path} holds int8 weights (llm-jax quantize), for inference only; start "
                          "from a float export (llm-jax export or llm-jax prune)")
    _check_same_model(path, config.model)
    model_file = tokenizer_file(path / EXPORT_TOKENIZER)  # spm.model or tokenizer.json
    if config.tokenizer.path or model_file is None:
        return config
    return dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer, path=str(model_file)))


# Model keys whose None means the family's value or another key's: compared by what they resolve to, so a
# config that spells out what the export left to its default (model.n_decoder_layers=2 beside n_layers=2)
# is the same model, and a difference names numbers, not None.
_RESOLVED_MODEL_KEYS = {"n_encoder_layers": "encoder_layers", "n_decoder_layers": "decoder_layers",
                        "n_kv_heads": "kv_heads", "position": "resolved_position",
                        "tie_embeddings": "resolved_tie_embeddings", "activation": "resolved_activation",
                        "gated_mlp": "resolved_gated_mlp", "norm_eps": "resolved_norm_eps",
                        "head_dim": "resolved_head_dim"}


def _check_same_model(path: Path, model: ModelConfig) -> None:
    saved = load_config(path / EXPORT_CONFIG).model
    for field in dataclasses.fields(ModelConfig):
        name = _RESOLVED_MODEL_KEYS.get(field.name, field.name)
        ours, theirs = getattr(model, name), getattr(saved, name)
        if field.name not in SAME_TREE_MODEL_KEYS and ours != theirs:
            raise ConfigError(f"init_from: {path} holds a model with model.{field.name}={theirs!r}, not {ours!r}; "
                              "use the same model settings")


def load_exported_params(path: str | Path, model: ModelConfig, abstract_params: Any) -> Any:
    """The exported parameters at `path`, placed with the shardings of `abstract_params`.

    The model config must match the export's (apart from SAME_TREE_MODEL_KEYS): one-line ConfigError.
    Scanned and unrolled layers restore into each other, as in a run's own checkpoints.
    """
    path = _export_dir(path)
    _check_same_model(path, model)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(path / EXPORT_PARAMS).item_metadata
            convert = saved is not None and (checkpoint_tree.flat(saved.tree).keys()
                                             != checkpoint_tree.flat(abstract_params).keys())
            target = checkpoint_tree.restore_target(saved.tree, abstract_params) if convert else abstract_params
            params = checkpointer.restore(path / EXPORT_PARAMS, target)
    except Exception as e:  # orbax raises many types for damaged or incompatible files
        raise CheckpointError(f"init_from: {path / EXPORT_PARAMS} cannot be restored: {faults.first_line(e)}") from e
    return checkpoint_tree.to_expected_layout(params, abstract_params) if convert else params
