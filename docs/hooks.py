"""Build hooks for ``make docs`` (MkDocs ``hooks:``) and a griffe extension for mkdocstrings.

- :func:`on_page_markdown` fails the strict build (a logged warning) for every public function, class or
  method that the API reference renders without a docstring, as ruff's D101-D103 do for the code.
- :class:`SphinxRoles` turns the Sphinx roles of the code's docstrings (``:func:`~stembed.api.embed```) into
  Markdown code (```embed```), which is how they read in the source too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.stembed")

_DIRECTIVE = re.compile(r"^::: *([\w.]+) *$")
_MEMBER = re.compile(r"^ +- +(\w+) *$")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def _short(match: re.Match[str]) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else target
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """``:func:`a.b``` and ``:class:`~a.b.C``` in docstrings become Markdown code spans (``a.b``, ``C``)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the roles of each object's docstring as it is loaded."""
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_short, obj.docstring.value)


def _rendered(markdown: str) -> list[tuple[str, list[str] | None]]:
    """Each ``::: identifier`` of a page, with its ``members:`` list if the directive names one."""
    found: list[tuple[str, list[str] | None]] = []
    in_members = False
    for line in markdown.splitlines():
        directive = _DIRECTIVE.match(line)
        if directive:
            found.append((directive.group(1), None))
            in_members = False
        elif found and line.strip() == "members:":
            in_members, found[-1] = True, (found[-1][0], [])
        elif in_members and (member := _MEMBER.match(line)):
            members = found[-1][1]
            if members is not None:
                members.append(member.group(1))
        elif line.strip() and not line.startswith(" "):
            in_members = False
    return found


def _undocumented(obj: griffe.Object | griffe.Alias, members: list[str] | None) -> list[str]:
    """Paths of ``obj`` and of its public functions, classes and methods that have no docstring."""
    missing = [] if obj.docstring else [obj.path]
    if obj.kind not in (griffe.Kind.MODULE, griffe.Kind.CLASS):
        return missing
    if not obj.is_module:  # a class: its own public methods (dunders are Python's contract)
        names = [n for n in obj.members if not n.startswith("_")]
    else:
        names = members if members is not None else [n for n in obj.members if not n.startswith("_")]
    for name in names:
        member = obj.members[name]
        if member.is_alias:  # imported into the module: documented where it is defined
            continue
        if member.kind in (griffe.Kind.FUNCTION, griffe.Kind.CLASS):
            missing += _undocumented(member, None)
    return missing


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Warn (so ``--strict`` fails) for every object the page renders that has no docstring."""
    targets = _rendered(markdown)
    if targets:
        package = griffe.load("stembed", search_paths=["src"])
        for identifier, members in targets:
            obj = package[identifier.removeprefix("stembed.")] if identifier != "stembed" else package
            for path in _undocumented(obj, members):
                log.warning("%s: %s has no docstring (the API reference renders it)", page.file.src_uri, path)
    return markdown
