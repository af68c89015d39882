"""`prefloop export --dataset DIR`: a Hugging Face dataset directory that the `datasets` library loads as it is, whose
card counts what is in it (hand-counted here), and that is written whole or not at all."""

from __future__ import annotations

import json

import pytest
import yaml
from datasets import load_dataset

from app.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, main
from storage.dataset import DATA_FILE
from storage.items import AnswerRecord
from storage.store import Store


@pytest.fixture
def labelled(tmp_path):
    """Two annotators, three prompts, items sampled by v0 and v1: a ranking with a tie and an answer cut off by
    max_new_tokens, two full rankings of four, and a thumbs up and down."""
    data_dir = tmp_path / "data"
    with Store.open(data_dir) as store:
        alice = store.users.add("alice", "annotator", "alice-password")[0].user_id
        bob = store.users.add("bob", "annotator", "bob-password")[0].user_id
        prompts = store.prompts.add(["First?", "Second?", "Third?"]).prompt_ids

        def item(prompt_id, version, cut=False):
            answers = [AnswerRecord(f"answer {j} to {prompt_id}", 3, "length" if cut and j == 3 else "eos", -1.0)
                       for j in range(4)]
            added = store.items.add(prompt_id, version, {"k": 4}, answers)
            return added.item_id, [a.answer_id for a in added.answers]

        item_id, a = item(prompts[0], 0, cut=True)
        store.labels.add_ranking(item_id, alice, [a[0], a[1], [a[2], a[3]]])  # 5 pairs (none from the tie), 2 cut
        item_id, b = item(prompts[1], 1)
        store.labels.add_ranking(item_id, bob, b, feedback={b[0]: "up", b[3]: "down"})  # 6 pairs, 2 thumbs
        item_id, c = item(prompts[2], 1)
        store.labels.add_ranking(item_id, alice, c)  # 6 pairs
    return data_dir


def card(directory) -> tuple[dict, dict[str, str]]:
    """The card's YAML front matter, and its first table as {row name: value}."""
    text = (directory / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    table = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("", "column", "---"):
            table.setdefault(cells[0], cells[1])
    return yaml.safe_load(front), table


# format -> (rows, the card's counts): counted by hand from the fixture's labels
EXPECTED = {
    "dpo": (17, {"rows": "17", "rankings": "3", "annotators": "2", "distinct prompts": "3",
                 "rows by the version that sampled their answers (v0 = the base model)": "v0: 5, v1: 12",
                 "rows with an answer cut off by `max_new_tokens`": "2 (finish reason `length`)"}),
    "kto": (2, {"rows": "2", "thumbs up / down": "1 / 1", "annotators": "1", "distinct prompts": "1",
                "rows by the version that sampled their answers (v0 = the base model)": "v1: 2",
                "rows with an answer cut off by `max_new_tokens`": "0 (finish reason `length`)"}),
    "rankings": (3, {"rows": "3", "rankings": "3", "annotators": "2", "distinct prompts": "3",
                     "rankings with answers marked equally good": "1",
                     "rows by the version that sampled their answers (v0 = the base model)": "v0: 1, v1: 2",
                     "rows with an answer cut off by `max_new_tokens`": "1 (finish reason `length`)"}),
}


@pytest.mark.parametrize("fmt", ["dpo", "kto", "rankings"])
def test_the_dataset_directory_loads_with_datasets_and_its_card_counts_it(labelled, tmp_path, capsys, fmt):
    out, jsonl = tmp_path / "hub" / fmt, tmp_path / f"{fmt}.jsonl"
    assert main(["export", "--format", fmt, "--dataset", str(out), "--data-dir", str(labelled)]) == EXIT_OK
    assert f"wrote {EXPECTED[fmt][0]} {fmt} rows to {out / DATA_FILE}" in capsys.readouterr().out
    assert main(["export", "--format", fmt, "--out", str(jsonl), "--data-dir", str(labelled)]) == EXIT_OK
    assert (out / DATA_FILE).read_bytes() == jsonl.read_bytes()  # the same rows as the plain export

    rows = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert rows.to_list() == [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == EXPECTED[fmt][0]
    if fmt == "dpo":  # TRL's conversational columns survive the round trip
        assert rows[0]["prompt"] == [{"role": "user", "content": "First?"}]
        assert rows[0]["chosen"][0]["role"] == "assistant"

    front, table = card(out)
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILE}]}]
    assert front["size_categories"] == ["n<1K"] and "prefloop" in front["tags"]
    assert {k: table[k] for k in EXPECTED[fmt][1]} == EXPECTED[fmt][1]
    assert sorted(p.name for p in out.parent.iterdir()) == [fmt]  # no temporary directory left beside it


def test_drop_truncated_says_so_in_the_card(labelled, tmp_path):
    out = tmp_path / "dpo"
    assert main(["export", "--format", "dpo", "--drop-truncated", "--plain", "--dataset", str(out),
                 "--data-dir", str(labelled)]) == EXIT_OK
    _, table = card(out)
    assert table["rows"] == "15"
    assert table["rows with an answer cut off by `max_new_tokens`"] == "left out (`--drop-truncated`)"
    text = (out / "README.md").read_text()
    assert "--format dpo --plain --drop-truncated" in text and ".filter(" not in text
    assert json.loads((out / DATA_FILE).read_text().splitlines()[0])["prompt"] == "First?"


def test_a_dataset_with_no_rows_or_a_taken_directory_writes_nothing(tmp_path, capsys):
    data_dir = tmp_path / "data"
    Store.open(data_dir).close()
    out = tmp_path / "kto"
    assert main(["export", "--format", "kto", "--dataset", str(out), "--data-dir", str(data_dir)]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "no kto rows to export yet" in err and "thumbs" in err and "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # neither the directory nor a temporary one

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--format", "kto", "--dataset", str(out), "--data-dir", str(data_dir)]) == EXIT_BAD_INPUT
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    with pytest.raises(SystemExit) as exited:  # one destination: a file or a dataset directory
        main(["export", "--format", "kto", "--dataset", str(out), "--out", "-", "--data-dir", str(data_dir)])
    assert exited.value.code == 2
