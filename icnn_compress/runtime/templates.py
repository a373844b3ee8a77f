"""HTML pages from the package's jinja2 templates (``icnn_compress/templates``), autoescaped."""

from __future__ import annotations

import functools
from typing import Any

import jinja2

__all__ = ["macro", "render"]


@functools.cache
def _environment() -> jinja2.Environment:
    # Autoescape everything: names, paths and class labels come from user data. Fragments that are HTML
    # already (a later stage's section, an embedded image) are passed as markupsafe.Markup.
    return jinja2.Environment(loader=jinja2.PackageLoader("icnn_compress", "templates"),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with ``context``."""
    return _environment().get_template(template).render(**context)


def macro(template: str, name: str) -> Any:
    """The macro ``name`` of ``templates/<template>``: call it with its arguments for an escaped fragment."""
    return getattr(_environment().get_template(template).module, name)
