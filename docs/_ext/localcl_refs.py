"""Sphinx extension: references generated from the code, so they cannot drift from it.

- ``localcl-cli``: the usage and help of ``localcl`` and every sub-command (and sub-sub-command),
  rendered from the real argparse parser ``ray_jobs.cli.build_parser()``.
- ``localcl-config run``: every key of the run config (pydantic model), with type, default and
  description; ``localcl-config methods``: the same for every method's ``Config`` in
  ``localcl.methods.METHODS`` and ``FINETUNE``.

The project objects this extension reads are imported in :func:`_targets` only, so a module that
moves is a one-line change here.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import textwrap
import typing
from collections.abc import Iterator
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from sphinx.application import Sphinx


def _targets() -> dict[str, Any]:
    """The one place that names the project objects (the run config model may move)."""
    from localcl.methods import FINETUNE, METHODS
    from ray_jobs.cli import build_parser
    from ray_jobs.config.run import Config

    return {"build_parser": build_parser, "run_config": Config, "METHODS": METHODS, "FINETUNE": FINETUNE}


# --------------------------------------------------------------------------- CLI reference


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse has no public accessor for sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for name, sub in _subparsers(parser):
        yield from _walk(sub, (*path, name))


def _section(title: str, ids: str) -> nodes.section:
    sec = nodes.section(ids=[nodes.make_id(ids)])
    sec += nodes.title(text=title)
    return sec


class CliDirective(Directive):
    """``localcl --help`` and the help of every sub-command, one section each."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it
        try:
            parser = _targets()["build_parser"]()
            out: list[nodes.Node] = []
            for path, sub in _walk(parser, ("localcl",)):
                title = " ".join(path)
                sec = _section(title, "cli-" + "-".join(path))
                text = sub.format_help().rstrip()
                sec += nodes.literal_block(text, text, language="text")
                out.append(sec)
            return out
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old


# --------------------------------------------------------------------------- config reference


def _type_name(tp: Any) -> str:
    """A short, readable rendering of a field annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if inner else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        return repr(value)
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "null"
    return repr(field.default)


_ATTR_LINE = re.compile(r"^(\s*)(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


def _attributes_doc(cls: type) -> dict[str, str]:
    """``Attributes:`` entries of a Google-style class docstring (own class, then its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if klass.__dict__.get("__doc__") else None
        if not doc or "Attributes:" not in doc:
            continue
        block = doc.split("Attributes:", 1)[1]
        name: str | None = None
        indent: int | None = None
        for line in block.splitlines():
            if not line.strip():
                continue
            m = _ATTR_LINE.match(line)
            cur = len(line) - len(line.lstrip())
            if indent is None:
                indent = cur
            if cur < indent:
                break  # the next docstring section
            if m and cur == indent:
                name = m.group(2)
                docs[name] = m.group(3).strip()
            elif name is not None:
                docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


_COMMENT_LINE = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.+)$")


def _inline_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # description`` comments of the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    for line in source.splitlines():
        m = _COMMENT_LINE.match(line)
        if m and m.group(1) in getattr(cls, "model_fields", {}):
            out[m.group(1)] = m.group(2).strip()
    return out


def _split_joined(docs: dict[str, str], fields: Any) -> dict[str, str]:
    """Split entries that describe several fields on one line (``tau: 0.2. lam: weight ...``)."""
    names = "|".join(re.escape(f) for f in fields)
    if not names:
        return docs
    joined = re.compile(rf"(?<=[.;])\s+({names}):\s+")
    out = dict(docs)
    for name, text in docs.items():
        pieces = joined.split(text)
        out[name] = pieces[0].strip()
        for other, desc in zip(pieces[1::2], pieces[2::2]):
            out.setdefault(other, desc.strip())
            if other not in docs:
                out[other] = desc.strip()
    return out


