"""Prompt files: clicks and a box in world millimetres, read against a strict schema.

A loosely read prompt is a wrong mask nobody notices (``"positive": "false"`` is truthy, a point
keyed ``"lps"`` read as RAS is mirrored), so anything not exactly as specified is an error that
names the entry::

    {"space": "RAS" | "LPS",                        optional, default "RAS"
     "points": [{"ras": [R, A, S], "positive": true},   a point keyed "ras" is RAS,
                {"lps": [L, P, S], "positive": false},  one keyed "lps" is LPS,
                {"position": [x, y, z]},                 one keyed "position" is in "space",
                [x, y, z], [x, y, z, true|false|1|0]],   a list is in "space"
     "box": {"min": [x, y, z], "max": [x, y, z]}}    optional, in "space"

Coordinates are JSON numbers (not strings), "positive" is a JSON boolean (default true),
unknown or repeated keys are errors, and a ``ras``/``lps`` key that contradicts an explicit
"space" is an error. Everything is returned in RAS.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FastSAM3DError

__all__ = ["Prompts", "PromptError", "read_prompts", "parse_prompts"]

Point = tuple[tuple[float, float, float], bool]


class PromptError(FastSAM3DError, ValueError):
    """A prompt file that does not follow the schema (the message names the entry)."""


@dataclass(frozen=True)
class Prompts:
    """Clicks (RAS point, positive) in order, and an optional box (RAS min, RAS max)."""

    points: tuple[Point, ...] = ()
    box: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


def _what(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{type(value).__name__} {json.dumps(value)[:40]}"


def _keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            near = difflib.get_close_matches(key.lower(), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PromptError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _xyz(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 3:
        raise PromptError(f"{where} must be a list of three numbers [x, y, z], not {_what(value)}")
    for n, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PromptError(f"{where}[{n}] must be a number, not {_what(v)}")
        if not math.isfinite(v):
            raise PromptError(f"{where}[{n}] must be finite, not {v}")
    return [float(v) for v in value]


def _to_ras(p: list[float], space: str) -> tuple[float, float, float]:
    if space == "LPS":
        return (-p[0] + 0.0, -p[1] + 0.0, p[2])  # + 0.0: no "-0.0" in messages
    return (p[0], p[1], p[2])


def _point(item: Any, n: int, space: str, explicit: bool) -> Point:
    where = f"points[{n}]"
    if isinstance(item, list):
        if len(item) not in (3, 4):
            raise PromptError(
                f"{where} must be [x, y, z] or [x, y, z, true|false], not a list of {len(item)}"
            )
        positive = True
        if len(item) == 4:
            flag = item[3]
            if not (isinstance(flag, bool) or (type(flag) is int and flag in (0, 1))):
                raise PromptError(
                    f"{where}[3] (positive) must be true, false, 1 or 0, not {_what(flag)}"
                )
            positive = bool(flag)
        return _to_ras(_xyz(item[:3], where), space), positive
    if not isinstance(item, dict):
        raise PromptError(
            f'{where} must be an object like {{"ras": [R, A, S], "positive": '
            f"true}} or a list [x, y, z], not {_what(item)}"
        )
    _keys(item, ("ras", "lps", "position", "positive"), where)
    frames = [k for k in ("ras", "lps", "position") if k in item]
    if len(frames) != 1:
        raise PromptError(
            f"{where} needs exactly one of 'ras', 'lps' or 'position' "
            f"(got {', '.join(frames) or 'none'})"
        )
    key = frames[0]
    frame = space if key == "position" else key.upper()
    if explicit and key != "position" and frame != space:
        raise PromptError(
            f'{where} is keyed {key!r} but the file says "space": {space!r}; '
            f"use {space.lower()!r} (or 'position') or drop \"space\""
        )
    positive = item.get("positive", True)
    if not isinstance(positive, bool):
        raise PromptError(f"{where}.positive must be true or false, not {_what(positive)}")
    return _to_ras(_xyz(item[key], f"{where}.{key}"), frame), positive


def parse_prompts(data: Any) -> Prompts:
    """Check decoded JSON against the schema; PromptError names the first offending entry."""
    if not isinstance(data, dict):
        raise PromptError(f"expected a JSON object with 'points' and/or 'box', not {_what(data)}")
    _keys(data, ("space", "points", "box"), "top level")
    explicit = "space" in data
    space = data.get("space", "RAS")
    if not isinstance(space, str) or space.upper() not in ("RAS", "LPS"):
        raise PromptError(f'space must be "RAS" or "LPS", not {_what(space)}')
    space = space.upper()
    points = data.get("points", [])
    if not isinstance(points, list):
        raise PromptError(f"points must be a list, not {_what(points)}")
    parsed = tuple(_point(item, n, space, explicit) for n, item in enumerate(points))
    box = None
    if "box" in data:
        b = data["box"]
        if not isinstance(b, dict):
            raise PromptError(
                f'box must be an object {{"min": [x, y, z], "max": [x, y, z]}}, not {_what(b)}'
            )
        _keys(b, ("min", "max"), "box")
        for key in ("min", "max"):
            if key not in b:
                raise PromptError(f"box needs both 'min' and 'max' (no {key!r})")
        lo, hi = (_to_ras(_xyz(b[k], f"box.{k}"), space) for k in ("min", "max"))
        box = (tuple(min(a, c) for a, c in zip(lo, hi)), tuple(max(a, c) for a, c in zip(lo, hi)))
    return Prompts(points=parsed, box=box)  # type: ignore[arg-type]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise PromptError(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(name: str) -> None:
    raise PromptError(f"{name} is not a number JSON allows")


def read_prompts(path: str | os.PathLike) -> Prompts:
    """Read and check a prompts file; PromptError (naming the file and entry) otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise PromptError(f"{p} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise PromptError(f"{p} is not UTF-8 text (a JSON file is)") from None
    except OSError as e:
        raise PromptError(f"{p}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        return parse_prompts(data)
    except json.JSONDecodeError as e:
        raise PromptError(f"{p}: not valid JSON ({e})") from None
    except PromptError as e:
        raise PromptError(f"{p}: {e}") from None
