"""The recipe's report: one self-contained HTML page (plots embedded, no network) and a model card in Markdown,
read only from the run directories' files (result.json, metrics.jsonl, data_card.json, ...).

    paths = gemmalab.report.write_report("runs/tiny-recipe")   # {"html": .../report.html, "card": .../MODEL_CARD.md}
"""

from __future__ import annotations

from pathlib import Path

from gemmalab.report.card import model_card
from gemmalab.report.html import report_html
from gemmalab.report.runs import RecipeRuns

__all__ = ["RecipeRuns", "REPORT_FILES", "report_html", "model_card", "write_report"]

REPORT_FILES = {"html": "report.html", "card": "MODEL_CARD.md"}  # beside the recipe's result.json


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/MODEL_CARD.md from a recipe's run directory; returns their paths."""
    from gemmalab.files import atomic_write

    runs = RecipeRuns.read(run_dir)
    return {"html": atomic_write(runs.root / REPORT_FILES["html"], report_html(runs)),
            "card": atomic_write(runs.root / REPORT_FILES["card"], model_card(runs))}
