"""``localcl jobs list | status ID | logs ID [--follow] | stop ID``: manage Ray Jobs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ray_jobs.cli.submit import add_address_argument
from ray_jobs.cluster import jobs as cluster_jobs

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobDetails


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list, inspect, tail and stop jobs on a Ray cluster")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = actions.add_parser("list", help="all jobs of the cluster, oldest first")
    add_address_argument(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    st = actions.add_parser("status", help="status, message, metadata of one job")
    st.add_argument("job_id")
    add_address_argument(st)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_status)

    lg = actions.add_parser("logs", help="the job's driver logs")
    lg.add_argument("job_id")
    add_address_argument(lg)
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.set_defaults(func=_logs)

    sp = actions.add_parser("stop", help="request a job to stop")
    sp.add_argument("job_id")
    add_address_argument(sp)
    sp.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    sp.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S seconds")
    sp.set_defaults(func=_stop)


def _details(info: JobDetails) -> dict[str, Any]:
    return {
        "submission_id": info.submission_id,
        "job_id": info.job_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "metadata": info.metadata or {},
    }


def _list(args: argparse.Namespace) -> int:
    client = cluster_jobs.connect(args.address)
    jobs = cluster_jobs.list_jobs(client)
    if args.json:
        print(json.dumps([_details(j) for j in jobs], indent=2))
    elif not jobs:
        print("no jobs")
    else:
        print(cluster_jobs.format_table([cluster_jobs.job_row(j) for j in jobs]))
    return 0


def _status(args: argparse.Namespace) -> int:
    client = cluster_jobs.connect(args.address)
    info = cluster_jobs.job_info(client, args.job_id)
    d = _details(info)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    row = cluster_jobs.job_row(info)
    print(f"{row.submission_id}: {d['status']}")
    if d["message"]:
        print(f"  message:    {d['message']}")
    print(f"  entrypoint: {d['entrypoint']}")
    print(f"  started:    {row.start} UTC, duration {row.duration}")
    if d["driver_exit_code"] is not None:
        print(f"  exit code:  {d['driver_exit_code']}")
    for key, value in sorted(d["metadata"].items()):
        print(f"  {key}: {value}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = cluster_jobs.connect(args.address)
    if args.follow:
        status = cluster_jobs.follow(client, args.job_id, sys.stdout)
        print(f"localcl: {args.job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    sys.stdout.write(cluster_jobs.job_logs(client, args.job_id))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = cluster_jobs.connect(args.address)
    was_running = cluster_jobs.stop_job(client, args.job_id)
    if not was_running:
        status = cluster_jobs.job_info(client, args.job_id).status
        print(f"{args.job_id}: not running ({status})")
        return 0
    print(f"{args.job_id}: stop requested")
    if args.wait:
        print(f"{args.job_id}: {cluster_jobs.wait(client, args.job_id, timeout=args.timeout)}")
    return 0
