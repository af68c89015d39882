"""How a round and the policy worker share a CPU (app/cores.py's CoreShare): the round gets every core while
the worker idles and the others while it generates, through a file the round reads at each step."""

from __future__ import annotations

import pytest
import torch

from app.cores import CoreShare
from app.generation.worker import WorkerBackend
from app.policy import PolicyService
from learner.config import RoundConfig
from learner.round import follow_threads
from learner.sampling import SamplingParams

CPUS = 4  # any machine: the rule is arithmetic on this count, not on the cores the test runs on
LONG = SamplingParams(max_new_tokens=64, temperature=1.0)


@pytest.fixture
def policy(tiny_model_dir):
    service = PolicyService(WorkerBackend(tiny_model_dir, device="cpu", threads=1), tiny_model_dir, "cpu")
    yield service
    service.close()


def test_the_round_gets_every_core_while_the_worker_idles_and_the_rest_while_it_generates(policy, tmp_path):
    share = CoreShare(policy, cpus=CPUS)
    assert share.applies
    threads = tmp_path / "threads"
    env = share.before_round(threads)
    assert env == {"OMP_NUM_THREADS": "4"} and threads.read_text() == "4"  # nothing generating yet
    answer = policy.stream("hi", LONG, version=0, seed=0)
    next(answer)  # an answer is being generated now
    assert policy.generating and threads.read_text() == "3"
    list(answer)
    assert not policy.generating and threads.read_text() == "4"
    share.after_round()
    threads.unlink()
    list(policy.stream("hi", LONG, version=0, seed=0))
    assert not threads.exists()  # no round, no file: the policy service tells nobody any more


def test_overlapping_generations_leave_the_share_of_the_last_one_standing(policy, tmp_path):
    share = CoreShare(policy, cpus=CPUS)
    threads = tmp_path / "threads"
    share.before_round(threads)
    first, second = (policy.stream("hi", LONG, version=0, seed=s) for s in (0, 1))
    next(first)
    next(second)
    list(first)  # one ended, one still generating: the worker is busy
    assert threads.read_text() == "3"
    list(second)
    assert threads.read_text() == "4"
    share.after_round()


def test_the_round_follows_the_file_and_ignores_a_bad_one(tmp_path):
    before = torch.get_num_threads()
    path = tmp_path / "threads"
    try:
        path.write_text("3\n")
        assert follow_threads(path) == 3 == torch.get_num_threads()
        path.write_text("two")
        assert follow_threads(path) == 3  # unreadable: unchanged
        path.write_text("0")
        assert follow_threads(path) == 3  # not a thread count: unchanged
        path.unlink()
        assert follow_threads(path) == 3  # gone: unchanged
        path.write_text("1")
        assert follow_threads(path) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_a_round_started_by_the_server_follows_the_share_of_the_worker(serve_config, tiny_model_dir):
    """The whole path on the real parts: a server context whose model lives in the worker process, a round started by
    its scheduler (a subprocess given --threads-file), the file left in the run's directory."""
    from dataclasses import replace

    from app.server import open_context
    from storage.items import AnswerRecord

    ctx = open_context(replace(serve_config, backend="worker"))
    try:
        assert ctx.scheduler.cores.applies
        user = ctx.store.users.add("ann", "annotator", "ann-password")[0].user_id
        for prompt in ctx.store.prompts.least_sampled(4):
            _, answers = ctx.policy.sample(prompt.text, ctx.config.k, ctx.config.sampling, 0, seed=0)
            item = ctx.store.items.add(prompt.prompt_id, 0, {"k": ctx.config.k},
                                       [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum)
                                        for a in answers])
            ids = [a.answer_id for a in ctx.store.items.get(item.item_id).answers]
            ctx.store.labels.add_ranking(item.item_id, user, ids, seconds=1.0)
        run_id = ctx.scheduler.start(RoundConfig.from_dict({
            "steps": 2, "batch_size": 2, "reward_steps": 2, "rollout_prompts": 2, "rollout_n": 2, "eval_prompts": 2,
            "eval_n": 2, "max_new_tokens": 8}))
        status = ctx.scheduler.wait(run_id)
        assert status in ("succeeded", "rejected"), ctx.store.runs.get(run_id).error
        threads = serve_config.data_dir / "runs" / f"run-{run_id}" / "threads"
        assert threads.read_text() == str(ctx.scheduler.cores.cpus)  # the worker idled when the round ended
    finally:
        ctx.stop()
        ctx.store.close()


class FailingBuffer:
    """The buffer's interface as CoreShare uses it, with a top-up whose sampling fails (a model error, a store that
    refuses an answer: what a byte-0 token did before learner.sampling.shown_text)."""

    def __init__(self):
        self.calls = 0

    def top_up(self, seconds: float, stop=lambda: False) -> int:
        self.calls += 1
        raise RuntimeError("sampling failed")


def test_a_failed_top_up_does_not_stop_the_round(policy, tmp_path):
    buffer = FailingBuffer()
    share = CoreShare(policy, buffer=buffer, cpus=CPUS)
    threads = tmp_path / "threads"
    assert share.before_round(threads) == {"OMP_NUM_THREADS": "4"}  # the round gets its cores and its file
    assert buffer.calls == 1 and threads.read_text() == "4"
    share.after_round()


def test_a_top_up_cut_short_by_the_round_being_cancelled_logs_no_traceback_and_restarts_no_worker(
        policy, tmp_path, caplog):
    """SIGTERM to `make run`'s process group right after POST /api/train: the worker, given SIGTERM_GRACE_S, died
    under the round's top-up batch (~20 s on a loaded CPU), the top-up's failure was logged with a traceback, and
    setting the round's threads restarted the worker (a model load) in the middle of the shutdown. Now a cancelled
    round's top-up failure is one line, and a worker that is not running is not started to be told its threads."""
    import logging
    import os
    import signal

    buffer = FailingBuffer()
    share = CoreShare(policy, buffer=buffer, cpus=CPUS)
    pid = policy.backend.pid
    os.kill(pid, signal.SIGKILL)  # gone, as under the alarm
    policy.backend._process.join(10)
    with caplog.at_level(logging.INFO, logger="app.cores"):
        share.before_round(tmp_path / "threads", cancelled=lambda: True)
        share.after_round()
    assert buffer.calls == 1
    said = [r for r in caplog.records if r.name == "app.cores"]
    assert [r.levelno for r in said] == [logging.INFO] and "cancelled" in said[0].getMessage(), said
    assert not any(r.exc_info for r in caplog.records)
    assert policy.backend.pid == pid and not policy.backend._process.is_alive()  # not restarted
    assert "restarting" not in caplog.text
    # Not cancelled: the same failure is an error with its traceback (a real fault), and the round still runs.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.cores"):
        share.before_round(tmp_path / "threads")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    share.after_round()
    # The next call that needs the worker starts one, with the threads last set.
    assert len(policy.sample("hi", 2, LONG, 0, seed=0)[1]) == 2
    assert policy.backend.pid != pid and policy.backend._threads == CPUS
