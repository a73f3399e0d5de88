"""A live view of a running collection in MLflow: one run, its metrics updated as sweeps finish.

Metrics: ``sweeps_done``, ``sweeps_failed``, ``sweeps_per_hour``, ``bytes_written`` while it runs (at most
every ``every_s`` seconds), then per family × dataset ``done.<family>.<dataset>`` / ``failed.…`` and the
status FINISHED (every requested sweep done) or FAILED. MLflow is a spectator: the first error talking to it
is logged as a warning and turns the view off; the collection never stops for it.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

EXPERIMENT = "oblivion-collection"


class MlflowProgress:
    def __init__(self, uri: str, run_name: str, params: dict[str, str], every_s: float = 30.0):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # an unreachable server costs seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.every_s, self.t0, self.last = uri, every_s, time.monotonic(), float("-inf")
        self.client = self.run_id = None
        self._safely(self._start, run_name, params)

    def _start(self, run_name: str, params: dict[str, str]) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
        run = client.create_run(exp_id, run_name=run_name)
        client.log_batch(run.info.run_id, params=_params(params))
        self.client, self.run_id = client, run.info.run_id
        log.info("live view: MLflow run %s in experiment %r at %s", self.run_id, EXPERIMENT, self.uri)

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 — whatever MLflow raises, the collection goes on
            log.warning("MLflow at %s is unreachable (%s: %s); the collection goes on without its live view",
                        self.uri, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.client = None

    def __call__(self, summary) -> None:
        """Called by the scheduler as results come in; logs at most every ``every_s`` seconds."""
        now = time.monotonic()
        if self.client is not None and now - self.last >= self.every_s:
            self.last = now
            self._safely(self._log, _progress_metrics(summary, now - self.t0))

    def finish(self, summary, status) -> None:
        """The final counts, per family × dataset from ``meta.status``'s ``Status``, and the run's status."""
        if self.client is None:
            return
        metrics = _progress_metrics(summary, time.monotonic() - self.t0)
        for (fam, ds), (done, failed) in status.cells.items():
            metrics |= {f"done.{fam}.{ds}": done, f"failed.{fam}.{ds}": failed}
        self._safely(self._log, metrics)
        if self.client is not None:
            self._safely(self.client.set_terminated, self.run_id, "FINISHED" if summary.complete else "FAILED")

    def _log(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(metrics["sweeps_done"] + metrics["sweeps_failed"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def _params(params: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:500]) for k, v in params.items()]


def _progress_metrics(summary, elapsed_s: float) -> dict[str, float]:
    return {"sweeps_done": summary.done, "sweeps_failed": summary.failed, "bytes_written": summary.bytes_written,
            "sweeps_per_hour": 3600 * summary.done / elapsed_s if elapsed_s > 0 else 0.0}
