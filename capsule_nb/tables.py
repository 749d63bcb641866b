"""How a collection is declared (Capsule's ``columns=``, ``scope=``, ``paginate=``) and
shown as a table in a notebook.

Capsule's pages render a collection from its declared columns; a notebook has
no pages, so the declaration shapes the HTML table ``_repr_html_`` draws, and
the rest of it is checked and kept so that code written for Capsule runs as is.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Iterable

from .checks import whole_number

SCOPES = ("app", "user", "owner", "session")
TABLE_ROWS = 200  # rows a collection's table shows when it declares no ``paginate``
COLUMN_TYPES = ("text", "number", "currency", "date", "link", "email", "status", "tags", "boolean")

# What ``app.collection(name, columns=...)`` declared, by (store folder, name): how the table shows it.
_declared: dict[tuple[str, str], "TableSpec"] = {}


@dataclass(frozen=True)
class Column:
    """A declared column: ``cpsl.Column(key, type="text", label=None, format=None)``.

    ``type`` and ``format`` tell Capsule's pages how to render a value; they are
    checked and kept, and a notebook's table shows each value as text."""

    key: str
    type: str = "text"
    label: str | None = None
    format: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"a column's key is a non-empty field name, got {self.key!r}")
        if not isinstance(self.type, str) or self.type not in COLUMN_TYPES:
            raise ValueError(f"column {self.key!r}: type must be one of {COLUMN_TYPES}, got {self.type!r}")
        if self.label is not None and not isinstance(self.label, str):
            raise ValueError(f"column {self.key!r}: label must be text or None, got {self.label!r}")


class TableSpec:
    """Capsule's collection options. Locally they shape the table display only; ``scope`` is
    checked and kept, but one notebook has one user and one owner, so every scope is one
    collection in the store."""

    def __init__(self, columns: Iterable[Any] | None = None, scope: str = "app", sortable: bool = False,
                 filterable: bool = False, paginate: int = 0):
        if scope not in SCOPES:
            raise ValueError(f"collection scope must be one of {SCOPES}, got {scope!r}")
        if columns is not None and (isinstance(columns, (str, bytes)) or not hasattr(columns, "__iter__")):
            raise TypeError(f"collection columns is a list of names, cpsl.Column or dicts, got {columns!r}")
        self.columns = [_column(c) for c in columns] if columns is not None else None
        self.scope = scope
        self.sortable = bool(sortable)
        self.filterable = bool(filterable)
        self.paginate = whole_number("paginate", paginate)


def declare(store_path: str | PathLike[str], name: str, spec: TableSpec) -> None:
    _declared[(str(store_path), name)] = spec


def declared(store_path: str | PathLike[str], name: str) -> TableSpec | None:
    return _declared.get((str(store_path), name))


def table_html(name: str, docs: list[dict[str, Any]], total: int, spec: TableSpec | None,
               get: Callable[[dict[str, Any], str], Any]) -> str:
    """The declared ``columns`` (key and label) in order, else every key seen. ``get`` reads
    a dotted key of a document ("" where it is missing)."""
    if spec is not None and spec.columns is not None:
        columns = [(column.key, column.label or column.key) for column in spec.columns]
    else:
        keys: list[str] = ["id"]
        for doc in docs:
            keys.extend(k for k in doc if k not in keys and k != "_id")
        columns = [(k, k) for k in keys]

    def cell(doc: dict[str, Any], key: str) -> str:
        value = get(doc, key)
        text = value if isinstance(value, str) else repr(value)
        return html.escape(text if len(text) <= 80 else text[:79] + "…")

    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(d, key)}</td>" for key, _ in columns) + "</tr>" for d in docs)
    shown = f"{len(docs)} of {total} documents" if len(docs) < total else f"{total} document{'s' * (total != 1)}"
    return (f"<div><b>{html.escape(name)}</b> ({shown})"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def _column(column: Any) -> Column:
    """A column given as a name, a ``Column``, a ``{"key", "label", ...}`` dict or a Column-like object."""
    if isinstance(column, (str, Column)):
        return Column(column) if isinstance(column, str) else column
    fields = {name: column.get(name) if isinstance(column, dict) else getattr(column, name, None)
              for name in ("key", "type", "label", "format")}
    if fields["key"] is None:
        raise ValueError(f"a collection column is a field name, a cpsl.Column or has a 'key'; got {column!r}")
    return Column(**{name: value for name, value in fields.items() if value is not None})
