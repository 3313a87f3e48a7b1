"""The learning experiment's HTML report (``reports/<name>/learning.html``, self-contained) and its learning-curve
plot; see :mod:`retroformer_cli.stages.learning`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _png_base64(fig: Any) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def curve_figure(curve: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key, title in zip(axes, ("reward", "kl", "frac_reward_zero_std"),
                              ("reward (Δ metric)", "KL to reference", "groups with zero reward variance")):
        pts = [(r["step"], r[key]) for r in curve if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(cfg: Any, workspace: Any, s: dict[str, Any]) -> Path:
    """``cfg`` is the experiment's LearningConfig and ``workspace`` its Workspace (untyped here: this module sits
    below :mod:`retroformer_cli.stages.learning` and imports nothing from it)."""
    """``reports/<name>/learning.html`` (self-contained) and ``learning_curve.png`` beside it."""
    import html

    from retroformer_cli.stages.evaluate import figure, report_run

    out_dir = workspace.root / "reports" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    curve_png = ""
    if s["curve"]:
        fig = curve_figure(s["curve"])
        fig.savefig(out_dir / "learning_curve.png", dpi=110, bbox_inches="tight")
        curve_png = _png_base64(fig)
    arms_fig = figure([report_run(workspace, a["run"]) for a in s["arms"].values()])
    arms_png = _png_base64(arms_fig)
    key = f"mean_{cfg.metric}_last"
    e = html.escape

    def pct(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    rows = "".join(
        f"<tr><td>{e(label)}{' <b>(diagnostic)</b>' if a['diagnostic'] else ''}</td><td>{a['tasks']}</td>"
        f"<td>{' / '.join(f'{v:.1%}' for v in a['success_per_trial'])}</td>"
        f"<td>{' / '.join(f'{v:.3f}' for v in (a['f1_per_trial'] or a['score_per_trial']))}</td>"
        f"<td>{a[key]:.3f}</td><td>{pct((a['sensitivity'] or {}).get('changed_share'))}</td>"
        f"<td>{pct((a['sensitivity'] or {}).get('score_change_after_reflection'))}</td></tr>"
        for label, a in s["arms"].items())
    comp = "".join(
        f"<tr><td>{e(label)} − frozen</td><td>{c['mean_' + cfg.metric]['difference']:+.3f}</td>"
        f"<td>[{c['mean_' + cfg.metric]['ci_low']:+.3f}, {c['mean_' + cfg.metric]['ci_high']:+.3f}]</td>"
        f"<td>{c['mean_' + cfg.metric].get('won', 0)} / {c['mean_' + cfg.metric].get('lost', 0)}</td>"
        + "".join(f"<td>{p['difference']:+.1%} [{p['ci_low']:+.1%}, {p['ci_high']:+.1%}] p={p['p_value']:.2f}</td>"
                  for p in c["success_per_trial"]) + "</tr>"
        for label, c in s["comparisons"].items())
    v = s["verdict"]
    levers = "".join(f"<li>{e(x)}</li>" for x in v["levers"]) or "<li>none</li>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Does training help? {e(cfg.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Does training help? ({e(s['env'])}, {e(cfg.name)})</h1>
<p>Actor <code>{e(s['actor'])}</code>; {s['train_tasks']} train-split tasks, {s['eval_tasks']} held-out eval-split tasks,
{s['eval_trials']} trials; {s['steps']} GRPO steps with reward Δ{e(s['reward_metric'])}. Compared metric: mean
{e(cfg.metric)} at trial {s['eval_trials']}.</p>
<h2>Verdict</h2><p><b>trained − frozen = {pct(s['trained_minus_frozen'])}</b>, 95% interval
[{pct(s['ci_low'])}, {pct(s['ci_high'])}]: target {'met' if v['target_met'] else 'not met'}.
Oracle headroom (oracle − none): tuned actor {pct(v['headroom_tuned'])}, base actor {pct(v['headroom_base'])}.</p>
<p>Levers that failed:</p><ul>{levers}</ul>
<h2>Arms (held-out tasks)</h2><table><tr><th>arm</th><th>tasks</th><th>success per trial</th><th>{e(cfg.metric)} per trial</th>
<th>mean {e(cfg.metric)} at last trial</th><th>changed after reflection</th><th>score change after reflection</th></tr>{rows}</table>
<h2>Paired comparisons against frozen</h2><table><tr><th>arm</th><th>Δ mean {e(cfg.metric)}</th><th>95% bootstrap CI</th>
<th>tasks won / lost</th>{''.join(f'<th>Δ success trial {j}</th>' for j in range(1, s['eval_trials'] + 1))}</tr>{comp}</table>
<h2>Success per trial</h2><img src="data:image/png;base64,{arms_png}" alt="success per trial">
<h2>Learning curve (PPO)</h2>{f'<img src="data:image/png;base64,{curve_png}" alt="learning curve">' if curve_png else '<p>no PPO metrics</p>'}
<h2>Stage timings (s)</h2><pre>{e(json.dumps(s.get('timings_s', {}), indent=1))}</pre>
<h2>Reflector training data</h2><pre>{e(json.dumps(s['reflector_data'], indent=1))}</pre>
</body></html>"""
    path = out_dir / "learning.html"
    path.write_text(page, encoding="utf-8")
    return path
