"""The model cards of a version directory: README.md files with Hugging Face model-card YAML front matter.

`vN/README.md` describes the version (parent, algorithm, labels, metrics with n and 95% intervals, the gate, the
config, how to load it); adapter/, reward/ and reward-hf/ each get a short card of their own, so any of them uploaded
alone to the hub still names its base model and how to load it. Written by learner.round with the version.
"""

from __future__ import annotations

import json
from pathlib import Path

from learner.model import BaseModelInfo
from learner.stats import proportion

TAGS = {"dpo": "dpo", "kto": "kto", "reward": "reward-model"}  # the card's tag for each RoundConfig.algorithm

# (metrics.json key, what it measures): the rates a round reports as {"value", "n", "ci95"}.
RATES = (
    ("reward_heldout_accuracy", "reward model: held-out pairs ranked as the annotators did"),
    ("policy_heldout_accuracy", "policy: held-out pairs ranked as the annotators did (implicit reward)"),
    ("win_rate_vs_parent", "win-rate vs the parent on eval prompts (reward model as judge)"),
    ("win_rate_vs_base", "win-rate vs the base model on eval prompts (reward model as judge)"),
)


def front_matter(base: BaseModelInfo, tags: list[str], pipeline_tag: str | None = None) -> str:
    """YAML front matter (strings JSON-quoted, which YAML reads as they are)."""
    lines = ["---", f"base_model: {json.dumps(base.name)}", "library_name: peft"]
    if base.license:
        lines.append(f"license: {json.dumps(base.license)}")
    if pipeline_tag:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    lines += ["tags:", *[f"- {tag}" for tag in tags], "---", ""]
    return "\n".join(lines)


def _rate_row(label: str, figure: dict | None) -> str:
    if not figure or figure.get("value") is None:
        n = figure.get("n", 0) if figure else 0
        return f"| {label} | not measured | {n} | - |"
    low, high = figure["ci95"]
    return f"| {label} | {figure['value']:.3f} | {figure['n']} | [{low:.3f}, {high:.3f}] |"


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def metrics_section(metrics: dict) -> list[str]:
    """Every rate with its n and 95% interval, then the eval answers' other figures."""
    lines = ["## Evaluation", "", "| metric | value | n | 95% interval |", "|---|---|---|---|"]
    lines += [_rate_row(label, metrics.get(key)) for key, label in RATES]
    answers = metrics.get("eval_answers") or 0
    if answers and metrics.get("eos_rate") is not None:
        eos = proportion(round(metrics["eos_rate"] * answers), answers).to_dict()
        lines.append(_rate_row("eval answers that ended (eos) within max_new_tokens", eos))
    lines += ["", "Intervals are Wilson score intervals that treat the n comparisons as independent; pairs from one "
              "ranking, or answers to one prompt, are correlated, so they are somewhat optimistic.", ""]
    if answers:
        lines += [f"On {answers} answers sampled for {metrics.get('eval_prompts', '?')} eval prompt(s) (means, no "
                  "interval): "
                  f"KL to the reference {_number(metrics.get('kl_to_reference'))} nats per answer "
                  f"({_number(metrics.get('kl_to_reference_per_token'))} per token), "
                  f"entropy {_number(metrics.get('entropy'))} nats per token, "
                  f"length {_number(metrics.get('mean_answer_length'))} tokens, reward "
                  f"{_number(metrics.get('reward_mean'))} (parent {_number(metrics.get('reward_mean_parent'))}, "
                  f"base {_number(metrics.get('reward_mean_base'))}).", ""]
    return lines


