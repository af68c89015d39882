"""Prompt files: JSONL, CSV and Parquet, good and bad; every problem named by file and line; bad files write nothing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import PromptFileError
from storage.imports import import_prompt_file, read_prompt_file
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "data") as store:
        yield store


def jsonl(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def problems_of(path, **kwargs):
    with pytest.raises(PromptFileError) as caught:
        read_prompt_file(path, **kwargs)
    return [str(p) for p in caught.value.problems], str(caught.value)


def test_good_jsonl_with_duplicates(store, tmp_path):
    path = jsonl(tmp_path / "prompts.jsonl", '{"prompt": "What is 2 + 2?"}', "", '{"prompt": " Why? ", "id": 3}',
                 '{"prompt": "What is 2 + 2?"}')
    assert read_prompt_file(path).prompts == ["What is 2 + 2?", "Why?", "What is 2 + 2?"]
    result = import_prompt_file(store, path)
    assert (result.added, result.duplicates, result.invalid, result.problems) == (2, 1, 0, [])
    assert store.prompts.get(1).source == "file:prompts.jsonl"


def test_bad_jsonl_names_each_line_and_writes_nothing(store, tmp_path):
    path = jsonl(
        tmp_path / "prompts.jsonl",
        '{"prompt": "good one"}',
        '{"prompt": ""}',
        '{"prompt": "unterminated',
        '{"text": "no prompt key"}',
        '{"prompt": 5}',
        json.dumps({"prompt": "x" * 1_048_576}),
        '{"prompt": "another good one"}',
    )
    problems, message = problems_of(path)
    assert problems == [
        "prompts.jsonl line 2: empty prompt",
        "prompts.jsonl line 3: invalid JSON at column 12: Unterminated string starting at",
        'prompts.jsonl line 4: expected an object with a "prompt" key',
        "prompts.jsonl line 5: prompt is not a string (got int)",
        "prompts.jsonl line 6: prompt is 1048576 characters, the limit is 20000",
    ]
    assert message.startswith("prompts.jsonl line 2: empty prompt; prompts.jsonl line 3: invalid JSON at column 12")
    with pytest.raises(PromptFileError):
        import_prompt_file(store, path)
    assert store.prompts.count() == 0


def test_skip_invalid_imports_the_good_rows(store, tmp_path):
    path = jsonl(tmp_path / "p.jsonl", '{"prompt": "good one"}', '{"prompt": "  "}', '{"prompt": "good two"}',
                 '{"prompt": "good one"}')
    result = import_prompt_file(store, path, skip_invalid=True)
    assert (result.added, result.duplicates, result.invalid) == (2, 1, 1)
    assert [str(p) for p in result.problems] == ["p.jsonl line 2: empty prompt"]
    assert store.prompts.count() == 2


def test_bad_utf8_is_reported_with_line_and_byte_offset(store, tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n{"prompt": "also fine"}\n')
    problems, _ = problems_of(path)
    assert problems == ["latin.jsonl line 2: not valid UTF-8 (byte offset 34 of the file)"]
    result = import_prompt_file(store, path, skip_invalid=True)
    assert (result.added, result.invalid) == (2, 1)


def test_many_problems_are_summarised(tmp_path):
    path = jsonl(tmp_path / "many.jsonl", *['{"prompt": ""}'] * 12)
    problems, message = problems_of(path)
    assert len(problems) == 12
    assert message.endswith("... and 7 more problems")


def test_good_csv(store, tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('id,prompt\n1,What is 3 + 4?\n2,"A prompt, with a comma\nand a newline"\n3,What is 3 + 4?\n',
                    encoding="utf-8")
    assert read_prompt_file(path).prompts == ["What is 3 + 4?", "A prompt, with a comma\nand a newline",
                                              "What is 3 + 4?"]
    result = import_prompt_file(store, path)
    assert (result.added, result.duplicates) == (2, 1)


def test_bad_csv_rows_name_their_lines(store, tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_bytes(
        b'prompt,note\nfine,\n"two\nlines",x\n  ,empty\n' + b"caf\xe9,latin-1\n" + b'"' + b"y" * 20_001 + b'",long\n'
    )
    problems, _ = problems_of(path)
    assert problems == [
        "prompts.csv line 5: empty prompt",
        "prompts.csv line 6: not valid UTF-8 (byte offset 44 of the file)",
        "prompts.csv line 7: prompt is 20001 characters, the limit is 20000",
    ]
    with pytest.raises(PromptFileError):
        import_prompt_file(store, path)
    assert store.prompts.count() == 0


def test_csv_without_a_prompt_column_fails_even_with_skip_invalid(store, tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("question,answer\nWhat?,That\n", encoding="utf-8")
    _, message = problems_of(path, skip_invalid=True)
    assert message == 'prompts.csv: no "prompt" column (columns: question, answer)'
    assert store.prompts.count() == 0


def test_parquet_good_and_bad(store, tmp_path):
    good = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["one?", "two?", "one?"], "n": [1, 2, 3]}), good)
    result = import_prompt_file(store, good)
    assert (result.added, result.duplicates) == (2, 1)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["fine", None, "", "z" * 20_001]}), bad)
    problems, _ = problems_of(bad)
    assert problems == [
        "bad.parquet row 2: prompt is null",
        "bad.parquet row 3: empty prompt",
        "bad.parquet row 4: prompt is 20001 characters, the limit is 20000",
    ]

    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"text": ["a"]}), no_column)
    assert problems_of(no_column)[0] == ['nocol.parquet: no "prompt" column (columns: text)']

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), numbers)
    assert problems_of(numbers)[0] == ['numbers.parquet: the "prompt" column holds int64, expected strings']

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    assert problems_of(corrupt)[0][0].startswith("corrupt.parquet: not a readable Parquet file")
    assert store.prompts.count() == 2


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What?\n")
    _, message = problems_of(path)
    assert message == "prompts.txt: unknown file type '.txt', expected one of .jsonl, .json, .csv, .parquet"
    _, message = problems_of(tmp_path / "missing.jsonl")
    assert message == "missing.jsonl: cannot read the file (No such file or directory)"


def test_json_array_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a?"}, "b?", {"q": 1}]), encoding="utf-8")
    assert problems_of(path)[0] == ['prompts.json item 3: expected an object with a "prompt" key']
    assert read_prompt_file(path, skip_invalid=True).prompts == ["a?", "b?"]
