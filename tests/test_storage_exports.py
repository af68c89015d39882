"""Exports (DPO / KTO / rankings JSONL) and training snapshots (Parquet + meta.json, appearing whole or not at all)."""

import json

import pyarrow.parquet as pq
import pytest

from storage.errors import Conflict, InvalidValue
from storage.exports import export_jsonl, iter_export, write_snapshot
from storage.items import AnswerRecord
from storage.store import Store

PAIRS_COLUMNS = [
    "ranking_id", "item_id", "annotator", "annotator_id", "policy_version", "prompt_id", "prompt", "chosen_answer_id",
    "chosen", "rejected_answer_id", "rejected", "chosen_rank", "rejected_rank", "created_at",
]
UNARY_COLUMNS = [
    "feedback_id", "answer_id", "item_id", "annotator", "policy_version", "prompt", "completion", "label", "created_at",
]


@pytest.fixture
def store(tmp_path):
    """Two items: v0 ranked by alice (K=3) with thumbs, v2 ranked by bob (K=4, "new 1" cut off by max_new_tokens);
    and bob's thumbs-down on "new 0" on its own."""
    with Store.open(tmp_path / "data") as store:
        alice, _, _ = store.users.add("alice", "annotator")
        bob, _, _ = store.users.add("bob", "annotator")
        p0, p1, _ = store.prompts.add(["Old prompt?", "New prompt?", "Unused prompt?"]).prompt_ids
        old = store.items.add(p0, 0, {}, [AnswerRecord(f"old {k}", 2, "eos", -1.0) for k in range(3)])
        new = store.items.add(p1, 2, {}, [AnswerRecord(f"new {k}", 2, "length" if k == 1 else "eos", -1.0)
                                          for k in range(4)])
        a = [x.answer_id for x in old.answers]
        store.labels.add_ranking(old.item_id, alice.user_id, [a[1], a[0], a[2]], seconds=4.0, feedback={a[1]: "up"})
        b = [x.answer_id for x in new.answers]
        store.labels.add_ranking(new.item_id, bob.user_id, b[::-1])
        store.labels.add_feedback(b[0], bob.user_id, "down")
        store.test_users = {"alice": alice.user_id, "bob": bob.user_id}
        yield store


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_dpo_rows_are_conversational_with_provenance(store, tmp_path):
    alice, bob = store.test_users["alice"], store.test_users["bob"]
    dpo = list(iter_export(store, "dpo"))
    assert len(dpo) == 3 + 6
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in dpo[:4]] == [
        (user("Old prompt?"), assistant("old 1"), assistant("old 0")),
        (user("Old prompt?"), assistant("old 1"), assistant("old 2")),
        (user("Old prompt?"), assistant("old 0"), assistant("old 2")),
        (user("New prompt?"), assistant("new 3"), assistant("new 2")),
    ]
    first = dpo[0]
    assert (first["policy_version"], first["annotator_id"], first["item_id"]) == (0, alice, dpo[1]["item_id"])
    assert (first["chosen_finish_reason"], first["rejected_finish_reason"]) == ("eos", "eos")
    assert {r["annotator_id"] for r in dpo[3:]} == {bob} and {r["policy_version"] for r in dpo[3:]} == {2}
    cut = [r for r in dpo if "length" in (r["chosen_finish_reason"], r["rejected_finish_reason"])]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in cut] == [
        ("new 3", "new 1"), ("new 2", "new 1"), ("new 1", "new 0")]
    assert all("alice" not in json.dumps(r) and "bob" not in json.dumps(r) for r in dpo)  # ids, never names
    out = tmp_path / "dpo.jsonl"
    assert export_jsonl(store, "dpo", out) == 9
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == dpo
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_kto_rows_are_conversational_with_provenance(store):
    alice, bob = store.test_users["alice"], store.test_users["bob"]
    kto = list(iter_export(store, "kto"))
    assert [(r["prompt"], r["completion"], r["label"], r["finish_reason"], r["policy_version"], r["annotator_id"])
            for r in kto] == [
        (user("Old prompt?"), assistant("old 1"), True, "eos", 0, alice),
        (user("New prompt?"), assistant("new 0"), False, "eos", 2, bob),
    ]


def test_plain_style_writes_strings(store):
    dpo = list(iter_export(store, "dpo", style="plain"))
    assert {k: dpo[0][k] for k in ("prompt", "chosen", "rejected")} == {
        "prompt": "Old prompt?", "chosen": "old 1", "rejected": "old 0"}
    assert dpo[0]["chosen_finish_reason"] == "eos" and "annotator_id" in dpo[0]
    kto = list(iter_export(store, "kto", style="plain"))
    assert [(r["prompt"], r["completion"], r["label"]) for r in kto] == [
        ("Old prompt?", "old 1", True), ("New prompt?", "new 0", False)]