def _descriptions(cls: type) -> dict[str, str]:
    fields = getattr(cls, "model_fields", {})
    out = {**_inline_comments(cls), **_split_joined(_attributes_doc(cls), fields)}
    for name, field in fields.items():
        if field.description:
            out[name] = field.description
        sub = _section_model(field)
        if name not in out and sub is not None and sub.__dict__.get("__doc__"):
            out[name] = (inspect.getdoc(sub) or "").split("\n\n")[0].replace("\n", " ")
    return out


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The pydantic model of a nested section (``X`` or ``Optional[X]``), if any."""
    tp = field.annotation
    candidates = typing.get_args(tp) if typing.get_origin(tp) is not None else (tp,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    desc = _descriptions(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_model(field)
        typ = _type_name(field.annotation)
        if sub is not None:
            typ = "section" + (" | null" if "null" in typ else "")
        yield key, typ, _default(field), desc.get(name, "")


def _table(rows: list[tuple[str, str, str, str]], inline: Any = None) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=4)
    table += group
    for width in (22, 18, 16, 44):
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body

    def row(cells: tuple[str, ...], literal: tuple[bool, ...]) -> nodes.row:
        r = nodes.row()
        for text, lit in zip(cells, literal):
            entry = nodes.entry()
            para = nodes.paragraph()
            if lit and text:
                para += nodes.literal(text, text)
            elif inline is not None and text:
                parsed, _messages = inline(_escape_text(text))
                para += parsed
            else:
                para += nodes.Text(text)
            entry += para
            r += entry
        return r

    head += row(("key", "type", "default", "description"), (False,) * 4)
    for cells in rows:
        body += row(cells, (True, True, True, False))
    return table


def _model_sections(model: type[BaseModel], prefix: str, title: str, inline: Any) -> Iterator[nodes.section]:
    """One section per (nested) model: the model's own keys, then its sub-sections."""
    sec = _section(title, "config-" + (prefix.rstrip(".") or "top"))
    doc = inspect.getdoc(model) if model.__dict__.get("__doc__") else None
    if doc:
        sec += nodes.paragraph(text=doc.split("\n\n")[0].replace("\n", " "))
    sec += _table(list(_rows(model, prefix)), inline)
    yield sec
    for name, field in model.model_fields.items():
        sub = _section_model(field)
        if sub is not None:
            yield from _model_sections(sub, f"{prefix}{name}.", f"{prefix}{name}", inline)


class ConfigDirective(Directive):
    """``localcl-config run`` or ``localcl-config methods``."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        what = self.arguments[0]
        t = _targets()

        def inline(text: str) -> tuple[list[nodes.Node], list[nodes.system_message]]:
            parsed: tuple[list[nodes.Node], list[nodes.system_message]] = self.state.inline_text(text, self.lineno)
            return parsed

        if what == "run":
            return list(_model_sections(t["run_config"], "", "top level", inline))
        if what == "methods":
            out: list[nodes.Node] = []
            for section, registry in (("pretrain", t["METHODS"]), ("finetune", t["FINETUNE"])):
                for name, cls in registry.items():
                    cfg = cls.Config
                    sec = _section(f"{section}.method ({name})", f"method-{section}-{name}")
                    sec += nodes.paragraph(
                        text=f"{section}.method.name: {name} — {cls.__module__}.{cls.__name__}, "
                        f"config class {cfg.__module__}.{cfg.__name__}."
                    )
                    sec += _table(list(_rows(cfg, f"{section}.method.")), inline)
                    out.append(sec)
            return out
        raise self.error(f"localcl-config: unknown argument {what!r} (run or methods)")


# --------------------------------------------------------------------------- docstrings

_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")
_SHAPE_STAR = re.compile(r"(?<![*\\\w])\*(?=[A-Z]\b)")


def _escape_text(line: str) -> str:
    """Escape the shape notation ``*S`` and ``|X|`` (set sizes) outside literals and roles."""
    parts = _LITERAL.split(line)
    for i in range(0, len(parts), 2):
        parts[i] = _SHAPE_STAR.sub(r"\\*", parts[i]).replace("|", r"\|")
    return "".join(parts)


def _is_table_row(line: str) -> bool:
    s = line.strip()
    return len(s) > 1 and s.startswith("|") and s.endswith("|")


def sanitize_docstring(lines: list[str]) -> list[str]:
    """Make the library's plain-text docstrings valid reST without editing them.

    The docstrings use shape notation such as ``(B, K, *S)``, set sizes such as ``|Q|`` and
    Markdown tables, which reST reads as emphasis, substitutions and line blocks. Tables become
    literal blocks; ``.. math::`` blocks are left alone.
    """
    out: list[str] = []
    math_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if math_indent is not None:
            if line.strip() and indent <= math_indent:
                math_indent = None
            else:
                out.append(line)
                i += 1
                continue
        if line.lstrip().startswith(".. math::"):
            math_indent = indent
            out.append(line)
            i += 1
            continue
        if _is_table_row(line):
            out += ["", " " * indent + "::", ""]
            while i < len(lines) and _is_table_row(lines[i]):
                out.append("    " + lines[i])
                i += 1
            out.append("")
            continue
        out.append(_escape_text(line))
        i += 1
    return out


def _process_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if name.startswith(("localcl", "storage")):
        lines[:] = sanitize_docstring(lines)


def setup(app: Sphinx) -> dict[str, Any]:
    # Import the project before autodoc imports anything: pydantic models defined while
    # autodoc's import machinery is active fail to build their schema.
    _targets()
    app.connect("autodoc-process-docstring", _process_docstring)
    app.add_directive("localcl-cli", CliDirective)
    app.add_directive("localcl-config", ConfigDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
