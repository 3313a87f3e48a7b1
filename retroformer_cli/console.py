"""Output helpers, as gh, pip and hf do: results (tables, JSON) on stdout, progress, logs and hints on stderr.

With ``--json`` stdout carries only the JSON document; human tables are left out.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

# No markup, no emoji codes: run names, paths, actions (`Search[...]`, `click[...]`) and install commands
# (`pip install 'retroformer-cli[webshop]'`) print exactly as written; styles come from Text objects only.
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)
# Piped or redirected (`| less`, `> report.txt`), tables keep their natural width instead of rich's 80 columns.
stdout = Console(highlight=False, markup=False, emoji=False, soft_wrap=False,
                 width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def log(*parts: str | tuple[str, str]) -> None:
    """One line on stderr, printed exactly as written: each part is plain text or ``(text, style)``. No part
    is read as rich markup or emoji codes, so ``[alfworld]``, ``Search[...]`` and ``bad[name]`` stay."""
    from rich.text import Text

    stderr.print(Text.assemble(*parts), soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    log(("Error:", "bold red"), " ", message)
    if hint:
        log((f"Hint: {hint}", "dim"))


def warning(message: str) -> None:
    log(("warning", "yellow"), ": ", message)


class RichProgress:
    """The CLI's renderer of a stage's progress (``stages.common.progress.Progress``) on stderr: a rich bar per
    task (done/total, info text, elapsed, ETA) on a terminal; plain lines, detail lines included, otherwise.
    ``label`` replaces the stages' task descriptions (e.g. ``eval`` for the collect task of `retroformer eval`)."""

    def __init__(self, console: Console = stderr, label: str | None = None):
        self.console = console
        self.label = label
        self._live = None
        self._names: dict[Any, str] = {}

    def task(self, description: str, total: int | None = None, *, completed: int = 0) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self._live is None:
            self._live = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[info]}", markup=False),
                                  TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console, disable=not self.console.is_terminal)
            self._live.start()
        name = self.label or description
        handle = self._live.add_task(name, total=total, completed=completed, info="")
        self._names[handle] = name
        return handle

    def advance(self, task: Any, steps: int = 1, *, completed: int | None = None, info: str | None = None) -> None:
        if self._live is None or task not in self._names:
            return
        fields: dict[str, Any] = {} if info is None else {"info": info}
        if completed is not None:
            self._live.update(task, completed=completed, **fields)
        else:
            self._live.update(task, advance=steps, **fields)

    def log(self, task: Any, message: str, *, detail: bool = False) -> None:
        if detail and self.console.is_terminal:
            return
        name = self._names.get(task)
        text = f"{name}: {message}" if name else message
        (self._live.console if self._live is not None else self.console).print(text, markup=False, highlight=False)

    def finish(self, task: Any) -> None:
        if self._live is None or self._names.pop(task, None) is None:
            return
        if not self._names:
            self._live.stop()
            self._live = None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def eval_table(reports: Sequence[Any]) -> Table:
    k = max(len(r.success_per_trial) for r in reports)
    table = Table(title="Success rate per trial (cumulative), 95% Wilson interval", title_justify="left")
    table.add_column("run")
    table.add_column("reflector")
    table.add_column("tasks", justify="right")
    for i in range(1, k + 1):
        table.add_column(f"trial {i}", justify="right")
    table.add_column("mean score", justify="right")
    table.add_column("F1", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("tokens/solved", justify="right")
    table.add_column("after a reflection", justify="right")  # reflection_sensitivity: actions changed, score change
    show_cost = any(getattr(r, "cost_usd", None) is not None for r in reports)
    if show_cost:
        table.add_column("cost (USD)", justify="right")
        table.add_column("cost/solved", justify="right")
    for r in reports:
        cis = getattr(r, "success_ci_per_trial", None) or [None] * len(r.success_per_trial)
        cells = [pct(v) + (f"\n[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
                 for v, ci in zip(r.success_per_trial, cis)] + [""] * (k - len(r.success_per_trial))
        tps = getattr(r, "tokens_per_solved", None)
        diagnostic = getattr(r, "diagnostic", None)
        name = f"{r.run}\n(diagnostic: {diagnostic})" if diagnostic else r.run
        row = [name, short_model_id(r.reflector) or "none (ReAct)", str(r.tasks), *cells, f"{r.score_per_trial[-1]:.3f}",
               f"{r.f1_per_trial[-1]:.3f}" if r.f1_per_trial else "-", f"{r.mean_steps:.1f}", f"{r.tokens:,}",
               f"{tps:,.0f}" if tps else "-", sensitivity_text(getattr(r, "sensitivity", None))]
        if show_cost:
            cost, per = getattr(r, "cost_usd", None), getattr(r, "cost_per_solved_usd", None)
            row += [f"{cost:.4f}" if cost is not None else "-", f"{per:.4f}" if per is not None else "-"]
        table.add_row(*row)
    return table


def sensitivity_text(sens: dict[str, Any] | None) -> str:
    """``changed 75%\nscore +0.250 (4 pairs)``: how trials after a reflection differ from the trial before."""
    if not sens or not sens.get("pairs"):
        return "-"
    return (f"changed {pct(sens['changed_share'])}\nscore {sens['score_change_after_reflection']:+.3f} "
            f"({sens['pairs']} pair{'s' if sens['pairs'] != 1 else ''})")


def comparison_table(comparison: dict[str, Any]) -> Table:
    """Per trial: A - B with its 95% interval, tasks won and lost, exact McNemar p."""
    a, b = comparison["a"], comparison["b"]
    table = Table(title=f"Paired comparison on {comparison['shared_tasks']} shared tasks: {a} (A) vs {b} (B)",
                  title_justify="left")
    for col in ("trial", "A", "B", "A - B", "95% interval", "A won", "A lost", "McNemar p"):
        table.add_column(col, justify="right")
    for c in comparison["per_trial"]:
        table.add_row(str(c["trial"]), pct(c["rate_a"]), pct(c["rate_b"]), f"{100 * c['difference']:+.1f} pts",
                      f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]", str(c["won"]), str(c["lost"]),
                      f"{c['p_value']:.2g}")
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


def short_model_id(model_id: str | None, width: int = 32) -> str | None:
    """A table-sized model id: the embedded id as 'embedded', adapters as 'base+stage/name'."""
    if not model_id:
        return model_id
    text = _EMBEDDED_ID.sub("embedded", model_id)
    base, plus, adapter = text.partition("+")
    if plus:
        text = f"{base}+{'/'.join(adapter.rstrip('/').split('/')[-2:])}"
    return text if len(text) <= width else "…" + text[-(width - 1):]


def task_list_table(run: str, rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title=f"{run}: tasks (retroformer show {run} TASK for one)", title_justify="left")
    for col, justify in (("task", "left"), ("solved at", "right"), ("trials", "right"), ("score", "right"),
                         ("steps", "right"), ("tokens", "right"), ("reflections", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["task"], f"trial {r['solved_at']}" if r["solved_at"] else "-", str(r["trials"]),
                      f"{r['score']:.2f}" if r["score"] is not None else "-", str(r["steps"]), f"{r['tokens']:,}",
                      str(r["reflections"]))
    return table


def task_view(run: str, task: str, trials: Sequence[Any]) -> Any:
    """One task's trials: the reflections the actor saw, its steps, and the reflection it got afterwards."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    parts: list[Any] = [Text(f"{run} / {task}", style="bold")]
    if trials:
        parts.append(Text(trials[0].instruction.strip()))
    for t in trials:
        body: list[Any] = []
        if t.memory:
            memory = Text("Reflections in the prompt:\n", style="bold cyan")
            for m in t.memory:
                memory.append(f"- {m.strip()}\n", style="cyan")
            body.append(memory)
        for i, s in enumerate(t.steps, start=1):
            step = Text()
            if s.thought:
                step.append(f"Thought {i}: ", style="bold")
                step.append(f"{s.thought}\n")
            step.append(f"Action {i}: ", style="bold")
            step.append(f"{s.action or '(no action)'}\n", style="green" if s.valid else "red")
            if s.observation:
                step.append(f"Observation {i}: ", style="bold")
                step.append(s.observation.strip())
            body.append(step)
        if not t.steps:
            body.append(Text("(no steps recorded)", style="dim"))
        if t.reflection and t.reflection.text:
            body.append(Panel(Text(t.reflection.text.strip()), title="reflection written after this trial",
                              title_align="left", border_style="yellow"))
        outcome = "solved" if t.success else "failed"
        title = (f"trial {t.trial}: {outcome}, score {t.score:.2f}, {len(t.steps)} steps, "
                 f"{t.prompt_tokens + t.completion_tokens:,} tokens")
        parts.append(Panel(Group(*body), title=title, title_align="left",
                           border_style="green" if t.success else "red"))
    return Group(*parts)
