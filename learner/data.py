"""What each step of a round learns from: the prompt split, the human labels' epoch plan, the on-policy stream,
and the reward model's batches.

- Prompts are split once, by a hash of their text, into "eval" (answers sampled and judged after training; their
  labels never train anything), "heldout" (their human labels only measure accuracy) and "train". The split is fixed
  across rounds, so a prompt never moves from held out to trained on.
- Human labels are seen `human_epochs` times per round: each epoch is a shuffled order of whole rankings (the pairs
  of one ranking stay together, so their shared answers go through one forward pass), and the concatenated epochs
  are cut into one contiguous chunk per step.
- On-policy examples fill `onpolicy_fraction` of every step. They are regenerated at every step s with
  s % sync_every == 0: sync_every = 1 samples fresh answers for every step (online), sync_every >= steps samples
  once before the first step (offline with respect to the round), in between is semi-online (arXiv 2506.21495).
- Under `accelerate launch` every rank takes its own slice of each step's plan (never the same examples twice).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

EVAL, HELDOUT, TRAIN = "eval", "heldout", "train"


def hash_fraction(key: str) -> float:
    """A key's fixed place in [0, 1), the same in every round and process (unlike the salted hash()). The app uses it
    too (the canary's untrained prompts), so this module imports nothing heavy."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class PromptSplit:
    """Which prompts are evaluation prompts and which hold their labels out; every other prompt trains."""

    eval: frozenset[str]
    heldout: frozenset[str]
    # Every prompt whose hash_fraction is below this trained nothing in the round (its labels, if any, only measured):
    # eval_fraction + heldout_fraction, or lower where a small round's fallback trained on a labelled prompt below it.
    # Prompts added to the pool later obey it too, so the canary can draw items the version never saw (app/buffer.py).
    untrained_below: float = 0.0

    def role(self, prompt: str) -> str:
        return EVAL if prompt in self.eval else HELDOUT if prompt in self.heldout else TRAIN

    @classmethod
    def build(cls, prompts: Iterable[str], eval_fraction: float, heldout_fraction: float,
              fallback_eval: str | None = None, labelled: Iterable[str] = ()) -> PromptSplit:
        """By hash_fraction(text): [0, eval_fraction) eval, then heldout_fraction held out. `fallback_eval` becomes
        an eval prompt when none hashed there (a tiny prompt set): its labels then leave training too. When every
        `labelled` prompt would leave training (a first round on a few labels), none is held out: the round trains,
        and its held-out metrics say n = 0; when every one is an eval prompt, they train too and the round evaluates
        on the other eval prompts (eval needs prompts, not labels)."""
        eval_, heldout = set(), set()
        for prompt in set(prompts):
            h = hash_fraction(prompt)
            if h < eval_fraction:
                eval_.add(prompt)
            elif h < eval_fraction + heldout_fraction:
                heldout.add(prompt)
        if not eval_ and fallback_eval is not None:
            eval_.add(fallback_eval)
            heldout.discard(fallback_eval)
        labelled = set(labelled)
        if labelled and labelled <= eval_ | heldout:
            heldout -= labelled
            if labelled <= eval_ and eval_ - labelled:
                eval_ -= labelled
        bound = eval_fraction + heldout_fraction
        trained_below = [h for p in set(prompts) if (h := hash_fraction(p)) < bound and p not in eval_ | heldout]
        return cls(frozenset(eval_), frozenset(heldout), min([bound, *trained_below]))


def even_chunks(order: Sequence, parts: int) -> list[list]:
    """`order` cut into `parts` contiguous chunks whose sizes differ by at most one."""
    n = len(order)
    return [list(order[i * n // parts:(i + 1) * n // parts]) for i in range(parts)]


def human_plan(groups: Sequence[str], epochs: int, steps: int, seed: int, rank: int = 0,
               world_size: int = 1) -> list[list[int]]:
    """Indices into the human examples for each of `steps` steps, this rank's share: `epochs` shuffled passes over
    whole groups (rankings), concatenated and cut evenly, so every example is used exactly `epochs` times overall."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    rng = random.Random(seed)  # the same on every rank: they cut one plan between them
    order: list[int] = []
    for _ in range(epochs):
        keys = list(by_group)
        rng.shuffle(keys)
        for key in keys:
            order.extend(by_group[key])
    return [chunk[rank::world_size] for chunk in even_chunks(order, steps)] if steps else []


def policy_steps(steps: int, human_uses: int, minimum: int, rollouts: bool, fill: bool, world_size: int = 1) -> int:
    """Optimizer steps of a round with `human_uses` human examples (epochs included) and at least `minimum` examples
    per step on each of `world_size` processes: all `steps` when on-policy examples can fill the steps that have no
    human example (`fill`, or a round with no human example at all); else no more steps than the human examples can
    reach, one at least each (with rollouts) or `minimum` on every process each (without: a process with nothing to
    train on in a step would leave the others waiting for its gradients), so that every step keeps its on-policy
    share."""
    if rollouts and (fill or human_uses == 0):
        return steps
    return min(steps, human_uses if rollouts else human_uses // (minimum * world_size))


def onpolicy_count(human: int, fraction: float, batch_size: int) -> int:
    """On-policy examples for a step with `human` human ones, so they make `fraction` of it; a step without human
    examples (a round before any label, or past their end) takes `batch_size` on-policy examples."""
    if human == 0:
        return batch_size
    return round(human * fraction / (1 - fraction))


def reward_batches(n_items: int, batch_items: int, steps: int, seed: int, rank: int = 0,
                   world_size: int = 1) -> list[list[int]]:
    """Item indices for each reward-model step on this rank: one shuffled epoch after another (seeded alike on every
    rank), each step taking batch_items x world_size consecutive items and this rank its own batch_items of them, so
    ranks never draw the same items in a step while there are enough of them."""
    if n_items == 0:
        return [[] for _ in range(steps)]
    rng = random.Random(seed)
    stream: list[int] = []
    per_step = batch_items * world_size
    batches = []
    for _ in range(steps):
        while len(stream) < per_step:
            epoch = list(range(n_items))
            rng.shuffle(epoch)
            stream.extend(epoch)
        step_items, stream = stream[:per_step], stream[per_step:]
        mine = step_items[rank * batch_items:(rank + 1) * batch_items]
        batches.append(list(dict.fromkeys(mine)))  # fewer items than a step takes: each at most once per batch
    return batches


@dataclass
class OnPolicyStream:
    """On-policy examples regenerated every `sync_every` steps and handed out in shuffled order, reused within their
    sync window when a window needs more than one regeneration made (the reuse is counted)."""

    regenerate: Callable[[int], list]  # step -> new examples (sampled by the policy, scored by the reward model)
    sync_every: int
    seed: int
    # example -> its group (a prompt's rollouts): groups are shuffled whole, so a step takes a group's examples
    # together and their shared answers go through one forward pass. None: every example a group of its own.
    group: Callable[[Any], str] | None = None
    examples: list = field(default_factory=list)
    made: int = 0
    used: int = 0
    _order: list[int] = field(default_factory=list)

    def take(self, step: int, count: int) -> list:
        """`count` distinct examples for `step` (fewer when fewer exist), regenerating first when it is time."""
        if step % self.sync_every == 0:
            fresh = self.regenerate(step)
            if fresh:  # a regeneration where every prompt tied keeps the previous examples rather than none
                self.examples, self._order = fresh, []
                self.made += len(fresh)
        count = min(count, len(self.examples))
        taken: list[int] = []
        rng = random.Random(self.seed * 7919 + step)
        while len(taken) < count:
            if not self._order:
                self._order = self._shuffled(rng)
            index = self._order.pop()
            if index not in taken:
                taken.append(index)
        self.used += len(taken)
        return [self.examples[i] for i in taken]

    def _shuffled(self, rng: random.Random) -> list[int]:
        """Indices of the examples, groups in random order, a group's examples together (popped from the end: its
        first example first). Every group a single example: the plain shuffle of the indices."""
        groups: dict = {}
        for index, example in enumerate(self.examples):
            groups.setdefault(self.group(example) if self.group else index, []).append(index)
        order = list(groups.values())
        rng.shuffle(order)
        return [i for members in order for i in reversed(members)]

    def stats(self) -> dict:
        return {"examples": self.made, "uses": self.used,
                "mean_uses_per_example": round(self.used / self.made, 3) if self.made else None}


def rollout_prompt_count(config_prompts: int, per_step: Sequence[int], sync_every: int, max_uses: int,
                         per_prompt: int = 1) -> int:
    """Prompts per regeneration (best vs worst gives one pair per prompt): at least `config_prompts`; at least one
    step's on-policy need, so a step never repeats an example; and at least the largest sync window's need divided
    by `max_uses`, so no example serves more than `max_uses` steps. The last rule is what makes a large `sync_every`
    mean "older rollouts", not "fewer rollouts": offline (one window of every step) samples as many distinct
    examples as semi-online does over its windows, instead of a few repeated at every step. `per_prompt`: examples
    one prompt gives (every pair of its answers: `rollout_pairs` "all"); the needs count examples, not prompts."""
    if not per_step or not max(per_step):
        return config_prompts
    windows = [sum(per_step[i:i + sync_every]) for i in range(0, len(per_step), sync_every)]
    need = max(max(per_step), math.ceil(max(windows) / max_uses))
    return max(config_prompts, math.ceil(need / per_prompt))
