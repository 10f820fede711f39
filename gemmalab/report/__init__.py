"""The recipe's report: one self-contained HTML page (plots embedded, no network) and a model card in Markdown,
read only from the run directories' files (result.json, metrics.jsonl, data_card.json, ...).

    paths = gemmalab.report.write_report("runs/tiny-recipe")   # {"html": .../report.html, "card": .../MODEL_CARD.md}
"""

from __future__ import annotations

from pathlib import Path

from gemmalab.report.card import model_card
from gemmalab.report.html import report_html
from gemmalab.report.runs import RecipeRuns

__all__ = ["RecipeRuns", "report_html", "model_card", "write_report"]


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/MODEL_CARD.md from a recipe's run directory; returns their paths."""
    from gemmalab.files import atomic_write

    runs = RecipeRuns.read(run_dir)
    html = atomic_write(runs.root / "report.html", report_html(runs))
    card = atomic_write(runs.root / "MODEL_CARD.md", model_card(runs))
    return {"html": html, "card": card}
