#!/usr/bin/env python
"""Keep the demo table quoted in docs/getting-started.md in step with what the code prints.

`localcl demo` writes the table it prints to ``<run dir>/demo_table.md``. The getting-started
page quotes it between ``<!-- demo-table:start -->`` and ``<!-- demo-table:end -->``. This
script compares the two and exits 1 with a diff when they differ; ``--write`` replaces the
quoted block with the demo's table.

    bash scripts/demo.sh && .venv/bin/python scripts/check_demo_table.py            # check
    .venv/bin/python scripts/check_demo_table.py --run-dir runs/demo --write        # update
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "getting-started.md"
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
BLOCK = re.compile(re.escape(START) + r"\n```\n(.*?)```\n" + re.escape(END), re.S)


def quoted_table(doc_text: str, doc: Path = DOC) -> str:
    """The table between the markers of ``doc_text`` (ValueError naming ``doc`` if absent)."""
    m = BLOCK.search(doc_text)
    if m is None:
        raise ValueError(f"{doc}: no quoted demo table between {START} and {END}")
    return m.group(1)


def replace_table(doc_text: str, table: str) -> str:
    """``doc_text`` with the quoted block replaced by ``table``."""
    quoted_table(doc_text)
    return BLOCK.sub(lambda _: f"{START}\n```\n{table}```\n{END}", doc_text, count=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "demo"), help="the demo's run dir")
    ap.add_argument("--doc", default=str(DOC), help="the page that quotes the table")
    ap.add_argument("--write", action="store_true", help="update the page instead of checking")
    args = ap.parse_args(argv)
    printed = Path(args.run_dir) / "demo_table.md"
    if not printed.is_file():
        print(f"{printed}: not found; run `localcl demo` first", file=sys.stderr)
        return 2
    table, doc = printed.read_text(), Path(args.doc)
    text = doc.read_text()
    quoted = quoted_table(text, doc)
    if quoted == table:
        print(f"{doc}: the quoted demo table matches {printed}")
        return 0
    if args.write:
        doc.write_text(replace_table(text, table))
        print(f"{doc}: quoted demo table updated from {printed}")
        return 0
    diff = difflib.unified_diff(quoted.splitlines(), table.splitlines(), str(doc), str(printed), lineterm="")
    print("\n".join(diff))
    print(f"{doc}: the quoted demo table is stale (re-run with --write)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
