"""What the report reads: a recipe's run directory and its stages' files, nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.runs import read_result

@dataclass
class RecipeRuns:
    """The files of one recipe run: OUT/result.json and, per stage, OUT/<stage>/result.json and metrics.jsonl."""

    root: Path
    recipe: dict
    results: dict[str, dict] = field(default_factory=dict)  # stage -> its result.json (stages that wrote one)
    metrics: dict[str, list[dict]] = field(default_factory=dict)  # stage -> metrics.jsonl rows

    @classmethod
    def read(cls, run_dir: str | Path) -> RecipeRuns:
        root = Path(run_dir)
        recipe = read_result(root)
        if recipe is None or recipe.get("stage") != "recipe":
            raise GemmalabError(f"{root} is not a recipe's run directory (no result.json of stage `recipe`); run "
                                f"`gemmalab recipe --config ... --out {root}` first.")
        runs = cls(root, recipe)
        for stage in recipe.get("stages", {}):  # the recipe's own list, in its order
            result = read_result(root / stage)
            if result is not None:
                runs.results[stage] = result
            runs.metrics[stage] = _metrics(root / stage / "metrics.jsonl")
        return runs

    def result(self, stage: str) -> dict:
        return self.results.get(stage, {})

    def json(self, stage: str, name: str) -> dict:
        """A JSON file of a stage's directory ({} if absent)."""
        path = self.root / stage / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise GemmalabError(f"{path} cannot be read: {e}.") from None


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a cut last line (a run killed mid-write) is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
