"""``cpsl.ui.Page([...])`` and ``cpsl.ui.Divider()``: Capsule's page, shown in a cell.

On Capsule a page function (``@app.page("Tasks")``) returns a ``Page`` the
platform draws as a full page. In a notebook the page function's result is
shown where it is called: its components stacked, the boards live. Only the
components this package has (``TaskBoard``, ``TaskCard``, ``Divider``, and
any ipywidget) are drawn; anything else shows as its own display.
"""

from __future__ import annotations

from typing import Any, Iterable

import ipywidgets

from .live import as_of


class Divider(ipywidgets.HTML):
    """A rule between a page's components."""

    def __init__(self, **kwargs: Any):
        super().__init__(value='<hr class="cnb-divider">', **kwargs)

    def __repr__(self) -> str:
        return "─" * 40


class Page(ipywidgets.VBox):
    """A page's components, stacked (``children`` in order; ``title`` as a heading when given)."""

    def __init__(self, children: Iterable[Any] = (), *, title: str | None = None, **kwargs: Any):
        if isinstance(children, (str, bytes)) or not hasattr(children, "__iter__"):
            raise TypeError(f"Page takes a list of components, got {children!r}")
        self.components = list(children)
        self.page_title = title
        shown = [_widget(c) for c in self.components]
        if title:
            shown.insert(0, ipywidgets.HTML(value=f"<h3>{_escape(title)}</h3>"))
        super().__init__(children=shown, **kwargs)
        self.add_class("cnb-page")  # (a saved notebook keeps it with its cards: js/live.js saveOurs)

    def __repr__(self) -> str:
        parts = [self.page_title] if self.page_title else []
        parts.extend(repr(c) for c in self.components)
        return "\n\n".join(parts)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The widget, and the whole text form (ipywidgets cuts it at 110 characters)."""
        data = super()._repr_mimebundle_(**kwargs)
        if isinstance(data, dict):
            data["text/plain"] = repr(self) + as_of()
        return data

    def close(self) -> None:
        """Close the page and the live widgets in it (their store listeners and timers go too)."""
        for child in self.children:
            child.close()
        super().close()


def _widget(component: Any) -> ipywidgets.Widget:
    if isinstance(component, ipywidgets.Widget):
        return component
    if isinstance(component, str):
        return ipywidgets.HTML(value=f"<p>{_escape(component)}</p>")
    out = ipywidgets.Output()
    out.append_display_data(component)
    return out


def _escape(text: str) -> str:
    import html

    return html.escape(text)
