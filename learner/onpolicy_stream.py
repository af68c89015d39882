"""A round's on-policy examples: rollouts sampled from the policy as it trains, every `sync_every` steps, ranked
by the round's judge into pairs (best vs worst, or every pair: `rollout_pairs`); learner.phases.policy_phase draws
from the stream one step at a time."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from learner.config import RoundConfig
from learner.data import OnPolicyStream
from learner.refcache import ReferenceLogps
from learner.reward import RewardModel
from learner.rollouts import Scorer, implicit_reward_scorer, onpolicy_examples, reward_model_scorer

if TYPE_CHECKING:
    from learner.phases import RoundSetup


@dataclass
class Regenerate:
    """Sample and score on-policy examples for a step (the callable an OnPolicyStream calls)."""

    setup: RoundSetup
    config: RoundConfig
    reward_model: RewardModel
    scorer: Scorer
    prompts_per_regeneration: int
    regenerations_planned: int
    steps: int
    rng: random.Random
    regenerations: int = 0
    answers: int = 0
    dropped: int = 0
    seconds: float = 0.0  # sampling and scoring

    def __call__(self, step: int) -> list:
        s, c = self.setup, self.config
        started = time.monotonic()
        s.report("rollouts", self.regenerations, self.regenerations_planned, within=step / self.steps)
        prompts = self.rng.sample(s.rollout_prompts, min(self.prompts_per_regeneration, len(s.rollout_prompts)))
        batch = onpolicy_examples(s.model, self.reward_model, s.tokenizer, prompts, c.algorithm, c.rollout_n,
                                  c.sampling, c.max_length, seed=c.seed * 100003 + step,
                                  merge=s.device.merges_for_sampling, scorer=self.scorer,
                                  rollout_pairs=c.rollout_pairs)
        self.regenerations += 1
        self.answers += batch.answers
        self.dropped += batch.dropped_tokenization
        self.seconds += time.monotonic() - started
        s.report("rollouts", self.regenerations, self.regenerations_planned, within=step / self.steps)
        return batch.examples

    def costs(self) -> dict:
        """What the regenerations made and took, for the round's metrics."""
        return {"regenerations": self.regenerations, "answers": self.answers, "dropped_tokenization": self.dropped,
                "prompts_per_regeneration": self.prompts_per_regeneration, "seconds": round(self.seconds, 2)}


def onpolicy_stream(setup: RoundSetup, config: RoundConfig, reward_model: RewardModel, prompts: int, steps: int,
                    judge: dict | None, reference: ReferenceLogps) -> OnPolicyStream:
    """The round's on-policy examples: `prompts` prompts per regeneration, every `sync_every` steps, ranked by the
    judge `choose_rollout_judge` picked (the policy's implicit reward, or the reward model)."""
    rank = setup.accelerator.process_index
    if judge is not None and judge["judge"] == "policy":
        scorer = implicit_reward_scorer(setup.model, setup.tokenizer, reference, config.max_length,
                                        2 * config.batch_size)
    else:
        scorer = reward_model_scorer(reward_model)
    regenerate = Regenerate(setup, config, reward_model, scorer, prompts, -(-steps // config.sync_every),
                             steps, random.Random(config.seed + 7919 * rank))
    return OnPolicyStream(regenerate, config.sync_every, config.seed + rank, group=lambda e: e.group)
