"""``localcl submit JOB --config FILE --address http://HOST:8265``: run a job on a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from ray_jobs.cluster import jobs as cluster_jobs
from ray_jobs.cluster import submit as cluster_submit


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "or $RAY_ADDRESS when it is an http URL)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit pretrain/finetune/run/tune to a Ray cluster (Ray Jobs API)",
        description="Validate the config locally, then submit `localcl JOB` to a Ray cluster "
        "through the Ray Jobs API. Prints the submission id. By default waits for the job "
        "and exits 0 when it succeeds.",
    )
    p.add_argument("job", choices=cluster_submit.JOBS, help="the localcl verb to run on the cluster")
    p.add_argument("--config", required=True, help="run config (or campaign file for tune)")
    add_address_argument(p)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="config override, shipped with the job (repeatable)",
    )
    code = p.add_mutually_exclusive_group()
    code.add_argument(
        "--working-dir",
        default=None,
        metavar="DIR",
        help="source tree to upload as the job's working_dir (default: this repository, without .venv, .git, runs/)",
    )
    code.add_argument("--image-runtime", action="store_true", help="upload no code: the cluster runs the localcl image")
    p.add_argument(
        "--entrypoint-num-cpus", type=float, default=None, metavar="N", help="CPUs reserved for the driver process"
    )
    p.add_argument(
        "--entrypoint-num-gpus", type=float, default=None, metavar="N", help="GPUs reserved for the driver process"
    )
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="K=V",
        help="job metadata (repeatable), shown by `localcl jobs status`",
    )
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="environment variable for the job (repeatable)"
    )
    p.add_argument(
        "--expand-env",
        action="store_true",
        help="substitute ${VAR} in the config from the cluster's environment "
        "(keeps secrets such as a PostgreSQL URL out of the submitted job)",
    )
    p.add_argument(
        "--preflight", action="store_true", help="only validate the config on the cluster and print its environment"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true", help="print the id and return")
    mode.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up waiting after S seconds (the job keeps running)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything local first: a bad config or option never opens a connection.
    submission = cluster_submit.build_submission(
        args.job,
        args.config,
        args.overrides,
        working_dir=args.working_dir,
        image_runtime=args.image_runtime,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        metadata=cluster_submit.parse_pairs(args.metadata, "--metadata"),
        env=cluster_submit.parse_pairs(args.env, "--env"),
        preflight=args.preflight,
        expand_env=args.expand_env,
    )
    client = cluster_jobs.connect(args.address)
    job_id = cluster_jobs.submit(client, submission)
    print(job_id, flush=True)
    if args.no_wait:
        print(
            f"localcl: submitted; follow with `localcl jobs logs {job_id} --follow --address {client.get_address()}`",
            file=sys.stderr,
        )
        return 0
    if args.follow:
        status = cluster_jobs.follow(client, job_id, sys.stdout)
    else:
        status = cluster_jobs.wait(
            client,
            job_id,
            timeout=args.timeout,
            on_status=lambda s, m: print(
                f"localcl: {job_id} {s}" + (f": {m}" if m else ""), file=sys.stderr, flush=True
            ),
        )
    print(f"localcl: {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
