"""The report page: one HTML file, plots as embedded PNGs (matplotlib, no script, no network), a section per stage."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

from gemmalab.report.runs import RecipeRuns

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-variant-numeric:tabular-nums}th{background:#f4f4f4}figure{display:inline-block;margin:.5em 1em .5em 0}
figcaption{font-size:.9em;color:#555}.muted{color:#777}.bad{color:#a00}"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{_fmt(float(v[0]))}, {_fmt(float(v[1]))}]"
    return html.escape(str(v))


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def figure(name: str, caption: str, draw) -> str:
    """A plot as <figure data-plot=name>: `draw(ax)` fills one matplotlib axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    draw(ax)
    ax.grid(alpha=0.3)
    return (f'<figure data-plot="{html.escape(name)}"><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def curves(name: str, caption: str, rows: list[dict], keys: Sequence[str], ylabel: str = "", log: bool = False) -> str:
    """Lines of metrics.jsonl keys against the step ('' when no row has any of them)."""
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""

    def draw(ax):
        for k, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=k, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)

    return figure(name, caption, draw)


def bars(name: str, caption: str, labels: list[str], values: list[float], intervals: list | None = None,
         ylabel: str = "", reference: float | None = None) -> str:
    if not labels:
        return ""

    def draw(ax):
        yerr = None
        if intervals:
            yerr = [[max(0.0, v - lo) for v, (lo, _) in zip(values, intervals)],
                    [max(0.0, hi - v) for v, (_, hi) in zip(values, intervals)]]
        ax.bar(range(len(labels)), values, yerr=yerr, capsize=4, color="#4c78a8")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if reference is not None:
            ax.axhline(reference, color="#999", linestyle="--", linewidth=1)

    return figure(name, caption, draw)


# ---- sections ---------------------------------------------------------------------------------------


def _summary(runs: RecipeRuns) -> str:
    rows = []
    for stage, info in runs.recipe.get("stages", {}).items():
        rows.append([stage, info.get("status"), info.get("seconds")])
    carbon = [runs.result(s).get("carbon", {}) for s in ("pretrain", "sft", "reward", "rlhf")]
    kg = sum(c.get("co2e_kg", 0.0) for c in carbon if isinstance(c, dict))
    kwh = sum(c.get("energy_kwh", 0.0) for c in carbon if isinstance(c, dict))
    return ("<h2>Stages</h2>" + table(["stage", "status", "seconds (last run)"], rows) +
            f"<p>Training energy and carbon (estimates from each training stage's <code>carbon</code>): "
            f"{_fmt(kwh)} kWh, {_fmt(kg)} kg CO2e.</p>")


def _data(runs: RecipeRuns) -> str:
    card = runs.json("data", "data_card.json")
    if not card:
        return ""
    drops = [(f"{f}/{r}", n) for f, reasons in card.get("drops_by_filter", {}).items() for r, n in reasons.items()]
    drops.sort(key=lambda x: -x[1])
    sources = card.get("sources", {})
    out = ["<h2>Data</h2>",
           f"<p>{_fmt(card.get('documents_in'))} documents in, {_fmt(card.get('documents_out'))} kept, "
           f"{_fmt(card.get('documents_dropped'))} dropped (counts reconcile: {card.get('reconciled')}); "
           f"{_fmt(runs.result('data').get('tokens'))} tokens, vocabulary {_fmt(runs.result('data').get('vocab_size'))}. "
           f"Personal data found: {_fmt(card.get('pii_found'))}; toxic lines removed: "
           f"{_fmt(card.get('toxic_lines_removed'))}.</p>",
           table(["source", "documents in", "kept", "dropped by filter"],
                 [[s, v.get("documents_in"), v.get("documents_out"), v.get("dropped")] for s, v in sources.items()]),
           bars("data_drops", "documents dropped per filter and reason", [d[0] for d in drops[:12]],
                [d[1] for d in drops[:12]], ylabel="documents")]
    contamination = card.get("contamination", {})
    if contamination:
        out.append("<h3>Benchmark contamination (13-gram overlap)</h3>" + table(
            ["benchmark", "items", "items with n-grams", "items found in the corpus", "documents hit"],
            [[b, v.get("items"), v.get("items_with_ngrams"), v.get("items_found"), v.get("documents_hit")]
             for b, v in contamination.items()]))
    return "".join(out)


