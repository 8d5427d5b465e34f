"""Live progress of Ray Train runs on the driver.

Rank 0 of each run pushes its latest metrics to a small named actor (fire and forget); the driver
runs the ``fit`` calls in threads and draws one rich progress bar per run: step / total, loss,
tokens per second, elapsed and remaining time. Several runs (domain experts trained side by
side) share one display.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ProgressBoard", "FitJob", "fit_with_progress", "fit_many_with_progress"]


class _Board:
    """Latest metrics of a run; rank 0 pushes, the driver polls."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def update(self, metrics: dict[str, Any]) -> None:
        self.state.update(metrics)

    def get(self) -> dict[str, Any]:
        return dict(self.state)


class ProgressBoard:
    """A handle on a named Ray actor holding a run's latest metrics (picklable into workers)."""

    def __init__(self, name: str):
        self.name = name
        self._actor: Any = None

    def create(self) -> ProgressBoard:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node, like Ray Train's own controller: losing a worker node must not
        # take the board (and the driver's progress display) with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._actor = ray.remote(num_cpus=0)(_Board).options(
            name=self.name, get_if_exists=True, scheduling_strategy=here).remote()
        return self

    @property
    def actor(self) -> Any:
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self.name)
        return self._actor

    def push(self, **metrics: Any) -> None:
        """Fire and forget from a worker; a missing board never stops training."""
        try:
            self.actor.update.remote(metrics)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass

    def read(self, timeout: float = 5.0) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.get.remote(), timeout=timeout)

    def close(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "_actor": None}


@dataclass
class FitJob:
    """One run to show: its ``fit`` callable, its board and its length in steps."""

    description: str
    fit: Callable[[], Any]
    board: ProgressBoard
    total_steps: int


def fit_many_with_progress(jobs: list[FitJob], console: Any | None = None, show: bool = True,
                           poll_s: float = 0.5) -> list[Any]:
    """Run every job's ``fit`` at once (threads) with one live bar each; returns the results in
    order. An exception in any fit is re-raised on the driver after all have ended."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    boxes: list[dict[str, Any]] = [{} for _ in jobs]

    def target(job: FitJob, box: dict[str, Any]) -> None:
        try:
            box["result"] = job.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the driver's thread
            box["error"] = exc

    threads = [threading.Thread(target=target, args=(j, b), name=f"fit-{i}", daemon=True)
               for i, (j, b) in enumerate(zip(jobs, boxes, strict=True))]
    for t in threads:
        t.start()
    console = console or Console()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not show, transient=False, refresh_per_second=4,
    ) as progress:
        tasks = [progress.add_task(j.description, total=j.total_steps, info="starting workers")
                 for j in jobs]

        def refresh() -> None:
            for job, task in zip(jobs, tasks, strict=True):
                try:
                    s = job.board.read(timeout=2.0)
                except Exception:  # noqa: BLE001 - the board is best effort
                    continue
                if "step" in s:
                    info = (f"loss {s.get('loss', float('nan')):.3f}  lr {s.get('lr', 0):.1e}  "
                            f"{s.get('tokens_per_s', 0):,.0f} tok/s")
                    progress.update(task, completed=s["step"], info=info)

        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(poll_s / max(1, len(threads)))
            refresh()
        refresh()
    errors = [b["error"] for b in boxes if "error" in b]
    if errors:
        raise errors[0]
    return [b["result"] for b in boxes]


def fit_with_progress(fit: Callable[[], Any], board: ProgressBoard, total_steps: int,
                      description: str, console: Any | None = None, show: bool = True,
                      poll_s: float = 0.5) -> Any:
    """One run's ``fit`` with a live bar (see :func:`fit_many_with_progress`)."""
    (result,) = fit_many_with_progress([FitJob(description, fit, board, total_steps)],
                                       console, show, poll_s)
    return result
