"""Markdown that MLflow's version and run pages render as written (no torch, no plotting: the CLI imports it).

MLflow renders a description's markdown and sanitizes the HTML it makes: a token string such as
`<issue_start>` or `<|im_end|>` is taken for an HTML tag and removed, so a drift table showed `''`.
Text from models and data therefore goes through `cell` (or `text`): `<`, `>` and `&` become HTML
entities, which the page shows as the characters; a `|` would end a table cell and is escaped.
"""

from __future__ import annotations

import re

_MARKDOWN = re.compile(r"([\\`*\[\]])")


def text(value: object) -> str:
    """Plain text shown as written: HTML entities for & < >, backslashes before markdown's own characters."""
    escaped = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", escaped)


def cell(value: object, limit: int | None = None) -> str:
    """`text` for one table cell: one line, `|` escaped, cut to ``limit`` characters (with "…") before escaping."""
    raw = " ".join(str(value).split()) if value is not None else ""
    if limit is not None and len(raw) > limit:
        raw = raw[: limit - 1].rstrip() + "…"
    return text(raw).replace("|", "\\|") if raw else "—" if value is None else "(empty)"


# MLflow's pages style tables without cell padding (and drop the alignment markdown asks for), so adjacent
# columns ran together ("18.000025.0000"). An en space after each cell but the last keeps them apart; an
# entity, because the table parser trims whitespace characters, non-breaking ones included.
PAD = "&ensp;"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    """A markdown table; cells are used as given (escape them with `cell`), each but the last followed by `PAD`.
    ``align``: per column "l" or "r" (numbers right-aligned where the renderer keeps it)."""
    marks = {"l": ":---", "r": "---:"}
    separator = "|" + "|".join(marks.get(a, "---") for a in (align or ["l"] * len(header))) + "|"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join([*(f"{cell}{PAD}" for cell in cells[:-1]), *cells[-1:]]) + " |"

    return [line(header), separator, *(line(row) for row in rows)]
