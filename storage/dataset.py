"""An export as a Hugging Face dataset directory: the JSON lines of `storage.exports` under `data/train.jsonl`, and a
dataset card (`README.md` with the hub's YAML front matter) that names the split, says where the labels come from,
what each column holds and how many labels, annotators, prompts and versions are in it. `datasets.load_dataset(DIR)`
reads the directory as it is, and `hf upload USER/NAME DIR --repo-type dataset` publishes it.

The card is computed from the rows written, so an export made through a running server (which sends the rows) gets
the same card as one read from the DuckDB file. The directory appears whole or not at all: it is written under a
temporary name beside it and renamed into place."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from storage._common import new_directory
from storage.errors import NothingToExport

DATA_FILE = "data/train.jsonl"

# What each format's columns hold, in the rows' order (storage/exports.py writes them).
_VERSION = "the version that sampled the answers (0 = the base model)"
_ANNOTATOR = "the annotator's integer id in the prefloop instance (names stay there)"
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "dpo": [
        ("prompt", "the user turn the answers were sampled for"),
        ("chosen", "the answer ranked higher"),
        ("rejected", "the answer ranked lower (tied answers give no row)"),
        ("chosen_finish_reason", "`eos`, or `length` when `max_new_tokens` cut the chosen answer off"),
        ("rejected_finish_reason", "the same for the rejected answer"),
        ("policy_version", _VERSION),
        ("annotator_id", _ANNOTATOR),
        ("ranking_id", "the ranking the pair comes from: one ranking of K answers gives up to K(K-1)/2 rows"),
        ("item_id", "the item (a prompt and its K sampled answers) that was ranked"),
    ],
    "kto": [
        ("prompt", "the user turn the answer was sampled for"),
        ("completion", "the answer"),
        ("label", "true for a thumbs up, false for a thumbs down"),
        ("finish_reason", "`eos`, or `length` when `max_new_tokens` cut the answer off"),
        ("policy_version", _VERSION),
        ("annotator_id", _ANNOTATOR),
        ("feedback_id", "the thumbs vote"),
        ("item_id", "the item the answer belongs to"),
    ],
    "rankings": [
        ("ranking_id", "the ranking"),
        ("item_id", "the item (a prompt and its K sampled answers) that was ranked"),
        ("annotator_id", _ANNOTATOR),
        ("policy_version", _VERSION),
        ("prompt", "the prompt, a string"),
        ("answers", "the K answers, best first"),
        ("answer_ids", "their ids, in the same order"),
        ("finish_reasons", "each answer's `eos` or `length` (cut off by `max_new_tokens`)"),
        ("tiers", "each answer's tier, 0 = best; answers with equal tiers were marked equally good"),
        ("seconds", "how long the annotator took"),
        ("created_at", "when the ranking was stored (UTC, ISO 8601)"),
    ],
}

# The columns holding each answer's finish reason (rankings: the list `finish_reasons`).
_FINISH = {"dpo": ("chosen_finish_reason", "rejected_finish_reason"), "kto": ("finish_reason",)}
_WHAT = {"dpo": "preference pairs", "kto": "thumbs-up/down labels", "rankings": "rankings"}
_SOURCE = {"dpo": "they come from rankings; answers marked equally good give none", "kto": "they come from "
           "thumbs-up/down votes", "rankings": "no annotator has ranked an item"}
_TRAINER = {
    "dpo": "TRL's `DPOTrainer` (and `RewardTrainer`) reads `prompt`, `chosen` and `rejected`",
    "kto": "TRL's `KTOTrainer` reads `prompt`, `completion` and `label`",
    "rankings": "no trainer reads this format as it is; `--format dpo` writes its pairs",
}


@dataclass
class Contents:
    """What the rows hold, counted in one pass over the JSON lines."""

    rows: int = 0
    annotators: set = field(default_factory=set)
    prompts: set = field(default_factory=set)
    versions: Counter = field(default_factory=Counter)
    truncated: int = 0  # rows holding an answer cut off by max_new_tokens
    rankings: set = field(default_factory=set)
    labels: Counter = field(default_factory=Counter)  # kto: True / False
    ties: int = 0  # rankings with answers marked equally good

    def add(self, row: dict, fmt: str) -> None:
        self.rows += 1
        self.annotators.add(row["annotator_id"])
        prompt = row["prompt"]
        self.prompts.add(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True))
        self.versions[row["policy_version"]] += 1
        finish = [row[k] for k in _FINISH[fmt]] if fmt in _FINISH else row["finish_reasons"]
        self.truncated += "length" in finish
        if fmt in ("dpo", "rankings"):
            self.rankings.add(row["ranking_id"])
        if fmt == "kto":
            self.labels[bool(row["label"])] += 1
        if fmt == "rankings":
            self.ties += len(set(row["tiers"])) < len(row["tiers"])


def read_contents(path: Path, fmt: str) -> Contents:
    contents = Contents()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                contents.add(json.loads(line), fmt)
    return contents


def size_category(n: int) -> str:
    """The hub's `size_categories` value for n rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"


