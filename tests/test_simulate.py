"""Personas and the simulated annotators, run against a real server through its public REST API."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from app.cli import main
from app.personas import (
    PERSONAS,
    arithmetic_answer,
    arithmetic_prompts,
    get_persona,
    rank,
)
from storage.items import AnswerRecord


def test_each_persona_prefers_what_it_says():
    concise, structured, arithmetic = (PERSONAS[n] for n in ("concise", "structured", "arithmetic"))
    short, long = "Paris.", "The capital of France is, as many people know, the city of Paris. " * 3
    assert concise.score("Capital of France?", short) > concise.score("Capital of France?", long)
    assert concise.score("q", "") < concise.score("q", long)  # an empty answer is no answer
    thumbs = (concise.thumbs("q", short), concise.thumbs("q", long * 3), concise.thumbs("q", ""))
    assert thumbs == ("up", "down", "down")

    listed = "Tips:\n1. Sleep early.\n2. No screens.\n- Keep it dark."
    prose = "Sleep early, avoid screens, keep the room dark. 1 tip: be regular."
    assert structured.score("Tips?", listed) == 3 and structured.score("Tips?", prose) == 0
    assert (structured.thumbs("Tips?", listed), structured.thumbs("Tips?", prose)) == ("up", "down")

    q = "What is 17 + 25?"
    assert arithmetic_answer(q) == 42 and arithmetic_answer("What is 6 x 7?") == 42
    assert arithmetic_answer("Tell me a joke.") is None
    scores = {a: arithmetic.score(q, a) for a in ("42", "It is 43, no wait, 42.", "17 + 25 = 142", "I don't know")}
    assert scores["42"] > scores["It is 43, no wait, 42."] > scores["17 + 25 = 142"] == scores["I don't know"] == 0
    assert (arithmetic.thumbs(q, "42."), arithmetic.thumbs(q, "41"), arithmetic.thumbs("Hi!", "42")) == \
        ("up", "down", None)


def test_rank_sorts_by_score_breaks_ties_at_random_and_adds_noise():
    persona = PERSONAS["concise"]
    answers = [(10, "a b c"), (11, "a"), (12, "a b"), (13, "a b c d")]
    assert rank(persona, "q", answers, random.Random(0)) == [11, 12, 10, 13]
    # noise=1 swaps every adjacent pair in one pass from the top: the best answer sinks to last
    assert rank(persona, "q", answers, random.Random(0), noise=1.0) == [12, 10, 13, 11]
    tied = [(1, "x"), (2, "y"), (3, "z"), (4, "w")]
    orders = {tuple(rank(persona, "q", tied, random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1  # ties are not broken by position
    noisy = [rank(persona, "q", answers, random.Random(seed), noise=0.3)[0] == 11 for seed in range(200)]
    assert 0.5 < sum(noisy) / len(noisy) < 0.9  # the best stays first unless its pair swaps (p=0.3)
    with pytest.raises(ValueError, match="noise must be in"):
        rank(persona, "q", answers, random.Random(0), noise=1.5)


def test_rank_with_ties_groups_equal_scores_and_noise_moves_whole_ties():
    persona = PERSONAS["structured"]
    answers = [(10, "plain"), (11, "- a\n- b"), (12, "also plain"), (13, "1. x\n2. y\n3. z")]
    for seed in range(10):  # the order inside a tie is random, the tie itself is not
        ranking = rank(persona, "q", answers, random.Random(seed), ties=True)
        assert ranking[:2] == [13, 11] and sorted(ranking[2]) == [10, 12]
    alike = [(1, "x"), (2, "y"), (3, "z")]
    assert sorted(rank(persona, "q", alike, random.Random(0), ties=True)[0]) == [1, 2, 3]  # no preference
    assert len(rank(persona, "q", alike, random.Random(0), ties=True)) == 1
    assert len(rank(persona, "q", alike, random.Random(0))) == 3  # without ties: a made-up order
    swapped = rank(persona, "q", answers, random.Random(0), noise=1.0, ties=True)
    assert swapped[0] == 11 and sorted(swapped[1]) == [10, 12] and swapped[2] == 13  # the tie moved up as one


def test_arithmetic_prompts_are_reproducible_distinct_and_understood():
    prompts = arithmetic_prompts(40, seed=3)
    assert prompts == arithmetic_prompts(40, seed=3) != arithmetic_prompts(40, seed=4)
    assert len(set(prompts)) == 40
    assert all(arithmetic_answer(p) is not None for p in prompts)


def test_plug_in_personas_by_module_path():
    plug = get_persona("app.personas:concise_score")
    assert plug.score("q", "a") > plug.score("q", "a b") and plug.thumbs("q", "a") is None
    for bad in ("nobody", "app.personas:nothing_here", "no_such_module:x", "app.personas:PERSONAS"):
        with pytest.raises(ValueError):
            get_persona(bad)


def arithmetic_items(ctx, n: int) -> dict[int, int]:
    """n items for arithmetic prompts, one right answer and three wrong ones each; item_id -> right result."""
    added = ctx.store.prompts.add(arithmetic_prompts(n, seed=1), source="test")
    right = {}
    for prompt_id, text in zip(added.prompt_ids, arithmetic_prompts(n, seed=1)):
        result = arithmetic_answer(text)
        texts = [f"The answer is {result}.", f"It is {result + 1}.", f"{result - 10}", "I am not sure."]
        item = ctx.store.items.add(prompt_id, 0, {"k": 4}, [AnswerRecord(t, 5, "eos", -2.0) for t in texts])
        right[item.item_id] = result
    return right


def rankings(ctx) -> list[tuple[int, int, str, str]]:
    """(ranking_id, item_id, annotator, best answer's text) of every stored ranking."""
    return ctx.store.db.cursor().execute("""
        SELECT r.ranking_id, r.item_id, u.name, a.text FROM rankings r JOIN users u USING (user_id)
        JOIN ranking_answers ra ON ra.ranking_id = r.ranking_id AND ra.rank = 0
        JOIN answers a ON a.answer_id = ra.answer_id ORDER BY r.ranking_id""").fetchall()


def test_simulate_creates_annotators_and_ranks_by_persona(ctx, server, accounts, tmp_path, capsys):
    right = arithmetic_items(ctx, 8)
    log = tmp_path / "acked.jsonl"
    code = main(["simulate", "--url", server.url, f"--token={accounts['boss'][1]}", "--persona", "arithmetic",
                 "--annotators", "3", "--labels", "6", "--feedback", "--every", "0.5", "--log", str(log)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "created 3 annotator accounts: sim-arithmetic-0 .. sim-arithmetic-2" in out
    assert "done: 6 rankings, 24 thumbs" in out and "labels/s" in out and "0 errors" in out
    assert "arithmetic overall: approval 25%, all-tie 0%" in out  # one right answer of four, as served
    stored = rankings(ctx)
    assert len(stored) == 6
    assert {name for _, _, name, _ in stored} <= {"sim-arithmetic-0", "sim-arithmetic-1", "sim-arithmetic-2"}
    for _, item_id, _, best in stored:
        assert best == f"The answer is {right[item_id]}."  # noise 0: the right answer always ranks first
    acked = [json.loads(line)["ranking_id"] for line in log.read_text().splitlines()]
    assert sorted(acked) == [ranking_id for ranking_id, *_ in stored]
    assert ctx.store.labels.counts().feedback == 24
    # The names are taken now: a second run makes new accounts with a suffix instead of failing.
    assert main(["simulate", "--url", server.url, f"--token={accounts['boss'][1]}", "--persona", "arithmetic",
                 "--labels", "1"]) == 0
    assert "created 1 annotator accounts: sim-arithmetic-0-" in capsys.readouterr().out


def test_simulate_adds_prompts_then_polls_until_timeout_when_nothing_waits(ctx, server, accounts, capsys):
    from app.server import write_server_file

    write_server_file(ctx.config, server.url, ctx.local_token)  # as `prefloop serve` does
    before = ctx.store.prompts.count()
    # no --url, no --token: the data dir's server.json gives both (the local token is an admin)
    code = main(["simulate", "--data-dir", str(ctx.config.data_dir), "--persona", "arithmetic",
                 "--add-prompts", "5", "--labels", "2", "--timeout", "1.5", "--poll", "0.2"])
    out = capsys.readouterr().out
    assert code == 4, out  # timed out, no errors: the test server samples nothing (prefetch off)
    assert "added 5 arithmetic prompts" in out and "created 1 annotator accounts: sim-arithmetic-0" in out
    assert "timed out: 0 rankings" in out and "0 errors" in out
    assert ctx.store.prompts.count() == before + 5
    assert main(["simulate", "--url", server.url, f"--token={accounts['boss'][1]}", "--persona", "concise",
                 "--add-prompts", "5"]) == 1
    assert "no prompt generator" in capsys.readouterr().err


def test_simulate_with_a_tokens_file_and_refusals(ctx, server, accounts, sample_items, tmp_path, capsys):
    arithmetic_items(ctx, 3)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# annotators\n{accounts['ann'][1]}\n{accounts['bob'][1]}\n")
    assert main(["simulate", "--url", server.url, "--tokens", str(tokens), "--annotators", "2",
                 "--labels", "2"]) == 0
    stored = rankings(ctx)
    assert len(stored) == 2 and {name for _, _, name, _ in stored} <= {"ann", "bob"}
    capsys.readouterr()
    assert main(["simulate", "--url", server.url, f"--token={accounts['ann'][1]}", "--annotators", "2"]) == 1
    assert "needs an admin token" in capsys.readouterr().err
    assert main(["simulate", "--url", server.url, "--token=not-a-token"]) == 1
    assert "refused the token: 401" in capsys.readouterr().err
    assert main(["simulate", "--url", server.url, "--token=x", "--persona", "grumpy"]) == 1
    assert "unknown persona 'grumpy'" in capsys.readouterr().err
    assert main(["simulate", "--url", server.url, "--tokens", str(tokens), "--annotators", "3"]) == 1
    assert "needs 3 tokens" in capsys.readouterr().err


def test_simulate_counts_errors_and_exits_1(ctx, server, accounts, tmp_path, capsys):
    arithmetic_items(ctx, 2)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{accounts['ann'][1]}\nrevoked-token\n")
    # 3 labels for 2 items: the run waits (204) until its timeout, so the second annotator surely asks once
    code = main(["simulate", "--url", server.url, "--tokens", str(tokens), "--annotators", "2", "--labels", "3",
                 "--timeout", "2", "--poll", "0.2"])
    captured = capsys.readouterr()
    assert code == 1  # errors win over the timeout's exit code 4
    assert "timed out: 2 rankings" in captured.out and "1 errors" in captured.out
    assert "error: annotator 1: GET /api/items/next -> 401" in captured.err
    assert main(["simulate", "--url", "http://127.0.0.1:9", "--token=x"]) == 1  # nothing listens on port 9
    assert "cannot reach" in capsys.readouterr().err


def test_simulator_runs_as_its_own_process_without_server_internals(ctx, server, accounts):
    arithmetic_items(ctx, 2)
    script = ("import sys, app.simulate as s\n"
              "inside = sorted(m for m in sys.modules if m.split('.')[0] in ('storage', 'learner', 'torch', "
              "'fastapi', 'gradio', 'duckdb'))\n"
              "assert not inside, inside\n"
              "sys.exit(s.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "--url", server.url, f"--token={accounts['ann'][1]}",
                           "--persona", "arithmetic", "--labels", "2", "--every", "60"],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 2 rankings" in done.stdout
    assert ctx.store.labels.counts(user_id=ctx.store.users.get("ann").user_id).rankings == 2