def data_section(metrics: dict, snapshot_meta: dict) -> list[str]:
    """The labels behind the version: what the snapshot held, what trained what, what was held out."""
    counts = snapshot_meta.get("counts", {})
    heldout, staleness = metrics.get("heldout", {}), metrics.get("staleness", {})
    rows = [
        ("snapshot: ranked pairs / thumbs / prompts",
         f"{counts.get('pairs', '-')} / {counts.get('unary', '-')} / {counts.get('prompts', '-')}"),
        ("human labels that trained the policy (within max_label_staleness)", metrics.get("labels_used", 0)),
        ("reward model: rankings trained on this round", metrics.get("reward_train_items", 0)),
        ("reward model: human pairs learned over all its rounds", metrics.get("reward_trained_pairs", 0)),
        ("held-out prompts / rankings / pairs (measure only)",
         f"{heldout.get('prompts', '-')} / {heldout.get('rankings', '-')} / {heldout.get('pairs', '-')}"),
        ("label staleness in deployed versions: mean / max",
         f"{_number(staleness.get('mean'), 3)} / {_number(staleness.get('max'))}"),
    ]
    lines = ["## Data", "", "| | n |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], ""]
    if heldout.get("split"):
        lines += [f"Prompts are split {heldout['split']}.", ""]
    return lines


def gate_section(metrics: dict) -> list[str]:
    gate = metrics.get("gate") or {}
    decision = "passed" if gate.get("passed") else f"refused: {gate.get('reason')}"
    lines = ["## Gate", "", f"Status `{metrics.get('status')}`: the gate {decision}."]
    check = gate.get("win_rate_check")
    if check:
        lines.append(f"{check.get('statement')} (rule: {check.get('rule')}, min_win_rate {check.get('min_win_rate')}).")
    warnings = metrics.get("warnings") or []
    if warnings:
        lines += ["", "Warnings of the round:", "", *[f"- {w}" for w in warnings]]
    return [*lines, ""]


def config_section(config: dict) -> list[str]:
    rows = [f"| `{key}` | `{json.dumps(value)}` |" for key, value in config.items()
            if key not in ("snapshot", "parent_version", "base_model")]
    return ["## Training config", "", "| setting | value |", "|---|---|", *rows, ""]


def usage_section(base: BaseModelInfo, reward_bias: float | None) -> list[str]:
    lines = ["## How to load", "", "The policy (this directory's `adapter/`):", "", "```python",
             "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base.name)})",
             f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(base.name)})",
             'model = PeftModel.from_pretrained(base, "path/to/this/version/adapter")',
             "```", ""]
    if reward_bias is not None:
        lines += ["The reward model, as a sequence-classification adapter (`reward-hf/`, for TRL's RewardTrainer or "
                  "PPO): see `reward-hf/README.md`. `reward/` holds the same reward model in prefloop's own format "
                  "(LoRA on the causal LM plus `reward_head.safetensors`), which the next round warm-starts from.", ""]
    return lines


def version_card(version: str, base: BaseModelInfo, metrics: dict, config: dict, snapshot_meta: dict,
                 reward_bias: float | None) -> str:
    """The README.md of a version directory."""
    algorithm = metrics.get("algorithm", config.get("algorithm", "?"))
    parent = metrics.get("parent_version", 0)
    parent_text = "the base model (version 0)" if not parent else f"version {parent}"
    what = ("The parent's policy unchanged, with a newly trained reward model" if algorithm == "reward"
            else f"A LoRA adapter trained with {algorithm.upper()} on human labels")
    intro = [f"# prefloop version {version}", "",
             f"{what}, on `{base.name}`; parent: {parent_text}. "
             f"Written by prefloop's learner (status `{metrics.get('status')}` when written; the app's registry "
             "holds later deploy decisions).", ""]
    if base.note:
        intro += [f"Base model: `{base.name}`, as {base.note}.", ""]
    if not base.is_hub_id:
        intro += [f"`{base.name}` is the name of the local base model directory this was trained on (no hub id was "
                  "known for it): put that model's path in its place below.", ""]
    body = [*intro, *data_section(metrics, snapshot_meta), *metrics_section(metrics), *gate_section(metrics),
            *config_section(config), *usage_section(base, reward_bias)]
    return front_matter(base, ["prefloop", TAGS.get(algorithm, algorithm), "lora"], "text-generation") + "\n".join(body)


def adapter_card(version: str, base: BaseModelInfo, algorithm: str) -> str:
    """adapter/README.md: enough to load it alone."""
    return front_matter(base, ["prefloop", TAGS.get(algorithm, algorithm), "lora"], "text-generation") + "\n".join([
        f"# prefloop version {version}: the policy adapter", "",
        "A LoRA adapter; the version's metrics, data and config are in `../README.md`.", "", "```python",
        "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base.name)}), "
        '"path/to/adapter")', "```", ""])


