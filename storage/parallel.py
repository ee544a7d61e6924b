"""Ray fan-out of ingest: one task per small batch of cases, bounded memory, backpressure.

``parallel_ingest(src, store)`` is :func:`storage.ingest` for archives too large for one
process. It lists the sources on the driver (a local folder tree, or an object-storage prefix
listed without downloading anything), then runs :func:`storage.ingest_case` in Ray tasks:

- **one task per** ``batch_size`` **cases** (default 1). Each task reserves ``num_cpus=1`` and
  ``memory=memory_per_task`` bytes of Ray's memory resource, so the scheduler never runs more
  tasks on a node than its memory allows, and a volume whose decode would need more than that
  budget is refused from its NIfTI header (``max_bytes``) and quarantined instead of
  OOM-killing the worker;
- **backpressure**: at most ``max_in_flight`` tasks exist at once (default: 2 x the cluster's
  CPUs); the driver submits a new one only when ``ray.wait`` returns a finished one, so the
  driver's memory and the object store hold O(max_in_flight) results, not O(archive);
- **progress** on stderr (tqdm: done/total, volumes/s, ETA), and a final
  :class:`storage.ingest.IngestReport` (ingested, skipped as already complete, failed);
- **quarantine**: every failure (bad file, worker crash, task error) is recorded with its
  reason in the store's root attribute ``quarantine`` (a list of ``{case, source, error,
  time}``), merged with earlier runs (a case ingested later leaves the list) — ``localcl
  info`` and the CLI print it; a malformed file never stops the others;
- **resumable**: cases are written atomically-visible (see :mod:`storage.store`), and a case
  already complete with the same source is skipped: local files by SHA-256 (as
  :func:`storage.ingest`), objects by their listing's size + ETag (no download at all), so
  rerunning after a crash only does what is missing.

Object-storage sources are downloaded by the task into a private temporary directory, one
case at a time, and deleted after the case is written, so no node ever holds more than
``max_in_flight`` volumes on local disk. Credentials come from the environment (see
:mod:`storage.remote`); they are forwarded to the tasks' runtime environment.

``ray`` is imported lazily here only; the rest of :mod:`storage` never imports it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from storage.errors import InputError
from storage.ingest import CaseResult, IngestReport, discover, finish_case_index, ingest_case, prepare_store
from storage.remote import discover_remote, forwarded_env, is_url
from storage.sources import CaseSource
from storage.store import open_store

DEFAULT_MEMORY_PER_TASK = 2 * 2**30
QUARANTINE_ATTR = "quarantine"


def _spec(c: CaseSource, versions: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A plain, picklable description of one case for a task."""
    image = None if c.image is None else str(c.image)
    label = None if c.label is None else str(c.label)
    version = None
    if image is not None and is_url(image):
        version = {"image": dict(versions.get(image, {})), "label": dict(versions.get(label, {})) if label else None}
    return {
        "case_id": c.case_id,
        "image": image,
        "label": label,
        "version": version,
        "problem": None if c.problem is None else str(c.problem),
    }


def ingest_specs(
    specs: Sequence[Mapping[str, Any]],
    store: str,
    *,
    label_names: Mapping[int, str] | None,
    storage_options: Mapping[str, Any] | None,
    source_options: Mapping[str, Any] | None,
    max_bytes: int | None,
    chunk_xy: int | None,
) -> list[dict[str, Any]]:
    """Body of one task: ingest each case of ``specs``; every failure becomes a ``failed``
    result with a one-line reason (never an exception), so one bad file cannot fail the batch."""
    st = open_store(store, mode="a", storage_options=storage_options)
    out = []
    for spec in specs:
        t0 = time.perf_counter()
        cid, image, label = spec["case_id"], spec["image"], spec["label"]
        try:
            if spec["problem"] is not None:  # found by discovery (missing label, bad entry...)
                res = CaseResult(cid, "failed", str(image or label or ""), error=spec["problem"])
            elif spec["version"] is None:  # local files
                res = ingest_case(
                    image, label, st, cid, label_names=label_names, max_bytes=max_bytes, chunk_xy=chunk_xy
                )
            else:
                res = _ingest_remote(st, spec, label_names, source_options, max_bytes, chunk_xy)
        except InputError as err:
            res = CaseResult(cid, "failed", str(image or label or ""), error=str(err))
        except Exception as err:  # an unexpected failure of one case must not stop the rest
            res = CaseResult(
                cid,
                "failed",
                str(image or label or ""),
                error=f"{image or label}: {type(err).__name__}: {' '.join(str(err).split())}",
            )
        res.seconds = time.perf_counter() - t0
        out.append(asdict(res))
    return out


