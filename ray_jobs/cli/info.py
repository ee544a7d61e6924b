"""``localcl info STORE``: what a store holds (thin wrapper over storage.open_store)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ray_jobs.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="list the cases of a Zarr store (shape, spacing, labels, size)")
    p.add_argument("store", help="store path or fsspec URI")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    p.set_defaults(func=run)


def store_info(uri: str) -> dict[str, Any]:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    import storage

    try:
        st = storage.open_store(uri)
        rows = []
        for case in st.cases:
            m = st.meta(case)
            rows.append(
                {
                    "case": case,
                    "patient": m["patient"],
                    "shape": m["shape"],
                    "spacing": [round(s, 4) for s in m["spacing"]],
                    "labelled": bool(m["labelled"]),
                    "orientation": m["orientation"],
                    "nbytes": st.nbytes_stored(case),
                }
            )
        attrs = st.attrs
        return {
            "store": uri,
            "cases": rows,
            "total_bytes": sum(r["nbytes"] for r in rows),
            "incomplete": st.incomplete_cases(),
            "label_names": attrs.get("label_names", {}),
            "catalog": st.catalog.summary(),
            "quarantine": attrs.get("quarantine", []),  # failed cases of `ingest --ray`
        }
    except storage.StorageError as exc:
        raise UserError(str(exc)) from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def run(args: argparse.Namespace) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    header = ("case", "shape (x,y,z)", "spacing mm", "labelled", "size")
    rows = [
        (
            r["case"],
            "x".join(map(str, r["shape"])),
            "x".join(f"{s:g}" for s in r["spacing"]),
            "yes" if r["labelled"] else "no",
            _size(r["nbytes"]),
        )
        for r in info["cases"]
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header).rstrip())
    for r in rows:
        print(fmt.format(*r).rstrip())
    cat = info["catalog"]
    splits = ", ".join(f"{k} {v}" for k, v in cat["splits"].items())
    labels = ", ".join(f"{k}={v}" for k, v in info["label_names"].items())
    print(
        f"{cat['cases']} cases ({cat['labelled']} labelled, {cat['unlabelled']} unlabelled, "
        f"{cat['patients']} patients), {_size(info['total_bytes'])} on storage"
    )
    print(f"labels: {labels or '-'}")
    print(f"splits: {splits}")
    if info["incomplete"]:
        print(f"incomplete (interrupted, invisible until re-ingested): {', '.join(info['incomplete'])}")
    for q in info["quarantine"]:
        print(f"quarantined: {q['case']}: {q['error']}")
    return 0
