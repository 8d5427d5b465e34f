"""Reading a config: YAML (a key given twice is an error), ``${VAR}`` / ``${VAR:-default}`` from
the environment, ``--set a.b.c=value`` overrides, and every problem as one readable line.

:class:`ConfigError` collects the problems as ``field.path: what is wrong (allowed: ...)``, so
the CLI prints them without a traceback and exits 2.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from modula.config.schema import ModulaConfig, default_domains
from modula.errors import ModulaError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_raw",
]

# the embedded default: the schema's own defaults; configs/default.yaml spells them out
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class ConfigError(ModulaError):
    """A config that does not validate; ``problems`` holds one readable line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config{f' {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}.{i}", problems) for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None:
                if default is not None:
                    return default
                problems.append(f"{path}: environment variable ${{{name}}} is not set")
                return ""
            return val

        whole = _ENV.fullmatch(node)
        out = _ENV.sub(sub, node)
        # a value that is only "${VAR}" is re-read as YAML so numbers and booleans keep their type
        if whole and out:
            try:
                parsed = yaml.safe_load(out)
            except yaml.YAMLError:
                return out
            return parsed if isinstance(parsed, (int, float, bool)) else out
        return out
    return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key.path=value"])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError([f"--set {item!r}: empty key"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw mapping. List items are named by index or ``name``."""
    for item in overrides:
        parts, value = _parse_override(item)
        if parts[0] == "domains" and "domains" not in raw and len(parts) > 1:
            # overriding one domain of the default list: start from that list
            raw["domains"] = [d.model_dump() for d in default_domains()]
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, part)
                if idx is None:
                    if part.isdigit() and int(part) == len(node) and last:
                        node.append(value)
                        break
                    if not part.isdigit() and not last:
                        node.append({"name": part})
                        idx = len(node) - 1
                    else:
                        raise ConfigError(
                            [f"--set {item!r}: {where}: no list item with index or name {part!r}"]
                        )
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError([f"--set {item!r}: {where} is a value, not a section"])
    return raw


def _list_index(items: list[Any], part: str) -> int | None:
    if part.isdigit():
        i = int(part)
        return i if i < len(items) else None
    for i, it in enumerate(items):
        if isinstance(it, dict) and it.get("name") == part:
            return i
    return None


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The allowed field names at `loc` (the parent of an extra key), for error messages."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        f = cur.model_fields.get(part)
        if f is None:
            return None
        cur = _unwrap(f.annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return None


def _unwrap(tp: Any) -> Any:
    for arg in (typing.get_args(tp) or ()):
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return tp


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            allowed = _field_names(ModulaConfig, loc[:-1])
            msg = "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "string_pattern_mismatch":
            msg = f"{err.get('input')!r} does not match the pattern {err['ctx']['pattern']}"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            shown = err["input"]
            if isinstance(shown, (dict, list)):
                shown = type(shown).__name__
            msg = f"{msg} (got {shown!r})"
        # a whole-file check names its own field path ("domains: ...")
        if loc == () and re.match(r"^[a-z_]+(\.[A-Za-z0-9_:-]+)*: ", msg) and (
            msg.split(".", 1)[0].split(":", 1)[0] in ModulaConfig.model_fields
        ):
            lines.append(msg)
        else:
            lines.append(f"{path}: {msg}")
    return lines


def config_from_dict(raw: dict[str, Any] | None, overrides: list[str] | None = None,
                     source: str | None = None) -> ModulaConfig:
    """Validate a raw mapping (after env interpolation and overrides) into a ModulaConfig."""
    raw = dict(raw or {})
    problems: list[str] = []
    raw = _interpolate(raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    if overrides:
        raw = apply_overrides(raw, list(overrides))
    try:
        return ModulaConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc), source) from None


def read_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as written (``${VAR}`` kept, nothing validated): a mapping of sections.
    A YAML error or a key given twice is a ConfigError naming the line."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"config file {str(p)!r} does not exist"], str(p))
    try:
        raw = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"YAML syntax error{where}: {problem}"], str(p)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"(top level): expected a mapping of sections, got {type(raw).__name__}"], str(p)
        )
    return raw


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: list[str] | None = None) -> ModulaConfig:
    """Read a YAML config file (default: the embedded default) and validate it."""
    if path is None and not DEFAULT_CONFIG_PATH.exists():
        return config_from_dict({}, overrides, source="(embedded default)")
    p = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    return config_from_dict(read_raw(p), overrides, source=str(p))