def _ingest_remote(
    st: Any,
    spec: Mapping[str, Any],
    label_names: Mapping[int, str] | None,
    source_options: Mapping[str, Any] | None,
    max_bytes: int | None,
    chunk_xy: int | None,
) -> CaseResult:
    """Skip by listing version (size + ETag) without downloading; else download the case's
    objects into a private temporary directory, ingest, delete."""
    from storage.remote import fetch_to_local

    cid, version = spec["case_id"], spec["version"]
    state = st.case_state(cid)
    if state is not None and state.get("complete") is True and state.get("source_version") == version:
        return CaseResult(cid, "skipped", spec["image"], meta=state)
    with tempfile.TemporaryDirectory(prefix="localcl-ingest-") as tmp:
        # image and label often share a file name (imagesTr/x.nii.gz, labelsTr/x.nii.gz)
        img_dir, lab_dir = os.path.join(tmp, "image"), os.path.join(tmp, "label")
        os.makedirs(img_dir)
        os.makedirs(lab_dir)
        img = fetch_to_local(spec["image"], img_dir, source_options)
        lab = None if spec["label"] is None else fetch_to_local(spec["label"], lab_dir, source_options)
        return ingest_case(
            img,
            lab,
            st,
            cid,
            label_names=label_names,
            max_bytes=max_bytes,
            chunk_xy=chunk_xy,
            source_uri=spec["image"],
            label_uri=spec["label"],
            extra_meta={"source_version": version},
        )


