"""Pieces shared by the evaluation scripts' outputs: standard JSON and the command block
that opens every results page."""

from __future__ import annotations

import math

__all__ = ["jsonable", "command_block"]


def jsonable(x):
    """inf/nan -> strings, so the JSON is standard (dict keys as strings, tuples as lists)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def command_block(command: str) -> list[str]:
    """Markdown lines saying which command produced a page (then a blank line)."""
    return ["Produced by:", "", "```", command, "```", ""]


def save_result(result: dict, out_dir, name: str, page, write_markdown) -> None:
    """Write ``<out_dir>/<name>.json`` and, unless ``page`` is "-", the markdown page."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    if str(page) != "-":
        write_markdown(result, Path(page))
        print(f"wrote {page}")
