"""The side-by-side page: one self-contained HTML file (no scripts, no network) with the figures per category and,
for every prompt, both answers and the judge's verdict in each order. Every text from a model or a prompt file is
escaped."""

from __future__ import annotations

from html import escape
from pathlib import Path

from gemmalab.files import atomic_write

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; margin: 0; max-width: 40em; }
.model { background: #e8f5e9; } .baseline { background: #ffebee; } .tie { background: #f5f5f5; }
.small { color: #666; font-size: 0.85em; }
"""


def _figures_row(name: str, f: dict) -> str:
    cells = [escape(name), f["n"], f["wins"], f["ties"], f["losses"], f"{f['win_rate']:.3f}",
             f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]", f"{f['flip_rate']:.2f}" if "flip_rate" in f else "-",
             f"{f['lc_win_rate']:.3f}"]
    return "<tr>" + "".join(f'<td class="num">{c}</td>' if i else f"<td>{c}</td>" for i, c in enumerate(cells)) + "</tr>"


def _verdict_cell(v: dict, seen: str) -> str:
    detail = ""
    if v.get("probs"):
        detail = " ".join(f"{k} {p:.2f}" for k, p in v["probs"].items())
    elif v.get("text") is not None:
        detail = v["text"][-300:]
    flags = " (unparsed: tie)" if v.get("parsed") is False else ""
    flags += " (answers shortened)" if v.get("truncated") else ""
    return (f'<td class="{seen}"><b>{escape(v["choice"])}</b> &rarr; {escape(seen)}{escape(flags)}'
            f'<div class="small"><pre>{escape(detail)}</pre></div></td>')


def write_page(path: str | Path, result: dict, rows: list[dict]) -> Path:
    """Write the page of a side-by-side run: `result` (result.json's figures) and `rows` (per prompt: prompt,
    model and baseline answer records, verdicts in both orders, the two verdicts in model terms, the outcome)."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in ("category", "n", "W", "T", "L", "win rate", "95% CI",
                                                          "flip rate", "LC win rate")) + "</tr>"
    figures = [_figures_row(c, f) for c, f in result["by_category"].items()] + [_figures_row("all", result)]
    if "calibrated" in result:
        figures.append(_figures_row("all, seat-calibrated", result["calibrated"]))
    judge = result["judge"].get("model") or result["judge"].get("ref") or result["judge"]["kind"]
    prompts = []
    for r in rows:
        p = r["prompt"]
        reference = f'<div class="small">reference: {escape(p.reference)}</div>' if p.reference else ""
        prompts.append(
            f'<tr id="{escape(p.id)}"><td>{escape(p.id)}<div class="small">{escape(p.category)}</div></td>'
            f"<td><pre>{escape(p.prompt)}</pre>{reference}</td>"
            f'<td><pre>{escape(r["model"]["answer"])}</pre><div class="small">{r["model"]["tokens"]} tokens, '
            f'{escape(r["model"]["finish_reason"])}</div></td>'
            f'<td><pre>{escape(r["baseline"]["answer"])}</pre><div class="small">{r["baseline"]["tokens"]} tokens, '
            f'{escape(r["baseline"]["finish_reason"])}</div></td>'
            + _verdict_cell(r["verdicts"][0], r["seen"][0]) + _verdict_cell(r["verdicts"][1], r["seen"][1])
            + f'<td class="{r["outcome"]}">{escape(r["outcome"])}</td></tr>')
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Side by side: {escape(result['model'])} vs {escape(result['baseline'])}</title>
<style>{_STYLE}</style></head><body>
<h1>Side by side</h1>
<p>Model <b>{escape(result['model'])}</b> against baseline <b>{escape(result['baseline'])}</b>, judged by
<b>{escape(str(judge))}</b> in both answer orders ({result['judged']} prompts; a win needs both orders to agree).
Win rate = (W + T/2) / N; 95% CI by bootstrap over prompts; flip rate: verdicts that change with the seats;
LC: length-controlled win rate.</p>
<table>{head}{''.join(figures)}</table>
<h2>Prompts</h2>
<table><tr><th>id</th><th>prompt</th><th>model</th><th>baseline</th><th>model as A</th><th>baseline as A</th>
<th>outcome</th></tr>
{''.join(prompts)}
</table></body></html>
"""
    return atomic_write(path, html)
