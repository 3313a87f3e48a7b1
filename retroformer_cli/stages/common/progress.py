"""How a stage reports progress: through a :class:`Progress` the caller passes in. Stages never draw anything;
the CLI passes ``console.RichProgress`` (a bar on a terminal, plain lines otherwise), tests and the Python API
get :class:`NullProgress` by default.

A stage opens a task with ``task(description, total, completed=...)``, moves it with ``advance`` (a number of
units, or an absolute ``completed``, plus a short ``info`` text shown beside the bar), writes lines with ``log``
and closes it with ``finish``. ``log(..., detail=True)`` lines repeat what a live bar already shows (one line per
trial or per logged step): renderers print them only where no bar is drawn.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    def task(self, description: str, total: int | None = None, *, completed: int = 0) -> Any:
        """Open a task; the handle goes back into the other methods."""

    def advance(self, task: Any, steps: int = 1, *, completed: int | None = None, info: str | None = None) -> None:
        """Add ``steps`` units (or set ``completed``) and replace the info text when given."""

    def log(self, task: Any, message: str, *, detail: bool = False) -> None:
        """A line about ``task`` (``detail``: only where no bar shows the same)."""

    def finish(self, task: Any) -> None:
        """Close ``task``; nothing more is reported on it."""


class NullProgress:
    """Reports nothing (the default of every stage)."""

    def task(self, description: str, total: int | None = None, *, completed: int = 0) -> Any:
        return None

    def advance(self, task: Any, steps: int = 1, *, completed: int | None = None, info: str | None = None) -> None:
        pass

    def log(self, task: Any, message: str, *, detail: bool = False) -> None:
        pass

    def finish(self, task: Any) -> None:
        pass


TRAIN_KEYS = ("loss", "accuracy", "margin", "grad_norm")  # substrings of the trainer's log keys worth showing


def metrics_info(logs: dict[str, Any], keys: tuple[str, ...] = TRAIN_KEYS, exact: bool = False) -> str:
    """``k=v`` pairs of the numeric log entries whose key is (``exact``) or contains one of ``keys``."""
    shown = [(k, v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and (k in keys if exact else any(s in k for s in keys))]
    if exact:
        shown.sort(key=lambda kv: keys.index(kv[0]))
    return " ".join(f"{k}={v:.4g}" for k, v in shown)


def trainer_callback(progress: Progress, description: str, *, history: list[dict[str, Any]] | None = None,
                     info: Callable[[dict[str, Any]], str] = metrics_info) -> Any:
    """A transformers ``TrainerCallback`` that reports optimizer steps and logged metrics to ``progress`` (main
    process only) and appends ``{"step": N, **numeric logs}`` rows to ``history`` when given."""
    from transformers import TrainerCallback

    class ReportProgress(TrainerCallback):
        handle: Any = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.is_world_process_zero:
                self.handle = progress.task(description, state.max_steps, completed=state.global_step)
                if state.global_step:
                    progress.log(self.handle, f"resuming at step {state.global_step}/{state.max_steps}")

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.is_world_process_zero:
                progress.advance(self.handle, 0, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not (state.is_world_process_zero and logs):
                return
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if history is not None:
                history.append(row)
            text = info(logs)
            if text:
                progress.advance(self.handle, 0, info=text)
                progress.log(self.handle, f"step {state.global_step}/{state.max_steps} {text}", detail=True)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if state.is_world_process_zero:
                progress.finish(self.handle)

    return ReportProgress()
