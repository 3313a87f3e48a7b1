"""Output helpers: people read stderr (progress, tables, hints), programs read stdout (``--json``)."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

stderr = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    stderr.print(f"[bold red]Error:[/] {message}", soft_wrap=True)
    if hint:
        stderr.print(f"[dim]Hint: {hint}[/]", soft_wrap=True)


class RichCollectProgress:
    """Rich progress for collect: tasks done, success so far, tokens, ETA. Plain lines when not a TTY."""

    def __init__(self, console: Console = stderr, label: str = "collect"):
        self.console = console
        self.label = label
        self.solved = 0
        self.tasks_done = 0
        self.tokens = 0
        self.trials = 0
        self._progress = None
        self._task = None

    def start(self, total_tasks: int, already_done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total = total_tasks
        self.tasks_done = already_done
        if already_done:
            self.console.print(f"[dim]resuming: {already_done}/{total_tasks} task(s) already finished[/]")
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("solved {task.fields[solved]}"), TextColumn("trials {task.fields[trials]}"),
            TextColumn("tokens {task.fields[tokens]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.console.is_terminal, transient=False,
        )
        self._task = self._progress.add_task(self.label, total=total_tasks, completed=already_done, solved=0, trials=0,
                                             tokens=0)
        self._progress.start()

    def trial(self, trial: Any) -> None:
        self.trials += 1
        self.tokens += trial.prompt_tokens + trial.completion_tokens
        self._update()
        if not self.console.is_terminal:
            mark = "solved" if trial.success else "failed"
            self.console.print(f"{self.label}: task {trial.task_id} trial {trial.trial}: {mark} "
                               f"(score {trial.score:.2f}, {len(trial.steps)} steps)")

    def task_done(self, solved: bool) -> None:
        self.tasks_done += 1
        self.solved += int(solved)
        self._update(advance=1)

    def _update(self, advance: int = 0) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, solved=self.solved, trials=self.trials, tokens=self.tokens)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def eval_table(reports: Sequence[Any]) -> Table:
    k = max(len(r.success_per_trial) for r in reports)
    table = Table(title="Success rate per trial (cumulative)", title_justify="left")
    table.add_column("run")
    table.add_column("reflector")
    table.add_column("tasks", justify="right")
    for i in range(1, k + 1):
        table.add_column(f"trial {i}", justify="right")
    table.add_column("mean score", justify="right")
    table.add_column("F1", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("tokens", justify="right")
    for r in reports:
        cells = [pct(v) for v in r.success_per_trial] + [""] * (k - len(r.success_per_trial))
        table.add_row(r.run, _short(r.reflector) or "none (ReAct)", str(r.tasks), *cells, f"{r.score_per_trial[-1]:.3f}",
                      f"{r.f1_per_trial[-1]:.3f}" if r.f1_per_trial else "-", f"{r.mean_steps:.1f}", f"{r.tokens:,}")
    return table


def group_table(report: Any) -> Table | None:
    if not report.by_group:
        return None
    table = Table(title=f"{report.run}: success per trial by task type", title_justify="left")
    table.add_column("task type")
    for i in range(1, report.trials + 1):
        table.add_column(f"trial {i}", justify="right")
    for g, vals in report.by_group.items():
        table.add_row(g, *[pct(v) for v in vals])
    return table


_EMBEDDED_ID = re.compile(r"HuggingFaceTB/SmolLM2-135M-Instruct \(GGUF [^)]*\)")


def _short(model_id: str | None, width: int = 32) -> str | None:
    """A table-sized model id: the embedded id as 'embedded', adapters as 'base+stage/name'."""
    if not model_id:
        return model_id
    text = _EMBEDDED_ID.sub("embedded", model_id)
    base, plus, adapter = text.partition("+")
    if plus:
        text = f"{base}+{'/'.join(adapter.rstrip('/').split('/')[-2:])}"
    return text if len(text) <= width else "…" + text[-(width - 1):]
