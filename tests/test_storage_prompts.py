"""Prompts: validation, duplicates, the bulk path, the sampler's choice, and the starter set."""

import time

import pytest

from storage.errors import InvalidValue, NotFound
from storage.items import AnswerRecord
from storage.prompts import MAX_PROMPT_CHARS, validate_prompt
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def test_validate_prompt_messages():
    assert validate_prompt("  What is 2 + 2?\n") == "What is 2 + 2?"
    cases = {
        "   ": "empty prompt",
        "x" * 1_048_576: "prompt is 1048576 characters, the limit is 20000",
        "a\0b": "prompt contains a NUL character",
        42: "prompt is not a string",
    }
    for text, message in cases.items():
        with pytest.raises(InvalidValue, match=message):
            validate_prompt(text)
    assert validate_prompt("y" * MAX_PROMPT_CHARS)


def test_add_counts_duplicates_in_the_list_and_in_the_table(store):
    first = store.prompts.add(["What is 1 + 1?", "Name a colour."])
    assert (first.added, first.duplicates) == (2, 0)
    second = store.prompts.add(["  What is 1 + 1?  ", "New one", "New one"], source="admin")
    assert (second.added, second.duplicates) == (1, 2)
    # One id per text given: the stored duplicate's id where the text was already there.
    assert second.prompt_ids[0] == first.prompt_ids[0]
    assert second.prompt_ids[1] == second.prompt_ids[2]
    assert store.prompts.get(second.prompt_ids[1]).source == "admin"
    assert store.prompts.count() == 3


def test_one_invalid_prompt_writes_nothing(store):
    with pytest.raises(InvalidValue, match="prompt 2: empty prompt"):
        store.prompts.add(["fine", "also fine", "  "])
    with pytest.raises(InvalidValue, match="prompt 0: prompt is 20001 characters"):
        store.prompts.add(["z" * 20_001])
    assert store.prompts.count() == 0


def test_get_unknown_prompt(store):
    with pytest.raises(NotFound, match="no prompt with id 7"):
        store.prompts.get(7)


def test_ten_thousand_prompts_import_quickly(store):
    start = time.perf_counter()
    result = store.prompts.add([f"Prompt number {i}?" for i in range(10_000)])
    assert result.added == 10_000
    assert time.perf_counter() - start < 3
    again = store.prompts.add([f"Prompt number {i}?" for i in range(9_990, 10_010)])
    assert (again.added, again.duplicates) == (10, 10)


def test_least_sampled_prefers_prompts_without_items(store):
    ids = store.prompts.add(["a?", "b?", "c?"]).prompt_ids
    answers = [AnswerRecord("x", 1, "eos", -0.1)]
    store.items.add(ids[0], 0, {}, answers)
    store.items.add(ids[1], 0, {}, answers)
    store.items.add(ids[1], 0, {}, answers)
    assert [p.prompt_id for p in store.prompts.least_sampled(1)] == [ids[2]]
    assert [p.prompt_id for p in store.prompts.least_sampled(3)] == [ids[2], ids[0], ids[1]]


def test_starter_prompts_seed_an_empty_store_once(store):
    added = store.seed_starter_prompts()
    assert 50 <= added <= 80
    cur = store.db.cursor()
    arithmetic = cur.execute("SELECT count(*) FROM prompts WHERE regexp_matches(text, '\\d+ [-+*/] \\d+')")
    assert arithmetic.fetchone()[0] >= added // 4
    assert store.seed_starter_prompts() == 0
    assert store.prompts.count() == added