def bounded_map(
    submit: Callable[[Any], Any],
    items: Sequence[Any],
    max_in_flight: int,
    wait: Callable[[list[Any]], tuple[list[Any], list[Any]]],
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, finished_ref)`` while never holding more than ``max_in_flight`` refs.

    ``submit(item) -> ref`` starts work; ``wait(refs) -> (ready, not_ready)`` blocks until at
    least one is ready (``ray.wait(refs, num_returns=1)``). Completion order, not item order.
    """
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    pending: dict[Any, Any] = {}
    queue = iter(items)
    exhausted = False
    while True:
        while not exhausted and len(pending) < max_in_flight:
            try:
                item = next(queue)
            except StopIteration:
                exhausted = True
                break
            pending[submit(item)] = item
        if not pending:
            return
        ready, _ = wait(list(pending))
        for ref in ready:
            yield pending.pop(ref), ref


def parallel_ingest(
    src: str | os.PathLike[str],
    store: str,
    *,
    unlabelled: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    source_options: Mapping[str, Any] | None = None,
    address: str | None = None,
    max_in_flight: int | None = None,
    memory_per_task: int = DEFAULT_MEMORY_PER_TASK,
    batch_size: int = 1,
    max_bytes: int | None = None,
    chunk_xy: int | None = None,
    cases: Sequence[str] | None = None,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest ``src`` (folder tree or object-storage prefix) into ``store`` with Ray tasks.

    Args:
        src: local dataset folder or URL prefix (``s3://bucket/archive``); MSD/nnU-Net layout,
            or any tree of NIfTI files with ``unlabelled``.
        store: local path or URL of the store (created if missing). Give a path every Ray node
            can reach (a shared volume or object storage) when the cluster has several nodes.
        storage_options / source_options: fsspec options for the store / the source (default:
            none; credentials and endpoint from the environment).
        address: Ray address to connect to when Ray is not initialised yet (``None``: start a
            local instance, or use ``RAY_ADDRESS``).
        max_in_flight: most tasks submitted at once (default ``2 * cluster CPUs``).
        memory_per_task: bytes of Ray ``memory`` resource each task reserves; also the default
            ``max_bytes`` decode budget of one volume.
        batch_size: cases per task (larger amortises task overhead for tiny volumes).
        cases: restrict to these case ids.

    Returns:
        The report; ``report.failed`` are also in the store's ``quarantine`` root attribute.

    Raises:
        InputError: dataset-level problems (no files, malformed ``dataset.json``).
        ValueError: bad arguments (naming the parameter).
    """
    import ray
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_per_task < 2**20:
        raise ValueError(f"memory_per_task must be at least 1 MiB, got {memory_per_task}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    t0 = time.perf_counter()
    src_s = os.fspath(src)
    if is_url(src_s):
        dataset, versions = discover_remote(src_s, unlabelled=unlabelled, storage_options=source_options)
    else:
        dataset, versions = discover(Path(src_s), unlabelled=unlabelled), {}
        src_s = str(Path(src_s).resolve())
    wanted = None if cases is None else set(cases)
    todo = [c for c in dataset.cases if wanted is None or c.case_id in wanted]
    store = store if is_url(store) else os.path.abspath(os.fspath(store))
    st = prepare_store(dataset, store, storage_options)
    old_index = st.read_case_index()
    st.drop_case_index()  # rewritten at the end: an index on storage always matches the cases

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, log_to_driver=False, configure_logging=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, dashboard_host="127.0.0.1")
    node_memory = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if node_memory and memory_per_task > node_memory:  # the task could never be scheduled
        raise ValueError(
            f"memory_per_task={memory_per_task / 2**20:.0f} MiB exceeds the largest node's Ray "
            f"memory resource ({node_memory / 2**20:.0f} MiB); lower it"
        )
    if max_in_flight is None:
        max_in_flight = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    env = forwarded_env()
    task = ray.remote(ingest_specs).options(  # type: ignore[arg-type]  # ray's stubs: keyword-only args
        num_cpus=1,
        memory=int(memory_per_task),
        max_retries=1,
        retry_exceptions=False,
        runtime_env={"env_vars": env} if env else None,
        name="localcl-ingest",
    )
    kw = dict(
        label_names=dataset.label_names or None,
        storage_options=dict(storage_options or {}),
        source_options=dict(source_options or {}),
        max_bytes=max_bytes or int(memory_per_task),
        chunk_xy=chunk_xy,
    )
    batches = [[_spec(c, versions) for c in todo[i : i + batch_size]] for i in range(0, len(todo), batch_size)]

    report = IngestReport()
    bar = tqdm(total=len(todo), unit="vol", desc="ingest", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    say = on_error or (lambda msg: tqdm.write(f"localcl: error: {msg}", file=sys.stderr))
    try:
        for batch, ref in bounded_map(
            lambda b: task.remote(b, store, **kw),  # type: ignore[call-arg]
            batches,
            max_in_flight,
            lambda refs: ray.wait(refs, num_returns=1),
        ):
            try:
                results = [CaseResult(**r) for r in ray.get(ref)]
            except Exception as err:  # the task itself died (OOM kill, node lost): fail its cases
                reason = " ".join(str(err).split())[:300]
                results = [
                    CaseResult(
                        s["case_id"],
                        "failed",
                        str(s["image"] or ""),
                        error=f"{s['image']}: task failed: {type(err).__name__}: {reason}",
                    )
                    for s in batch
                ]
            for r in results:
                if r.status == "failed":
                    say(r.error or r.case_id)
                report.results.append(r)
            bar.update(len(results))
            bar.set_postfix(ok=len(report.ingested) + len(report.skipped), failed=len(report.failed), refresh=False)
    finally:
        bar.close()
    report.results.sort(key=lambda r: r.case_id)
    finish_case_index(st, old_index, report)
    report.seconds = time.perf_counter() - t0
    write_quarantine(st, report)
    st.refresh()
    return report


def write_quarantine(st: Any, report: IngestReport) -> list[dict[str, Any]]:
    """Merge this run's failures into the store's ``quarantine`` root attribute and return it.

    Entries of cases this run attempted are replaced (a fixed file leaves the list); entries
    of cases it did not attempt are kept."""
    attempted = {r.case_id for r in report.results}
    old = [q for q in st.attrs.get(QUARANTINE_ATTR, []) if q.get("case") not in attempted]
    now = time.time()
    new = old + [{"case": r.case_id, "source": r.source, "error": r.error or "", "time": now} for r in report.failed]
    new.sort(key=lambda q: q["case"])
    st.set_root_attrs({QUARANTINE_ATTR: new})
    return new


def quarantine(store: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The quarantine list of a store (``[]`` when nothing failed)."""
    return list(open_store(store, storage_options=storage_options).attrs.get(QUARANTINE_ATTR, []))
