"""``raytrain serve``: a trained model as an HTTP service on Ray Serve.

    raytrain serve RUN                                  # best checkpoint, embedded Ray, port 8000
    raytrain serve RUN --replicas 2 --max-batch-size 64
    raytrain serve s3://bucket/runs/r --address auto --autoscale 1-8 --detach
    raytrain serve RUN --print-config > serve.yaml      # for `serve deploy` or a RayService

The model, the flags and the port are checked before Ray starts (exit 2, one line). It blocks
until Ctrl-C or SIGTERM, then deletes the application (exit 130); ``--detach`` leaves the
application running on a cluster and returns.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import time
from typing import Any

from raytrain.commands.args import add_address, add_storage_path, count, error
from raytrain.errors import EXIT_INTERRUPTED, EXIT_OK, UserError
from raytrain.report.console import Console

_STATUS_EVERY_S = 2.0


def add_parser(sub) -> None:
    """``raytrain serve``."""
    parser = sub.add_parser(
        "serve",
        help="serve a trained model over HTTP on Ray Serve",
        description="Serve a trained model over HTTP on Ray Serve: POST /predict with raw "
        "records, GET / describes the model, /docs is the OpenAPI page (docs/serve.md).",
    )
    parser.set_defaults(run=run)
    parser.add_argument(
        "target",
        metavar="RUN|CHECKPOINT",
        help="A run (its name under --storage-path, its directory or URI): its best checkpoint "
        "by the run's checkpoint metric; or a checkpoint directory.",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="NAME|EPOCH",
        help="Another checkpoint of the run: its directory name, or its epoch.",
    )
    _add_serving_flags(parser)
    add_address(parser)
    add_storage_path(parser, "Where runs are found by name")
    parser.add_argument("--verbose", action="store_true", help="Show Ray's and Serve's logs.")


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """Replicas, batching, the body limit, where to listen, and what to do once deployed."""
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=count, default=1, help="Replicas (default: 1).")
    scale.add_argument(
        "--autoscale",
        metavar="MIN-MAX",
        help="Let Serve scale the replicas between MIN and MAX on ongoing requests.",
    )
    parser.add_argument(
        "--cpus-per-replica",
        type=float,
        metavar="X",
        help="CPUs reserved per replica; torch uses that many threads (default: 1, or a share "
        "of the cores when an embedded Ray has fewer cores than replicas).",
    )
    parser.add_argument(
        "--max-batch-size",
        type=count,
        default=32,
        help="Requests one forward pass answers at most (default: %(default)s).",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="How long a batch waits for more requests (default: %(default)s).",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=count,
        default=1 << 20,
        help="A request body's limit; larger ones get 413 (default: %(default)s).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s).")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000).")
    parser.add_argument("--name", help="The Serve application's name (default: the run's name).")
    parser.add_argument("--route-prefix", default="/", help="URL prefix (default: /).")
    parser.add_argument(
        "--detach",
        action="store_true",
        help="Deploy on the cluster (--address) and return, leaving the application running.",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="Print the Serve config YAML for `serve deploy` (or a RayService) and exit.",
    )


def autoscale_range(text: str) -> tuple[int, int]:
    """``MIN-MAX`` as two counts, 1 <= MIN <= MAX."""
    low, _, high = text.partition("-")
    if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high):
        raise UserError(f"--autoscale {text!r}: expected MIN-MAX replicas, 1 <= MIN <= MAX")
    return int(low), int(high)


def options(args: argparse.Namespace, trained, cpus: float, threads: int):
    """The deployment's Options from the flags."""
    from raytrain.inference.serving import Options

    return Options(
        checkpoint=str(trained.checkpoint),
        chosen=trained.why,
        replicas=args.replicas,
        autoscale=autoscale_range(args.autoscale) if args.autoscale else None,
        cpus_per_replica=cpus,
        threads=threads,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=args.max_body_bytes,
    )


def check(args: argparse.Namespace):
    """Every check before Ray starts; returns the Trained model."""
    from raytrain.inference.trained import load

    try:
        import fastapi  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"raytrain serve needs Ray Serve ({e}); install it: pip install 'raytrain[serve]'"
        ) from None
    if args.autoscale:
        autoscale_range(args.autoscale)
    if args.cpus_per_replica is not None and not args.cpus_per_replica > 0:
        raise UserError(f"--cpus-per-replica {args.cpus_per_replica:g}: must be above 0")
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch-wait-ms {args.batch_wait_ms:g}: must be 0 or more")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected a port number, 1-65535")
    if not args.route_prefix.startswith("/"):
        raise UserError(f"--route-prefix {args.route_prefix!r}: must start with '/'")
    if args.detach and not (args.address or _ray_address()):
        raise UserError(
            "--detach leaves the application on a cluster, which needs --address (an embedded "
            "Ray stops with this command)"
        )
    trained = load(args.target, args.storage_path, args.checkpoint)
    if not args.print_config and not (args.address or _ray_address()):
        port_free(args.host, args.port)
    return trained


def _ray_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS") or None