def prefloop_reward_card(version: str, base: BaseModelInfo) -> str:
    """reward/README.md: prefloop's own reward format, and where the standard one is."""
    return front_matter(base, ["prefloop", "reward-model", "lora"]) + "\n".join([
        f"# prefloop version {version}: the reward model (prefloop's format)", "",
        "A LoRA adapter on the causal LM (`adapter_config.json`, `adapter_model.safetensors`) and a scalar head "
        "(`reward_head.safetensors`, weight and bias) on the final-norm hidden state of the answer's last token; "
        "`prefloop_reward.json` counts the human pairs it learned from. Load it with "
        "`learner.reward.load_reward_model`; `../reward-hf/` holds the same model as a standard "
        "sequence-classification adapter.", ""])


def reward_hf_card(version: str, base: BaseModelInfo, bias: float, pad_token: str | None) -> str:
    """reward-hf/README.md: how to load and call the sequence-classification adapter so it scores as prefloop does."""
    pad = ("batches are padded with `tokenizer.pad_token` " + f"(`{pad_token}`), which is not the eos that ends an "
           "answer: the model reads the score at the last token that is not padding, and prefloop scores the eos"
           if pad_token else "this tokenizer has no token to pad with besides eos: score one answer per call")
    return front_matter(base, ["prefloop", "reward-model", "lora"], "text-classification") + "\n".join([
        f"# prefloop version {version}: the reward model (sequence classification)", "",
        "The reward model prefloop trained (Bradley-Terry on human rankings), as a PEFT adapter for "
        "`AutoModelForSequenceClassification` with `num_labels=1`: the reward LoRA, and the scalar head as `score` "
        "(`modules_to_save`). Its input is the prompt in the chat template with the generation prompt, then the "
        f"answer, then the eos token when the answer ended (not when it was cut at max_new_tokens); {pad}.", "",
        f"prefloop's head has a bias ({bias:.6g}); `score` in transformers has none, so this model scores "
        f"prefloop's reward minus {bias:.6g} (in `prefloop_reward_hf.json`). A constant changes no comparison "
        "(Bradley-Terry, rankings, best-of-n); add it back for prefloop's absolute numbers.", "",
        "```python", "import torch", "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/reward-hf")',
        f"model = AutoModelForSequenceClassification.from_pretrained({json.dumps(base.name)}, num_labels=1,",
        "                                                           pad_token_id=tokenizer.pad_token_id)",
        'model = PeftModel.from_pretrained(model, "path/to/reward-hf").eval()', "",
        "def reward(prompt: str, answer: str, ended: bool = True) -> float:",
        '    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,',
        "                                         tokenize=False)",
        '    ids = tokenizer(text + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * ended',
        "    with torch.no_grad():",
        "        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()",
        "```", ""])


def write_cards(version_dir: Path, base: BaseModelInfo, metrics: dict, config: dict, snapshot_meta: dict,
                reward_hf: dict | None) -> None:
    """README.md in the version directory and in each of its adapter folders that exists. `reward_hf` is the
    prefloop_reward_hf.json of reward-hf/ ({"score_bias", "pad_token"}), None when there is none."""
    version_dir = Path(version_dir)
    version = version_dir.name.removesuffix(".partial").removeprefix("v")
    algorithm = metrics.get("algorithm", config.get("algorithm", "dpo"))
    bias = reward_hf["score_bias"] if reward_hf else None
    (version_dir / "README.md").write_text(version_card(version, base, metrics, config, snapshot_meta, bias))
    if (version_dir / "adapter").is_dir():
        (version_dir / "adapter" / "README.md").write_text(adapter_card(version, base, algorithm))
    if (version_dir / "reward").is_dir():
        (version_dir / "reward" / "README.md").write_text(prefloop_reward_card(version, base))
    if reward_hf and (version_dir / "reward-hf").is_dir():
        (version_dir / "reward-hf" / "README.md").write_text(
            reward_hf_card(version, base, reward_hf["score_bias"], reward_hf.get("pad_token")))
