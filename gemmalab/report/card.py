"""A model card in Markdown in the layout of Gemma's (model details, intended use, data, evaluation, memorization,
limitations, ethical considerations), filled from the run directories only."""

from __future__ import annotations

import json

from gemmalab.report.runs import RecipeRuns


def _f(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _ci(v) -> str:
    return f"[{_f(float(v[0]))}, {_f(float(v[1]))}]" if isinstance(v, (list, tuple)) and len(v) == 2 else "n/a"


def model_card(runs: RecipeRuns) -> str:
    """The card of the recipe's final model (OUT/rlhf/model, else the last model stage that finished)."""
    final = next((s for s in ("rlhf", "sft", "pretrain") if runs.result(s)), None)
    config = runs.json(final, "model/config.json") if final else {}
    pre, sft, rm, rl = (runs.result(s) for s in ("pretrain", "sft", "reward", "rlhf"))
    card = runs.json("data", "data_card.json")
    lines = [f"# Model card: {runs.root.name}", "",
             "## Model details", "",
             f"- Final model: `{runs.root / final / 'model' if final else 'none'}` ({final or 'no model stage finished'})",
             f"- Architecture: decoder-only Gemma ({_f(config.get('model_type'))}), {_f(config.get('num_hidden_layers'))} "
             f"layers, width {_f(config.get('hidden_size'))}, {_f(config.get('num_attention_heads'))} attention heads "
             f"({_f(config.get('num_key_value_heads'))} key/value), vocabulary {_f(config.get('vocab_size'))}, context "
             f"{_f(config.get('max_position_embeddings'))}; {_f(pre.get('params'))} parameters.",
             f"- Training: pretraining ({_f(pre.get('steps'))} steps, {_f(pre.get('tokens'))} tokens), supervised "
             f"fine-tuning in the Gemma dialogue format, a Bradley-Terry reward model and RLHF "
             f"({_f(rl.get('algorithm'))}, {_f(rl.get('steps'))} steps) with gemmalab.",
             "", "## Intended use", "",
             "A research artefact of the gemmalab recipe: to learn, test and audit the training pipeline. It is not "
             "meant for any use where its answers matter.",
             "", "## Training data", "",
             f"- {_f(card.get('documents_in'))} documents read, {_f(card.get('documents_out'))} kept, "
             f"{_f(card.get('documents_dropped'))} dropped by the filters (safety, personal data, quality, language, "
             f"exact and near duplicates); counts reconcile: {_f(card.get('reconciled'))}.",
             f"- Dropped by filter: `{json.dumps(card.get('drops_by_filter', {}))}`.",
             f"- Personal data found (and redacted or dropped): `{json.dumps(card.get('pii_found', {}))}`.",
             f"- Benchmark contamination (13-gram): `{json.dumps(card.get('contamination', {}))}`.",
             "- Instruction tuning and preferences: the built-in checkable tasks of gemmalab (generated; held-out "
             "prompts never trained on).",
             "", "## Evaluation", "",
             "| figure | pretrained | SFT | RLHF |", "|---|---|---|---|",
             f"| held-out checkable accuracy | {_f(sft.get('accuracy_before'))} | {_f(sft.get('accuracy_after'))} | "
             f"{_f(rl.get('accuracy_after'))} |",
             f"| reward-model score of held-out answers | | {_f(rl.get('reward_before'))} | {_f(rl.get('reward_after'))} |",
             "", f"Reward model: held-out pairwise accuracy {_f(rm.get('heldout_accuracy'))}. RLHF: KL to the SFT "
             f"model {_f(rl.get('kl'))}, judge win rate against SFT {_f(rl.get('judge_win_rate'))}, stopped by a guard: "
             f"{_f(rl.get('stopped_by_guard'))}."]
    ev = runs.result("eval").get("models", {})
    if ev:
        lines += ["", "Benchmarks:", ""]
        for model, info in ev.items():
            for task, figures in info.get("headline", {}).items():
                lines.append(f"- {model}, {task}: " + ", ".join(f"{k} {_f(v)}" for k, v in figures.items()))
            for task, why in info.get("skipped", {}).items():
                lines.append(f"- {model}, {task}: not run ({why})")
    pairs = runs.result("sxs").get("pairs", {})
    if pairs:
        lines += ["", "Side by side:", ""]
        lines += [f"- {n}: win rate {_f(p.get('win_rate'))} (95% CI {_ci(p.get('ci95'))}), W/T/L {p.get('wins')}/"
                  f"{p.get('ties')}/{p.get('losses')}" for n, p in pairs.items()]
    mem = runs.result("memorization").get("sources", {})
    lines += ["", "## Memorization", ""]
    if mem:
        lines += [f"- {name}: {_f(s.get('samples'))} samples, exact {_f(s.get('exact_rate'))}, approximate "
                  f"{_f(s.get('approx_rate'))} (95% CI {_ci(s.get('approx_ci95'))}); PII in memorized text: sensitive "
                  f"{sum((s.get('pii', {}).get('sensitive') or {}).values())}, personal "
                  f"{sum((s.get('pii', {}).get('personal') or {}).values())}" for name, s in mem.items()]
        lines.append("- Audited on the pretrained model, 50-token prefixes and 50-token continuations, as the "
                     "Gemma report.")
    else:
        lines.append("Not audited in this run.")
    lines += ["", "## Limitations", "",
              "- Trained on a small, generated and filtered corpus: it knows little and makes things up.",
              "- The checkable tasks measure a narrow skill; the figures above say nothing of safety or helpfulness "
              "in general.",
              "- English only; no multimodal input.",
              "", "## Ethical considerations and risks", "",
              "- The data pipeline filters unsafe content and personal data, but filters miss things; the "
              "memorization audit above reports what it found in memorized text.",
              "- Do not deploy this model. Larger runs of the same recipe need their own safety evaluation.",
              ""]
    return "\n".join(lines)
