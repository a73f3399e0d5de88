"""Collect forgetting sweeps into a meta-dataset (webdataset shards + parquet catalog).

    python -m collectors.launch --config configs/demo.yaml --collection runs/demo --data-root .data
    ray job submit --working-dir . -- python collectors/launch.py --config … --collection s3://bucket/meta --workers 64

Running the same command again resumes: finished sweeps are skipped, unfinished ones are redone.
To stop without losing work — a session ends, the cluster is wanted back — give --stop-after or press Ctrl-C
once: no new sweep starts, the running ones finish and are published (Ctrl-C again aborts; unpublished sweeps
then run again on resume).
Exit status: 0 every requested sweep is done; 1 some failed (the summary says why); 2 bad input (nothing ran);
3 stopped as asked before every sweep ran (the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

if __package__ in (None, ""):  # run as a script (`python collectors/launch.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectors import data  # noqa: E402
from collectors.config import ConfigError, load_config, sample_specs  # noqa: E402
from meta import catalog, cli, status, storage  # noqa: E402
from meta.errors import OblivionError  # noqa: E402

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, cli.EXIT_BAD_INPUT, 3
log = logging.getLogger("collectors.launch")


def duration(value: str) -> float:
    """``--stop-after``'s type: seconds, ``HH:MM:SS`` or ISO 8601 (``PT2H30M``), finite and > 0."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = TypeAdapter(timedelta).validate_strings(value).total_seconds()
        except ValidationError:
            raise argparse.ArgumentTypeError(f"not a duration: {value!r} (seconds, HH:MM:SS or PT2H30M)") from None
    if not 0 < seconds < 10**9:  # also nan and inf
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {value!r}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.Parser(prog="python collectors/launch.py", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML collection config (see configs/demo.yaml)")
    cli.add_collection(p, "--out", required=True, help="the collection to write or resume: a folder or URI (s3://…); "
                       "holds catalog.parquet and shards/")
    p.add_argument("--data-root", default=None, help=f"dataset root in torchvision's layout (default: ${data.ENV_ROOT})")
    p.add_flag("--workers", "--num-workers", type=int, default=None,
               help="worker actors to request; those the cluster cannot place yet wait for the autoscaler "
                    "(default: what the cluster's CPUs hold now / cpus_per_worker)")
    p.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    p.add_argument("--unverified-cifar10", action="store_true",
                   help="load a locally rebuilt CIFAR-10 whose md5s differ from torchvision's (e.g. ../shared/data)")
    p.add_argument("--retry-failed", action="store_true", help="run sweeps the catalog records as failed again")
    p.add_argument("--stop-after", type=duration, default=None, metavar="DURATION",
                   help="start no new sweep after this long (seconds, HH:MM:SS or PT2H30M); the running ones finish "
                        "and are published, and the same command resumes")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for the live view (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="no live view in MLflow")
    return p.parse_args(argv)


def _live_view(args: argparse.Namespace, n_sweeps: int, num_workers: int | None):
    if args.no_mlflow:
        return None
    from collectors.progress import MlflowProgress
    from meta.tracking import tracking_uri

    params = {"config": args.config, "out": args.collection, "num_sweeps": n_sweeps, "num_workers": num_workers or "auto"}
    return MlflowProgress(tracking_uri(args.tracking_uri), f"collect {Path(args.collection).name}", params)


def _stop_event(after_s: float | None) -> threading.Event:
    """Set after ``after_s`` seconds or at the first Ctrl-C; the second Ctrl-C aborts as usual."""
    stop = threading.Event()
    if after_s is not None:
        timer = threading.Timer(after_s, stop.set)
        timer.daemon = True
        timer.start()
    if threading.current_thread() is threading.main_thread():
        def on_interrupt(signum, frame):
            if stop.is_set():
                raise KeyboardInterrupt
            log.warning("Ctrl-C: finishing the running sweeps and publishing them (Ctrl-C again to abort)")
            stop.set()

        signal.signal(signal.SIGINT, on_interrupt)
    return stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # everything that can be checked is checked before Ray starts
        config = load_config(args.config)
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        settings = data.DataSettings(data.resolve_root(args.data_root), args.download or config.data.download,
                                     args.unverified_cifar10 or config.data.unverified_cifar10)
        data.preflight(config.space.datasets, settings)  # opens each dataset as the workers will
        storage.check_output(args.collection, folder=True, flag="--collection")
        catalog.read(args.collection)  # what a resume appends to: a corrupt one stops here, untouched
    except OblivionError as e:
        return cli.fail(e)

    from collectors.collect import collect  # imports Ray: only once the inputs are known to be good

    specs = sample_specs(config)
    num_workers = args.workers or config.workers.num_workers  # the flag wins over the config
    view = _live_view(args, len(specs), num_workers)
    summary = collect(specs, args.collection, settings, config.workers, num_workers, args.retry_failed, on_progress=view,
                      stop=_stop_event(args.stop_after))
    st = status.status(storage.normalize(args.collection))
    if view is not None:
        view.finish(summary, st)
    print(summary.text())
    print(status.text(st))
    if summary.complete:
        return EXIT_DONE
    return EXIT_STOPPED if summary.left and not (summary.failed or summary.earlier_failures) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
