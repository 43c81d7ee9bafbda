"""A Hugging Face folder's weights, read one tensor at a time, and a model.safetensors written.

Reading: `model.safetensors`, or the shards that `model.safetensors.index.json` lists (what
`save_pretrained` writes above its `max_shard_size`). Each shard is opened once, memory-mapped, and a
tensor is copied out only when `read(name)` asks for it, so converting a model holds one tensor beside
the converted tree, never a second copy of the checkpoint. safetensors' numpy framework returns
bfloat16 tensors as ml_dtypes' bfloat16, which JAX takes as it is.

Writing: one `model.safetensors` (safetensors.numpy.save_file), with {"format": "pt"} in its header as
transformers expects. The whole state is built in memory first; a model larger than memory would need
a sharded write (one file per group of tensors, plus the index), which llm_jax does not do yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llm_jax.hf.errors import HFConversionError
from llm_jax.runtime.faults import first_line

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class WeightReader:
    """The tensors of a folder, by name. Use as a context manager; `read` counts what was read, so the
    converter can say which tensors no mapping used."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        self._file_of = _tensor_files(self.hf_dir)
        self._handles: dict[Path, object] = {}
        self.read_names: set[str] = set()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._file_of)

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype; HFConversionError when the folder lacks it."""
        path = self._file_of.get(name)
        if path is None:
            raise HFConversionError(f"{self.hf_dir}: the weights have no tensor {name!r}")
        try:
            tensor = self._open(path).get_tensor(name)
        except HFConversionError:
            raise
        except Exception as e:  # safetensors' SafetensorError, OSError of a truncated file
            raise HFConversionError(f"{path}: tensor {name!r} cannot be read: {first_line(e)}") from e
        self.read_names.add(name)
        return tensor

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise HFConversionError(f"{path} is missing (named by {INDEX})")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as e:  # a damaged or truncated header
                raise HFConversionError(f"{path} is not a readable safetensors file: {first_line(e)}") from e
        return self._handles[path]

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their mapping when dropped

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the index or the one file's header."""
    index, single = hf_dir / INDEX, hf_dir / WEIGHTS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {str(name): hf_dir / str(file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFConversionError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                                    f"{first_line(e)}") from e
    if single.is_file():
        try:
            with safe_open(str(single), framework="numpy") as f:
                return {name: single for name in f.keys()}
        except Exception as e:
            raise HFConversionError(f"{single} is not a readable safetensors file: {first_line(e)}") from e
    if any((hf_dir / name).is_file() for name in TORCH_WEIGHTS):
        raise HFConversionError(f"{hf_dir} holds PyTorch pickles (pytorch_model.bin) only; llm_jax reads safetensors: "
                                "re-save it with transformers' save_pretrained(dir, safe_serialization=True)")
    raise HFConversionError(f"{hf_dir} has no {WEIGHTS} or {INDEX}")


def write_weights(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]]) -> int:
    """Writes the (name, array) pairs to one safetensors file; returns the number of tensors."""
    state = {}
    for name, array in tensors:
        if name in state:
            raise ValueError(f"tensor {name!r} written twice")  # a mapping's bug, not the user's
        state[name] = np.ascontiguousarray(array)
    save_file(state, str(path), metadata={"format": "pt"})
    return len(state)
