"""Building a Config: defaults <- YAML file <- dotted key=value overrides, then validated.

Every error a user can make in a config is a `ConfigError` with one line naming the key; the CLI
turns it into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from llm_jax.config.checks import validate
from llm_jax.config.schema import Config, ConfigError


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. 'model.n_layers'."""
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys += all_keys(ftype, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, siblings: typing.Sequence[str] = ()) -> ConfigError:
    """`siblings`: the valid keys beside `key`, for keys inside list entries (e.g. data.mixture.0.path)."""
    close = difflib.get_close_matches(key, [*all_keys(), *siblings], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with a valid dotted key such as 'train.steps'"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, ftype: Any) -> Any:
    """Checks `value` against the annotated type; ints are accepted where floats are."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(ftype)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        allowed = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(ftype)[0]):
        return _coerce_entries(key, value, typing.get_args(ftype)[0])
    if origin is tuple and typing.get_args(ftype)[0] is str:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' must be a list of strings, e.g. '[\"<a>\", \"<b>\"]', got {value!r}")
        return tuple(value)
    if origin is tuple:  # the axis rules: a list of [logical_name, mesh_axis or list or null]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in value
        ):
            raise ConfigError(f"config key '{key}' must be a list of [logical_axis, mesh_axis] pairs")
        return tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in value)
    if ftype is bool:
        if isinstance(value, bool):
            return value
    elif ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ftype is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means anything as NaN or infinity, and NaN slips through every `x >= 0` check.
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif ftype is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' must be {ftype.__name__}, got {value!r}")


def _coerce_entries(key: str, value: Any, entry_type: type) -> tuple[Any, ...]:
    """A list of mappings (YAML), or {0: ..., 1: ...} from dotted overrides, as a tuple of `entry_type`."""
    if isinstance(value, dict) and all(str(k).isdigit() for k in value):
        indices = sorted(int(k) for k in value)
        if indices != list(range(len(indices))):
            raise ConfigError(f"config key '{key}': entries must be numbered 0, 1, 2, ... without gaps, got {indices}")
        value = [value[k] for k in sorted(value, key=lambda k: int(k))]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"config key '{key}' must be a list of mappings such as "
                          f"[{{source: text, path: 'a/*.txt', weight: 1}}], got {value!r}")
    return tuple(_build(entry_type, entry, f"{key}.{i}.") for i, entry in enumerate(value))


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        if name not in types_:
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key in the error
                (name, value), = value.items()
                key += "." + str(name)
            raise _unknown_key(key, [prefix + n for n in types_])
        ftype = types_[name]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. '{key}.<name>=...'")
            kwargs[name] = _build(ftype, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, ftype)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        if isinstance(node, list):  # an entry of a list from the YAML file, e.g. data.mixture.1.weight
            index = _list_index(node, part, key)
            if index == len(node):
                node.append({})
            node = node[index]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise _unknown_key(key)
        node = child
    if isinstance(node, list):
        index = _list_index(node, parts[-1], key)
        node[index:index + 1] = [value]
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise _unknown_key(key)


def _list_index(entries: list, part: str, key: str) -> int:
    """The list position named by one part of a dotted key; one past the end appends an entry."""
    if not part.isdigit() or int(part) > len(entries):
        raise ConfigError(f"config key '{key}': '{part}' must be an entry number from 0 to {len(entries)}")
    return int(part)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=200' -> ('train.steps', 200). Values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"expected key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last one silently, so a second `model:` section drops the whole first
    one. YAML merge keys (`<<: *base`) stay allowed: overriding a merged key is what they are for.
    """

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: the base class names that error
                    continue
                line = key_node.start_mark.line + 1
                if seen:
                    raise _DuplicateKeyError(f"key '{key}' is given twice (lines {first_line[key]} and {line}); "
                                             "keep one, as the second would silently replace the first")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- key=value overrides, validated. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except _DuplicateKeyError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(Config, tree)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """Plain YAML-friendly dict (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