def dataset_card(contents: Contents, fmt: str, style: str, drop_truncated: bool, name: str, prefloop_version: str,
                 exported_at: datetime) -> str:
    c = contents
    tags = ["prefloop", "human-feedback", "preference", *({"dpo": ["dpo"], "kto": ["kto"]}.get(fmt, []))]
    front = ["---", f"pretty_name: Human {_WHAT[fmt]} collected with prefloop", "tags:", *(f"- {t}" for t in tags),
             "task_categories:", "- text-generation", "size_categories:", f"- {size_category(c.rows)}",
             "configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {DATA_FILE}", "---"]
    versions = ", ".join(f"v{v}: {n}" for v, n in sorted(c.versions.items())) or "none"
    options = f"--format {fmt}" + (" --plain" if style == "plain" else "") + (" --drop-truncated" if drop_truncated
                                                                              else "")
    counted = [("rows", c.rows), ("annotators", len(c.annotators)), ("distinct prompts", len(c.prompts))]
    if fmt in ("dpo", "rankings"):
        counted.insert(1, ("rankings", len(c.rankings)))
    if fmt == "kto":
        counted.insert(1, ("thumbs up / down", f"{c.labels[True]} / {c.labels[False]}"))
    if fmt == "rankings":
        counted.append(("rankings with answers marked equally good", c.ties))
    cut = "left out (`--drop-truncated`)" if drop_truncated else f"{c.truncated} (finish reason `length`)"
    shape = ("conversational: `prompt` is a list of messages (one user turn) and each answer one assistant message, "
             "so a trainer applies the model's chat template, as prefloop did when it sampled" if style ==
             "conversational" and fmt != "rankings" else "plain strings")
    lines = [
        *front, "", f"# Human {_WHAT[fmt]} collected with prefloop", "",
        f"Exported by prefloop {prefloop_version} on {exported_at:%Y-%m-%d %H:%M} UTC (`prefloop export {options} "
        f"--dataset {name}`). Annotators ranked (or voted on) answers that the model being trained had sampled, in "
        "prefloop's Annotate tab; each row says which version sampled its answers.", "",
        "| | |", "| --- | --- |", *(f"| {what} | {n} |" for what, n in counted),
        f"| rows by the version that sampled their answers (v0 = the base model) | {versions} |",
        f"| rows with an answer cut off by `max_new_tokens` | {cut} |", "",
        "## Loading it", "", "```python", "from datasets import load_dataset", "",
        f'{"pairs" if fmt == "dpo" else "rows"} = load_dataset({json.dumps(name)}, split="train")  # this directory, '
        "or its hub id once uploaded", "```", "",
        f"{_TRAINER[fmt]}. Rows are {shape}.",
    ]
    if fmt != "rankings" and not drop_truncated:
        filt = ('lambda r: "length" not in (r["chosen_finish_reason"], r["rejected_finish_reason"])' if fmt == "dpo"
                else 'lambda r: r["finish_reason"] != "length"')
        lines += ["", "A trainer closes every answer with the end-of-turn token, which teaches the model to stop "
                  "where a cut-off answer was cut; to leave such rows out:", "", "```python",
                  f"{'pairs' if fmt == 'dpo' else 'rows'} = {'pairs' if fmt == 'dpo' else 'rows'}.filter({filt})",
                  "```"]
    lines += ["", "## Columns", "", "| column | what it holds |", "| --- | --- |",
              *(f"| `{col}` | {what} |" for col, what in COLUMNS[fmt]), "",
              "## Before sharing it", "",
              "No license is set: add a `license:` line to the front matter above. Annotators appear by an integer "
              "id only; the prompts and answers are as they were typed and sampled, so read them for personal data "
              "before publishing (`hf upload USER/NAME DIR --repo-type dataset`).", ""]
    return "\n".join(lines)


def _prefloop_version() -> str:
    try:
        return metadata.version("prefloop")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "(not installed)"


def write_dataset(out_dir: Path, fmt: str, style: str, drop_truncated: bool, write_rows: Callable[[Path], int]) -> int:
    """Write the dataset directory `out_dir` (new, or an empty directory: Conflict): `write_rows(path)` writes the JSON
    lines to `path` and returns their count; the card is made from them. Returns the number of rows."""
    with new_directory(out_dir, "dataset directory") as tmp:
        (tmp / DATA_FILE).parent.mkdir()
        count = write_rows(tmp / DATA_FILE)
        if count == 0:  # `datasets` cannot load a dataset without rows
            raise NothingToExport(f"no {fmt} rows to export yet ({_SOURCE[fmt]}); nothing written")
        card = dataset_card(read_contents(tmp / DATA_FILE, fmt), fmt, style, drop_truncated, Path(out_dir).name,
                            _prefloop_version(), datetime.now(UTC))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return count
