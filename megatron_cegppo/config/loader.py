"""YAML files plus dotted command-line overrides into a typed :class:`Config`.

Every problem of a file and its overrides is collected and raised together, one line each."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from megatron_cegppo.config.errors import ConfigError
from megatron_cegppo.config.schema import Config

_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation``, or :class:`ConfigError` naming ``key``."""
    if typing.get_origin(annotation) is Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        try:
            return _coerce(value, args[0], key)
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(args[0])} or null, got {value!r}") from None
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation is list and isinstance(value, list):
        return value
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")


def _unknown_key(key: str, name: str, known: Iterable[str], owner: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"unknown key {key} (did you mean {close[0]}?)"
    return f"unknown key {key}; known keys of {owner}: {sorted(known)}"


def _build(cls, data: Any, prefix: str, found: list, parsed: list):
    """An instance of ``cls`` from ``data``; a key that is unknown or of the wrong type is
    named in ``found`` and left at its default. ``parsed``: (dotted key, value) of the rest."""
    owner = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        found.append(f"{owner}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            found.append(_unknown_key(key, str(name), names, owner))
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".", found, parsed)
            continue
        try:
            kwargs[name] = _coerce(value, hint, key)
        except ConfigError as exc:
            found.append(str(exc))
            continue
        parsed.append((key, kwargs[name]))
    return cls(**kwargs)


# --- the YAML file -----------------------------------------------------------------------------

def _duplicate_keys(node, prefix: str) -> list[str]:
    """Each key given twice in one mapping of the composed YAML, at any depth (PyYAML would
    keep the last silently), with both lines."""
    import yaml

    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key in seen:
                out.append(f"{key} is given twice (lines {seen[key]} and {line}); give it once")
            else:
                seen[key] = line
            out.extend(_duplicate_keys(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.extend(_duplicate_keys(item, f"{prefix.rstrip('.')}[{i}]."))
    return out


def _yaml_problem(where: str, exc) -> str:
    """One line for a PyYAML error: where it is and what."""
    mark = getattr(exc, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    what = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
    return f"{where} is not valid YAML{at}: {what}"


def _parse_yaml(text: str, where: str, found: list) -> Any:
    """The document of ``text``; its problems (invalid YAML, duplicated keys) go to ``found``."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        found.extend(f"{where}: {d}" for d in _duplicate_keys(node, ""))
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        found.append(_yaml_problem(where, exc))
        return None
    finally:
        loader.dispose()


def _read_text(path: Path, found: list) -> Optional[str]:
    try:
        if not path.exists():
            found.append(f"config file {path} does not exist")
            return None
        if path.is_dir():
            found.append(f"config file {path} is a directory, not a YAML file")
            return None
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        found.append(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})")
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        found.append(f"config file {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}")
    return None


def _read_file(path: Path, found: list) -> dict:
    """The file's tree of sections; ``{}`` (and its problems in ``found``) when it has none."""
    text = _read_text(path, found)
    if text is None:
        return {}
    before = len(found)
    tree = _parse_yaml(text, str(path), found)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        if len(found) == before:
            found.append(f"{path}: the top level must be a mapping of sections, got a {type(tree).__name__}")
        return {}
    return tree


# --- overrides ---------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """``algorithm.beta1=0.75`` -> (``algorithm.beta1``, 0.75); the value is read as YAML."""
    key, _, raw = (part.strip() for part in text.partition("="))
    if "=" not in text or not _OVERRIDE_KEY.fullmatch(key):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    if not raw:
        return key, ""
    found: list = []
    value = _parse_yaml(raw, f"override {text!r}: the value", found)
    if found:
        raise ConfigError(found[0])
    return key, value


def _override_target(tree: dict, key: str, text: str) -> tuple[Optional[dict], Optional[str]]:
    """(the mapping of ``tree`` that ``key``'s last part goes in, or None; a problem or None).
    The key is checked against the schema, so an unknown one is named as the override's."""
    parts = key.split(".")
    cls, node = Config, tree
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        owner = ".".join(parts[:i]) or "the config"
        if part not in names:
            return None, f"override {text!r}: " + _unknown_key(".".join(parts[:i + 1]), part, names, owner)
        hint = typing.get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(hint):
                return None, f"override {text!r}: {key} is a section; name one of its keys"
            return node, None
        if not dataclasses.is_dataclass(hint):
            return None, f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section"
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return None, None  # the file's section is not a mapping: named once, by the build
        cls, node = hint, child
    return None, None  # not reached: a key has at least two parts


def _apply_override(tree: dict, text: str, found: list) -> None:
    try:
        key, value = parse_override(text)
    except ConfigError as exc:
        found.append(str(exc))
        return
    node, problem = _override_target(tree, key, text)
    if problem:
        found.append(problem)
    elif node is not None:
        node[key.rsplit(".", 1)[1]] = value


# --- the config --------------------------------------------------------------------------------

def _range_problems(parsed: list) -> list[str]:
    """The settings that parsed but are out of range, for a config that cannot be built
    whole (a setting of another's type is left at its default: only single-setting checks)."""
    from megatron_cegppo.config.validate import setting_problem

    return [p for p in (setting_problem(key, value) for key, value in parsed) if p]


def load_config(path: Union[str, Path, None] = None, overrides: Iterable[str] = ()) -> Config:
    """The config of a YAML file (every key optional: defaults from the schema) with
    ``section.key=value`` overrides applied. Raises one :class:`ConfigError` naming every
    problem of the file and the overrides."""
    found: list = []
    tree = _read_file(Path(path), found) if path is not None else {}
    for text in overrides:
        _apply_override(tree, text, found)
    parsed: list = []
    cfg = _build(Config, tree, "", found, parsed)
    if found:
        raise ConfigError.of(found + _range_problems(parsed))
    return cfg


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
