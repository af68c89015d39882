"""`--precision` (PREFLOOP_PRECISION) reaches both halves of the loop: the server's policy and the rounds it starts
(their own process, told through the environment). A round started by a server run with `--precision fp32` on a CPU
with native bf16 would otherwise train in bf16 autocast while the flag said fp32."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_train_api import QUICK, label_items, wait_run

COMPUTES = {"fp32": "float32", "bf16": "float32 weights, bfloat16 autocast"}


@pytest.fixture(params=sorted(COMPUTES))
def serve_config(serve_config, request):
    return replace(serve_config, precision=request.param)


def test_the_policy_and_its_rounds_compute_in_the_servers_precision(ctx, server, boss, sample_items, serve_config):
    assert ctx.policy.backend.device.precision == COMPUTES[serve_config.precision]
    label_items(ctx, sample_items, 6)
    run = wait_run(boss, boss.post("/api/train", json={"algorithm": "dpo", **QUICK}).json()["run_id"])
    assert run["status"] == "succeeded", run
    assert run["metrics"]["precision"] == COMPUTES[serve_config.precision]