def _pretrain(runs: RecipeRuns) -> str:
    r, rows = runs.result("pretrain"), runs.metrics.get("pretrain", [])
    if not r:
        return ""
    return ("<h2>Pretraining</h2>" +
            f"<p>{_fmt(r.get('steps'))} steps, {_fmt(r.get('tokens'))} tokens, final loss {_fmt(r.get('final_loss'))}, "
            f"{_fmt(r.get('tokens_per_s'))} tokens/s, MFU {_fmt(r.get('mfu'))}, {_fmt(r.get('params'))} parameters, "
            f"on {_fmt(r.get('device'))}.</p>" +
            curves("pretrain_loss", "pretraining loss", rows, ["loss"], "loss") +
            curves("pretrain_lr", "learning rate", rows, ["lr"], "lr") +
            curves("pretrain_throughput", "throughput", rows, ["tokens_per_s"], "tokens/s"))


def _by_task(before: dict, after: dict, names=("before", "after"), first: str = "task") -> str:
    tasks = sorted(set(before) | set(after))
    return table([first, *names], [[t, before.get(t), after.get(t)] for t in tasks])


def _sft(runs: RecipeRuns) -> str:
    r, rows = runs.result("sft"), runs.metrics.get("sft", [])
    if not r:
        return ""
    by = r.get("accuracy_by_task", {})
    return ("<h2>Supervised fine-tuning</h2>" +
            f"<p>Held-out exact-match accuracy {_fmt(r.get('accuracy_before'))} (pretrained) -> "
            f"{_fmt(r.get('accuracy_after'))} (SFT) on {_fmt(r.get('heldout'))} prompts; held-out loss "
            f"{_fmt(r.get('heldout_loss_before'))} -> {_fmt(r.get('heldout_loss_after'))}; "
            f"{_fmt(r.get('dialogues_trained'))} dialogues trained.</p>" +
            curves("sft_loss", "SFT loss", rows, ["loss"], "loss") +
            _by_task(by.get("before", {}), by.get("after", {}), ("pretrained", "SFT")))


def _reward(runs: RecipeRuns) -> str:
    r, rows = runs.result("reward"), runs.metrics.get("reward", [])
    if not r:
        return ""
    kinds = r.get("heldout_accuracy_by_kind", {})
    return ("<h2>Reward model</h2>" +
            f"<p>Held-out pairwise accuracy {_fmt(r.get('heldout_accuracy_before'))} (untrained head) -> "
            f"{_fmt(r.get('heldout_accuracy'))} on {_fmt(r.get('heldout_pairs'))} pairs; "
            f"{_fmt(r.get('pairs_trained'))} pairs trained.</p>" +
            curves("reward_loss", "Bradley-Terry loss", rows, ["loss"], "loss") +
            curves("reward_accuracy", "training pairwise accuracy", rows, ["accuracy"], "accuracy") +
            _by_task(kinds.get("before", {}), kinds.get("after", {}), first="rejected kind"))


