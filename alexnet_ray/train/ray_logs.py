"""Ray's own log lines, turned down so a run's progress lines stay readable."""

from __future__ import annotations

import importlib.util
import logging

import ray.data


def quiet_ray_logs() -> None:
    """Per-epoch loaders start small Ray Data executions, and every report logs a line per rank:
    together they would drown the progress lines."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # We turned the bars off on purpose; Ray Data says so once per process, as a warning.
    progress = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _BarsOffNotice) for f in progress.filters):
        progress.addFilter(_BarsOffNotice())
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray Train V2 logs every report of every rank at INFO through a logger named by its file path.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


class _BarsOffNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")
