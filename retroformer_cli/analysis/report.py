"""`retroformer report RUN... [-o report.html]`: one self-contained HTML file per set of runs.

The page holds, with no network assets (styles, script and the figure are inline):

- the success-per-trial figure with 95% Wilson bands (inline SVG drawn by matplotlib) and the summary table;
- paired comparisons when runs are compared (``--compare A B``, or two runs that share their tasks);
- a per-task table (run, task, solved at which trial, score, steps, tokens, reflections), sortable by clicking a
  column header and filterable by text; ``#sort=steps&desc=1&filter=word`` in the address does the same;
- for each task its trials side by side: the reflections in the prompt, the steps, the reflection written.

Everything from the runs is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

from retroformer_cli.workspace import Workspace, now_iso

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2329;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} .muted{color:#66707a;font-size:13px}
table{border-collapse:collapse;font-size:13px} th,td{border-bottom:1px solid #e3e6e8;padding:4px 8px;text-align:left}
th{background:#f4f6f7;position:sticky;top:0} #tasks th{cursor:pointer;user-select:none}
#tasks th.sorted::after{content:" \\25BE"} #tasks th.sorted.asc::after{content:" \\25B4"}
td.num,th.num{text-align:right} tr.solved td.solved-at{color:#1a7f37;font-weight:600} tr.failed td.solved-at{color:#b42318}
.ci{color:#66707a;font-size:11px} .warn{background:#fff4e5;border-left:4px solid #f79009;padding:6px 10px;margin:6px 0}
#filter{padding:6px 8px;width:320px;margin:6px 0 10px;font-size:13px}
details.task{border:1px solid #e3e6e8;border-radius:6px;margin:8px 0;padding:6px 10px}
details.task summary{cursor:pointer;font-weight:600}
.trials{display:flex;gap:10px;overflow-x:auto;padding:8px 0}
.trial{flex:0 0 360px;border:1px solid #e3e6e8;border-radius:6px;padding:8px;font-size:12px;background:#fbfcfc}
.trial.ok{border-top:4px solid #1a7f37} .trial.ko{border-top:4px solid #b42318}
.trial h4{margin:0 0 6px;font-size:13px} .memory{background:#eef6ff;border-left:3px solid #2e90fa;padding:4px 8px;margin:4px 0}
.reflection{background:#fff8db;border:2px solid #f5b700;border-radius:4px;padding:6px 8px;margin-top:8px}
.reflection b,.memory b{display:block;font-size:11px;text-transform:uppercase;letter-spacing:.03em;color:#5c4500}
.step{margin:4px 0;white-space:pre-wrap;word-break:break-word} .step .a{color:#1a7f37} .step .o{color:#475467}
.step .bad{color:#b42318} svg{max-width:720px;height:auto}
.diagnostic{display:inline-block;background:#fde7e9;color:#912018;border:1px solid #f04438;border-radius:10px;
 padding:0 6px;margin-left:4px;font-size:11px;font-weight:600}
"""