def test_drop_truncated_leaves_out_rows_with_a_cut_off_answer(store):
    kept = list(iter_export(store, "dpo", drop_truncated=True))
    assert len(kept) == 3 + 3
    assert all(r["chosen_finish_reason"] == r["rejected_finish_reason"] == "eos" for r in kept)
    assert "new 1" not in json.dumps(kept)
    assert len(list(iter_export(store, "kto", drop_truncated=True))) == 2  # no thumb on the cut-off answer
    (only,) = iter_export(store, "rankings", drop_truncated=True)
    assert only["answers"] == ["old 1", "old 0", "old 2"]


def test_prompts_render_as_prefloop_sampled_them(store, smollm2_tokenizer_dir):
    """What TRL's DPOTrainer does with a conversational row (trl/trainer/dpo_trainer.py, tokenize_fn): the prompt
    with the generation prompt, then prompt + chosen through the template. The prompt it trains on must be the one
    prefloop sampled with (learner.sampling.encode_prompt), and the answer must follow it unchanged."""
    from transformers import AutoTokenizer

    from learner.sampling import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    row = next(iter_export(store, "dpo"))
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == encode_prompt(tokenizer, "Old prompt?")
    assert full.startswith(prompt) and full[len(prompt):].startswith("old 1")


def test_rows_pass_trls_own_checks(store, smollm2_tokenizer_dir):
    data_utils = pytest.importorskip("trl.data_utils", reason="trl is a bench-only extra")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    for fmt, answer_key in (("dpo", "chosen"), ("kto", "completion")):
        row = next(iter_export(store, fmt))
        assert data_utils.is_conversational(row)
        templated = data_utils.maybe_apply_chat_template(row, tokenizer)
        assert templated["prompt"] == tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                    tokenize=False)
        assert templated[answer_key].startswith("old 1")
        assert not data_utils.is_conversational(next(iter_export(store, fmt, style="plain")))


def test_rankings_export(store):
    first, second = iter_export(store, "rankings")
    assert first["annotator_id"] == store.test_users["alice"] and first["policy_version"] == 0
    assert first["seconds"] == 4.0 and "annotator" not in first
    assert first["answers"] == ["old 1", "old 0", "old 2"] and first["finish_reasons"] == ["eos"] * 3
    assert len(first["answer_ids"]) == 3
    assert first["created_at"].endswith("+00:00")
    assert second["answers"] == ["new 3", "new 2", "new 1", "new 0"] and second["seconds"] is None
    assert second["finish_reasons"] == ["eos", "eos", "length", "eos"]
    json.dumps(first)  # JSON-serialisable as is


def test_unknown_format_or_style_writes_no_file(store, tmp_path):
    with pytest.raises(InvalidValue, match="unknown export format 'sft', expected one of dpo, kto, rankings"):
        export_jsonl(store, "sft", tmp_path / "out.jsonl")
    with pytest.raises(InvalidValue, match="unknown export style 'chatml', expected one of conversational, plain"):
        export_jsonl(store, "dpo", tmp_path / "out.jsonl", style="chatml")
    assert not (tmp_path / "out.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_snapshot_parquet_files_read_back(store, tmp_path):
    out = tmp_path / "snapshots" / "round-1"
    meta = write_snapshot(store, out, parent_version=2, base_model="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "pairs.parquet", "prompts.parquet", "unary.parquet"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["counts"] == {"pairs": 9, "unary": 2, "prompts": 3}
    assert (meta["parent_version"], meta["base_model"]) == (2, "tiny")
    pairs = pq.read_table(out / "pairs.parquet")
    # The learner's extras (write_snapshot): finish reasons and each label's lineage staleness.
    assert pairs.column_names == [*PAIRS_COLUMNS, "chosen_finish_reason", "rejected_finish_reason", "staleness"]
    assert pairs.num_rows == 9
    assert pairs.column("chosen").to_pylist()[0] == "old 1"
    unary = pq.read_table(out / "unary.parquet")
    assert unary.column_names == [*UNARY_COLUMNS, "finish_reason", "staleness"]
    assert unary.column("label").to_pylist() == [True, False]
    prompts = pq.read_table(out / "prompts.parquet")
    assert prompts.column_names == ["prompt_id", "prompt"] and prompts.num_rows == 3
    assert not [p for p in out.parent.iterdir() if p.name != "round-1"]  # the temp dir was renamed, not copied


def test_snapshot_with_max_label_staleness_drops_old_labels(store, tmp_path):
    # Version 2 is not in the registry here, so version 0's labels have no known lineage: too stale.
    meta = write_snapshot(store, tmp_path / "snap", parent_version=2, base_model="tiny", max_label_staleness=1)
    assert meta["counts"] == {"pairs": 6, "unary": 1, "prompts": 3}
    assert set(pq.read_table(tmp_path / "snap" / "pairs.parquet").column("policy_version").to_pylist()) == {2}


def test_snapshot_refuses_a_non_empty_directory(store, tmp_path):
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Conflict, match="already exists and is not empty"):
        write_snapshot(store, out, parent_version=0, base_model="tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