def port_free(host: str, port: int) -> None:
    """UserError if this machine cannot listen on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(
                f"--host {host} --port {port}: cannot listen there ({e.strerror}); pass another "
                "--port, or stop what uses it"
            ) from None


def run(args: argparse.Namespace) -> int:
    """Run the serve command; returns the exit code."""
    console = Console()
    try:
        trained = check(args)
        if args.print_config:
            return print_config(args, trained)
        return serve(args, trained, console)
    except UserError as e:
        return error(str(e))


def serve(args: argparse.Namespace, trained, console: Console) -> int:
    """Deploy on the embedded Ray or the cluster, print where, and block until interrupted."""
    from raytrain.cluster import connect

    name = args.name or trained.checkpoint.parent.name
    deployed, embedded = False, True
    try:
        with connect(_cluster_config(args, trained)) as plan:
            from ray import serve

            embedded = plan.embedded
            if not args.verbose:  # Serve's own lines on the driver ("Started Serve", ...)
                logging.getLogger("ray.serve").setLevel(logging.WARNING)
            settings = options(args, trained, plan.cpus_per_worker, plan.threads)
            console.header(header(trained, settings, plan))
            started = time.perf_counter()
            serve.start(
                http_options={"host": args.host, "port": args.port},
                logging_config={"log_level": "INFO" if args.verbose else "WARNING"},
            )
            from raytrain.inference.serving import app

            serve.run(app(settings), name=name, route_prefix=args.route_prefix)
            deployed = True
            url = f"http://{_shown_host(args.host)}:{args.port}{args.route_prefix.rstrip('/')}"
            console.line(
                f" serving  {url}/predict in {time.perf_counter() - started:.1f} s "
                f"(GET {url}/ describes the model, {url}/docs the API)"
            )
            if args.detach:
                console.line(f"detached: application {name!r} runs on; `serve shutdown` ends it")
                return EXIT_OK
            console.line("Ctrl-C stops")
            watch(serve, name, console)
    except KeyboardInterrupt:
        if deployed:
            _delete(name, embedded)
        console.line(
            f"raytrain: interrupted; application {name!r} deleted"
            if deployed
            else "raytrain: interrupted; nothing was deployed"
        )
        return EXIT_INTERRUPTED
    return EXIT_OK


def _cluster_config(args: argparse.Namespace, trained):
    from raytrain import config

    flags: dict[str, Any] = {
        "run.address": args.address,
        "run.verbose": args.verbose or None,
        # Every node that runs a replica reads the checkpoint: on a cluster, the checkpoint's
        # run directory must be one that every node sees (or object storage).
        "run.storage_path": str(trained.checkpoint.parent),
        "scaling.workers": config.parse_value(
            args.autoscale or str(args.replicas), "scaling.workers"
        ),
    }
    if args.cpus_per_replica is not None:
        flags["scaling.cpus_per_worker"] = args.cpus_per_replica
    return config.load(flags={k: v for k, v in flags.items() if v is not None})


def _shown_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _delete(name: str, embedded: bool) -> None:
    """Delete the application (on an embedded Ray: Serve with it, before Ray stops)."""
    from ray import serve

    with contextlib.suppress(Exception):  # Ray is going down with this command anyway
        if embedded:
            serve.shutdown()
        else:
            serve.delete(name)


def watch(serve, name: str, console: Console) -> None:
    """Block, saying when the application's status changes (a replica lost, then replaced)."""
    last = "RUNNING"
    while True:
        time.sleep(_STATUS_EVERY_S)
        app = serve.status().applications.get(name)
        status = str(app.status.value if app is not None else "DELETED")
        if status != last:
            message = f" ({app.message.splitlines()[0]})" if app is not None and app.message else ""
            console.line(f"application {name!r}: {status.lower()}{message}")
            last = status


def header(trained, settings, plan) -> list[tuple[str, str]]:
    from raytrain.inference.serving import input_columns

    where = "embedded Ray on this machine" if plan.embedded else f"Ray cluster at {plan.address}"
    columns = input_columns(trained)
    shown = ", ".join(f"{c['name']} ({c['type']})" for c in columns[:6])
    more = f" and {len(columns) - 6} more" if len(columns) > 6 else ""
    if settings.autoscale is not None:
        replicas = f"{settings.autoscale[0]}-{settings.autoscale[1]} (autoscaled)"
    else:
        replicas = str(settings.replicas)
    return [
        ("model", f"{trained.checkpoint} (epoch {trained.epoch}, {trained.why})"),
        ("input", f"{len(columns)} column(s): {shown}{more}"),
        (
            "replicas",
            f"{replicas} x {settings.cpus_per_replica:g} CPU, {settings.threads} torch "
            f"thread(s) each, {where}",
        ),
        (
            "batches",
            f"up to {settings.max_batch_size} requests per forward pass, waiting at most "
            f"{settings.batch_wait_ms:g} ms; bodies up to {settings.max_body_bytes:,} bytes",
        ),
    ]


def print_config(args: argparse.Namespace, trained) -> int:
    """The Serve config of this application on stdout, for `serve deploy`."""
    import yaml

    cpus = args.cpus_per_replica or 1.0
    settings = options(args, trained, cpus, max(1, int(cpus)))
    deployment: dict[str, Any] = {
        "name": "model",
        "ray_actor_options": {"num_cpus": cpus},
    }
    if settings.autoscale is not None:
        low, high = settings.autoscale
        deployment["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": 2 * settings.max_batch_size,
        }
    else:
        deployment["num_replicas"] = settings.replicas
    args_out = settings.model_dump(exclude={"replicas", "autoscale", "cpus_per_replica"})
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": args.port},
        "applications": [
            {
                "name": args.name or trained.checkpoint.parent.name,
                "route_prefix": args.route_prefix,
                "import_path": "raytrain.inference.serving:app",
                "args": args_out,
                "deployments": [deployment],
            }
        ],
    }
    if trained.checkpoint.local:
        print(
            f"raytrain: note: the checkpoint {str(trained.checkpoint)!r} is a local path; every "
            "node that runs a replica must see it there (or keep runs on object storage: "
            "--storage-path s3://...)",
            file=sys.stderr,
        )
    print(
        f"# raytrain serve {args.target} --print-config: a Ray Serve config for "
        "`serve deploy` (or a RayService's serveConfigV2); docs/serve.md"
    )
    print(yaml.safe_dump(document, sort_keys=False), end="")
    return EXIT_OK