SCRIPT = """
(function(){
  var table=document.getElementById('tasks'); if(!table) return;
  var body=table.tBodies[0], heads=table.tHead.rows[0].cells, input=document.getElementById('filter');
  function value(row,key){var v=row.getAttribute('data-'+key); var n=parseFloat(v);
    return (v!==null && v!=='' && !isNaN(n) && /^-?[0-9.]+$/.test(v)) ? n : (v||'').toLowerCase();}
  function sortBy(key,desc){
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=value(a,key),y=value(b,key); if(x===y) return 0;
      if(x===''||x===null) return 1; if(y===''||y===null) return -1; return (x<y?-1:1)*(desc?-1:1);});
    rows.forEach(function(r){body.appendChild(r);});
    for(var i=0;i<heads.length;i++){heads[i].classList.remove('sorted','asc');
      if(heads[i].getAttribute('data-key')===key){heads[i].classList.add('sorted'); if(!desc) heads[i].classList.add('asc');}}
    table.setAttribute('data-sorted', key+(desc?':desc':':asc'));
  }
  function filter(text){var t=(text||'').toLowerCase(), shown=0;
    Array.prototype.forEach.call(body.rows,function(r){var ok=!t||r.textContent.toLowerCase().indexOf(t)>=0;
      r.style.display=ok?'':'none'; if(ok) shown++;});
    document.getElementById('shown').textContent=shown;}
  Array.prototype.forEach.call(heads,function(h){h.addEventListener('click',function(){
    var key=h.getAttribute('data-key'), desc=!(table.getAttribute('data-sorted')===key+':desc');
    sortBy(key,desc);});});
  input.addEventListener('input',function(){filter(input.value);});
  var params={}; (location.hash||'').replace(/^#/,'').split('&').forEach(function(p){
    var kv=p.split('='); if(kv[0]) params[decodeURIComponent(kv[0])]=decodeURIComponent(kv[1]||'');});
  if(params.sort) sortBy(params.sort, params.desc==='1');
  if(params.filter){input.value=params.filter; filter(params.filter);}
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _svg(reports: Sequence[Any]) -> str:
    import matplotlib.pyplot as plt

    from retroformer_cli.stages.evaluate import figure

    fig = figure(reports)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither


def _diagnostic_badge(report: Any) -> str:
    label = getattr(report, "diagnostic", None)
    return f" <span class=diagnostic>diagnostic: {_e(label)}</span>" if label else ""


def _summary(reports: Sequence[Any]) -> str:
    k = max(len(r.success_per_trial) for r in reports)
    head = "".join(f"<th class=num>trial {i}</th>" for i in range(1, k + 1))
    rows = []
    for r in reports:
        cells = "".join(
            f"<td class=num>{100 * v:.1f}%<br><span class=ci>[{100 * lo:.1f}, {100 * hi:.1f}]</span></td>"
            for v, (lo, hi) in zip(r.success_per_trial, r.success_ci_per_trial))
        cost = f"{r.cost_usd:.4f}" if r.cost_usd is not None else "-"
        tps = f"{r.tokens_per_solved:,.0f}" if r.tokens_per_solved else "-"
        sens = r.sensitivity or {}
        if sens.get("pairs"):
            after = (f"<td class=num>{100 * sens['changed_share']:.1f}%</td>"
                     f"<td class=num>{sens['score_change_after_reflection']:+.3f}</td><td class=num>{sens['pairs']}</td>")
        else:
            after = "<td class=num>-</td><td class=num>-</td><td class=num>0</td>"
        rows.append(f"<tr><td>{_e(r.run)}{_diagnostic_badge(r)}</td><td>{_e(r.env)}</td><td>{_e(r.actor)}</td><td>{_e(r.reflector or 'none')}</td>"
                    f"<td class=num>{r.tasks}</td>{cells}<td class=num>{r.mean_steps:.1f}</td>"
                    f"<td class=num>{r.tokens:,}</td><td class=num>{tps}</td><td class=num>{cost}</td>{after}</tr>")
    return (f"<table id=summary><thead><tr><th>run</th><th>env</th><th>actor</th><th>reflector</th><th class=num>tasks</th>"
            f"{head}<th class=num>steps/trial</th><th class=num>tokens</th><th class=num>tokens/solved</th>"
            f"<th class=num>cost (USD)</th><th class=num title='trials after a reflection whose actions differ from "
            f"the trial before'>actions changed after a reflection</th><th class=num>score change after a reflection"
            f"</th><th class=num>trial pairs</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    out = []
    for c in comparisons:
        for w in c["warnings"]:
            out.append(f"<div class=warn>warning: {_e(w)}</div>")
        rows = "".join(
            f"<tr><td class=num>{p['trial']}</td><td class=num>{100 * p['rate_a']:.1f}%</td>"
            f"<td class=num>{100 * p['rate_b']:.1f}%</td><td class=num>{100 * p['difference']:+.1f}</td>"
            f"<td class=num>[{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]</td><td class=num>{p['won']}</td>"
            f"<td class=num>{p['lost']}</td><td class=num>{p['p_value']:.2g}</td></tr>" for p in c["per_trial"])
        out.append(f"<h3>{_e(c['a'])} (A) vs {_e(c['b'])} (B), {c['shared_tasks']} shared tasks</h3>"
                   "<table class=comparison><thead><tr><th class=num>trial</th><th class=num>A</th><th class=num>B</th>"
                   "<th class=num>A - B (pts)</th><th class=num>95% interval</th><th class=num>A won</th>"
                   f"<th class=num>A lost</th><th class=num>McNemar p</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(out)


def _trial_card(t: Any) -> str:
    parts = [f"<div class='trial {'ok' if t.success else 'ko'}'><h4>trial {t.trial}: "
             f"{'solved' if t.success else 'failed'}, score {t.score:.2f}</h4>"]
    if t.memory:
        items = "".join(f"<li>{_e(m)}</li>" for m in t.memory)
        parts.append(f"<div class=memory><b>reflections in the prompt</b><ul>{items}</ul></div>")
    for i, s in enumerate(t.steps, start=1):
        action_class = "a" if s.valid else "bad"
        parts.append(f"<div class=step><b>Thought {i}:</b> {_e(s.thought)}\n<b>Action {i}:</b> "
                     f"<span class={action_class}>{_e(s.action or '(no action)')}</span>"
                     + (f"\n<b>Observation {i}:</b> <span class=o>{_e(s.observation)}</span>" if s.observation else "")
                     + "</div>")
    if not t.steps:
        parts.append("<div class=muted>no steps recorded</div>")
    if t.reflection and t.reflection.text:
        parts.append(f"<div class=reflection><b>reflection written after this trial</b>{_e(t.reflection.text)}</div>")
    parts.append("</div>")
    return "".join(parts)


def build(workspace: Workspace, runs: Sequence[str], *, pairs: Sequence[tuple[str, str]] = (),
          prices: Any = None) -> str:
    """The report's HTML for ``runs``."""
    from retroformer_cli.stages import evaluate

    data = evaluate.run(workspace, runs, pairs=pairs, prices=prices)
    reports = [evaluate.RunReport(**r) for r in data["runs"]]
    task_rows: list[str] = []
    details: list[str] = []
    for ri, rep in enumerate(reports):
        _, by_task = evaluate.outcomes(workspace, rep.run)
        manifest = workspace.read_manifest(rep.run)
        for ti, task in enumerate(manifest.get("task_ids") or sorted(by_task)):
            trials = [by_task[task][k] for k in sorted(by_task.get(task, {}))]
            solved_at = next((t.trial for t in trials if t.success), None)
            steps = sum(len(t.steps) for t in trials)
            tokens = sum(t.prompt_tokens + t.completion_tokens for t in trials)
            score = trials[-1].score if trials else 0.0
            anchor = f"t{ri}-{ti}"
            task_rows.append(
                f"<tr class='task-row {'solved' if solved_at else 'failed'}' data-run='{_e(rep.run)}' "
                f"data-task='{_e(task)}' data-solved='{solved_at or ''}' data-score='{score:.4f}' data-steps='{steps}' "
                f"data-tokens='{tokens}' data-trials='{len(trials)}'><td>{_e(rep.run)}</td>"
                f"<td><a href='#{anchor}'>{_e(task)}</a></td><td class='num solved-at'>"
                f"{f'trial {solved_at}' if solved_at else 'not solved'}</td><td class=num>{score:.2f}</td>"
                f"<td class=num>{len(trials)}</td><td class=num>{steps}</td><td class=num>{tokens:,}</td></tr>")
            cards = "".join(_trial_card(t) for t in trials)
            question = _e(trials[0].instruction[:300]) if trials else ""
            details.append(f"<details class=task id='{anchor}'><summary>{_e(rep.run)}{_diagnostic_badge(rep)} / {_e(task)} — "
                           f"{f'solved at trial {solved_at}' if solved_at else 'not solved'}</summary>"
                           f"<div class=muted>{question}</div><div class=trials>{cards}</div></details>")
    warnings = "".join(f"<div class=warn>warning: {_e(w)}</div>" for w in data["warnings"])
    heads = [("run", "run", ""), ("task", "task", ""), ("solved at", "solved", "num"), ("score", "score", "num"),
             ("trials", "trials", "num"), ("steps", "steps", "num"), ("tokens", "tokens", "num")]
    thead = "".join(f"<th data-key='{key}' class='{cls}'>{label}</th>" for label, key, cls in heads)
    imported = [f"{_e(r.run)}: imported from {_e((r.imported or {}).get('format'))}" for r in reports if r.imported]
    meta = json.dumps({"runs": list(runs), "generated_at": now_iso()})
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>retroformer report: "
        f"{_e(', '.join(runs))}</title><style>{CSS}</style><script type='application/json' id=meta>{_e(meta)}</script>"
        f"</head><body><h1>retroformer report</h1><div class=muted>runs: {_e(', '.join(runs))} · generated "
        f"{_e(now_iso())} · success is cumulative (solved at any trial ≤ k); bands and brackets: 95% Wilson "
        f"intervals; comparisons: Bonett-Price interval, exact McNemar p</div>"
        + (f"<div class=muted>{'<br>'.join(imported)}</div>" if imported else "")
        + f"{warnings}<h2>Success per trial</h2><div id=plot>{_svg(reports)}</div>{_summary(reports)}"
        + (f"<h2>Paired comparisons</h2>{_comparisons(data['comparisons'])}" if data["comparisons"] else "")
        + f"<h2>Tasks</h2><input id=filter type=search placeholder='filter tasks (run, id, outcome)'>"
          f" <span class=muted><span id=shown>{len(task_rows)}</span> of {len(task_rows)} shown; click a column "
          f"to sort</span><table id=tasks><thead><tr>{thead}</tr></thead><tbody>{''.join(task_rows)}</tbody></table>"
        + f"<h2>Trials</h2>{''.join(details)}<script>{SCRIPT}</script></body></html>"
    )


def write(workspace: Workspace, runs: Sequence[str], out: Path | None = None, *,
          pairs: Sequence[tuple[str, str]] = (), prices: Any = None) -> Path:
    """Write the report (atomically) to ``out`` or ``reports/<runs>.html``; returns the path."""
    from retroformer_cli.stages.evaluate import report_name

    page = build(workspace, runs, pairs=pairs, prices=prices)
    path = Path(out) if out is not None else workspace.reports_dir / f"{report_name(list(runs))}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