def _rlhf(runs: RecipeRuns) -> str:
    r, rows = runs.result("rlhf"), runs.metrics.get("rlhf", [])
    if not r:
        return ""
    guard = r.get("stopped_by_guard")
    by = r.get("accuracy_by_task", {})
    checks = r.get("guard_checks", [])
    return ("<h2>RLHF</h2>" +
            f"<p>{_fmt(r.get('algorithm'))}, {_fmt(r.get('steps'))} steps. Held-out accuracy "
            f"{_fmt(r.get('accuracy_before'))} (SFT) -> {_fmt(r.get('accuracy_after'))}; reward "
            f"{_fmt(r.get('reward_before'))} -> {_fmt(r.get('reward_after'))}; KL {_fmt(r.get('kl'))}; judge win rate "
            f"against SFT {_fmt(r.get('judge_win_rate'))}. " +
            (f"<span class=bad>Stopped by a guard: {_fmt(guard)}</span>" if guard else "No guard stopped the run.") +
            "</p>" +
            curves("rlhf_reward", "reward of the samples (before the KL term)", rows, ["reward", "rm_score"], "reward") +
            curves("rlhf_kl", "KL to the SFT model, per sequence", rows, ["kl_k1", "kl_k3"], "KL") +
            curves("rlhf_length", "answer length and end-of-turn rate", rows, ["length", "ended_turn"]) +
            (bars("rlhf_judge", "judge win rate against SFT at each check", [str(c["step"]) for c in checks],
                  [c["win_rate"] for c in checks], ylabel="win rate", reference=0.5) if checks else "") +
            _by_task(by.get("before", {}), by.get("after", {}), ("SFT", "RLHF")))


def _eval(runs: RecipeRuns) -> str:
    r = runs.result("eval")
    if not r:
        return ""
    rows = []
    for model, info in r.get("models", {}).items():
        for task, figures in info.get("headline", {}).items():
            for metric, value in figures.items():
                rows.append([model, task, metric, value, ""])
        for task, why in info.get("skipped", {}).items():
            rows.append([model, task, "-", None, f"skipped: {why}"])
    return "<h2>Benchmarks</h2>" + table(["model", "task", "metric", "value", "note"], rows)


def _sxs(runs: RecipeRuns) -> str:
    r = runs.result("sxs")
    if not r:
        return ""
    pairs = r.get("pairs", {})
    names = list(pairs)
    values = [pairs[n].get("win_rate") or 0.0 for n in names]
    cis = [tuple(pairs[n].get("ci95") or (v, v)) for n, v in zip(names, values)]
    return ("<h2>Side by side</h2>" +
            table(["pair (model vs baseline)", "wins", "ties", "losses", "win rate", "95% CI", "judge"],
                  [[n, p.get("wins"), p.get("ties"), p.get("losses"), p.get("win_rate"), p.get("ci95"),
                    (p.get("judge") or {}).get("kind")] for n, p in pairs.items()]) +
            bars("sxs_win_rates", "win rate with 95% bootstrap interval (ties count half)", names, values, cis,
                 ylabel="win rate", reference=0.5))


def _memorization(runs: RecipeRuns) -> str:
    r = runs.result("memorization")
    if not r:
        return ""
    sources = r.get("sources", {})
    names = list(sources)
    rows = [[n, s.get("samples"), s.get("exact_rate"), s.get("exact_ci95"), s.get("approx_rate"), s.get("approx_ci95"),
             sum((s.get("pii", {}).get("sensitive") or {}).values()), sum((s.get("pii", {}).get("personal") or {}).values())]
            for n, s in sources.items()]
    return ("<h2>Memorization</h2><p>Greedy continuations of 50-token prefixes of the training data compared with "
            "the true 50 tokens: exact (all match) and approximate (token edit distance <= 10%).</p>" +
            table(["source", "samples", "exact", "95% CI", "approximate", "95% CI", "sensitive PII", "personal PII"], rows) +
            bars("memorization_rates", "approximate memorization rate by source (Wilson 95%)", names,
                 [sources[n].get("approx_rate") or 0.0 for n in names],
                 [tuple(sources[n].get("approx_ci95") or (0.0, 0.0)) for n in names], ylabel="rate"))


SECTIONS = (_summary, _data, _pretrain, _sft, _reward, _rlhf, _eval, _sxs, _memorization)


def report_html(runs: RecipeRuns) -> str:
    """The whole page."""
    body = "".join(section(runs) for section in SECTIONS)
    title = f"gemmalab recipe report: {runs.root.name}"
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=muted>Read from {html.escape(str(runs.root))}; status {html.escape(str(runs.recipe.get('status')))}."
            f" The model card is MODEL_CARD.md beside this page.</p>{body}</body></html>\n")
