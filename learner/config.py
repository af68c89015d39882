"""The configuration of one training round: reward model, policy update, rollouts, evaluation and gate.

One flat frozen dataclass, grouped by the part of the round each field steers: the app's Admin tab and the CLI
set fields by the names the design uses (`beta`, `steps`, `sync_every`), so a flat namespace keeps those names
one level deep. Every default is chosen so that a default round on SmolLM2-135M finishes in a few minutes on a
2-core CPU (one DPO step with 8 sequences x 192 tokens takes ~8 s there; 4 answers x 64 tokens of sampling ~5 s).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from learner.errors import ConfigError
from learner.sampling import SamplingParams

ALGORITHMS = ("dpo", "kto", "reward")  # "reward": train the reward model only, copy the parent's policy unchanged
LOSS_TYPES = ("sigmoid", "ipo", "robust")
ROLLOUT_JUDGES = ("reward_model", "auto", "policy")
ROLLOUT_PAIRS = ("best_worst", "all")
# Fields only DPO reads, with the value every other algorithm runs at: RPO's term weighs a pair's chosen answer, and
# KTO's rollouts are split around their median, never paired. `RoundConfig.from_dict` fills them in for the others
# when not given (an explicit other value is a ConfigError); bench.loop's KTO arm sets them whatever its grid says.
DPO_ONLY = {"rpo_alpha": 0.0, "rollout_pairs": "best_worst"}


# What an admin can do when a lineage nears max_kl: each round continues its parent's adapter and is measured against
# the base model, so the KL to the reference grows round by round (`structured`, 128 labels: 0.14 at v1, 10.0 at v7,
# v8 refused at 15.8) and, left alone, every later round is refused.
KL_DRIFT_REMEDY = ("raise max_kl if the serving version's answers still read well (a canary lets annotators judge "
                   "that), or set ref_sync so that each round is measured from its parent")
# For one round's step over the budget:
KL_STEP_REMEDY = "lower learning_rate or steps, raise beta, or set kl_checkpoints"
KL_BUDGET_WARN = 0.5  # share of max_kl from which a lineage is warned (Overview, round warnings): its KL grows faster
#   each round (`structured`, 128 labels, v5 to v8: 4.0, 6.8, 10.0, then 15.8 refused), so from half of it a round or
#   two are left


@dataclass(frozen=True)
class RoundConfig:
    """Everything one round needs besides its data and models. Build with `from_dict` to get validation messages."""

    # --- what the round does
    algorithm: str = "dpo"  # pairs are what annotators mostly produce (rankings); "kto" trains on thumbs
    seed: int = 0  # rounds are reproducible given the same snapshot and parent
    max_length: int = 192  # prompt + answer tokens; a short chat prompt (~60) + a 96-token answer + template fits

    # --- policy update (DPO / KTO)
    beta: float = 0.1  # the DPO paper's default strength of the pull towards the reference (arXiv 2305.18290).
    #   Measured (docs/benchmarks.md, bench.loop, `structured`, 32 labels, 3 seeds): 0.05 won 0.53 [0.46, 0.60] vs
    #   0.54 [0.48, 0.60] (paired -0.014 [-0.111, +0.062], n = 288): not better, so 0.1 stays
    loss_type: str = "sigmoid"  # DPO's own loss; "ipo" (arXiv 2310.12036) and "robust" (arXiv 2403.00409) for noise
    label_smoothing: float = 0.0  # assumed fraction of flipped labels, used by loss_type "robust" only
    rpo_alpha: float = 1.0  # weight of the chosen answers' per-token negative log-likelihood added to DPO's loss
    #   (RPO, arXiv 2404.19733, which used 1; TRL's former `rpo_alpha`, now loss_type ["sigmoid", "sft"]): DPO alone
    #   may lower the chosen answers' likelihood along with the rejected ones'. DPO only: `from_dict` without it gives
    #   kto and reward 0. Measured at 1 vs 0 (docs/benchmarks.md, bench.loop, seeds 0-2, n = 288): `concise` 32 labels
    #   0.86 [0.77, 0.94] vs 0.81 (paired +0.049 [-0.122, +0.252]); `concise` 64 labels every round deployed (KL <=
    #   11.3) where 0's stalled at max_kl, 0.98 [0.96, 1.00] vs 0.93 (paired +0.057 [+0.010, +0.122]); `structured` 32
    #   labels 0.53 vs 0.54 (paired -0.017 [-0.097, +0.059]: its few pairs limit); `structured` 64 labels 0.65 vs 0.63
    #   (paired +0.019 [-0.219, +0.212]). Better once (paired interval above 0), not measurably worse in those cells;
    #   as the default, `structured` 48 labels 0.62 [0.52, 0.72] vs plain DPO's 0.63 in the same precision (paired
    #   -0.009 [-0.111, +0.106]); `concise` 16 labels 0.71 [0.63, 0.79] and 48 labels 0.95 [0.91, 0.98]. Not with
    #   sync_every 1 (online): there 1 vs 0 read 0.74 vs 0.88 at `concise` 32 labels, the same seeds and code (paired
    #   -0.137 [-0.227, -0.042]; -0.181 [-0.323, -0.047] against older plain runs, 0.92): online rounds should set 0,
    #   and a round that does not says so (`advisories`). And a long lineage moves less: `structured` 128 labels 0.84
    #   [0.74, 0.94] vs plain DPO's 0.88 (paired -0.049 [-0.096, -0.002], every seed; KL 5.5-8.7 after eight rounds
    #   where 0's reached max_kl)
    desirable_weight: float = 1.0  # KTO's λ_D; the paper's default with balanced thumbs (arXiv 2402.01306)
    undesirable_weight: float = 1.0  # KTO's λ_U; keep λ_D·n_D / (λ_U·n_U) in [1, 4/3] (Eq. 9 of the KTO paper)
    steps: int = 12  # optimizer steps per round; rounds repeat as labels arrive
    batch_size: int = 4  # examples per forward pass (memory): DPO packs pairs up to 2 x this many distinct answers (a
    #   ranking's pairs share theirs), KTO this many answers; a step accumulates over as many as its share needs
    learning_rate: float = 1e-4  # LoRA's usual rate; a round is only a dozen steps, the KL gate catches overshoot.
    #   Measured (docs/benchmarks.md, bench.loop, 48 held-out prompts x 2, 3 seeds each): DPO at 2e-4, `structured`,
    #   32 labels, 0.53 [0.45, 0.60] vs 0.54 [0.48, 0.60] (paired -0.017 [-0.104, +0.068], n = 288): there the labels
    #   limit (most rankings tie), not the rate; KTO at 5e-5, `structured`, 64 labels, seed 0: every round deployed
    #   where 1e-4 stalls at max_kl, but 0.47 vs 0.48 (paired -0.005 [-0.062, +0.052], n = 96). Neither is better.
    #   DPO at 5e-5, `concise`, 64 labels, seed 0 (one run): all four rounds deployed (KL +1 to +5 nats a round, where
    #   1e-4 took +12 to +15 at round 3 and stalled at max_kl), 0.95 [0.90, 0.99] vs the defaults' seed-0 runs 0.86
    #   and 0.66 (paired +0.089 [+0.005, +0.172], +0.292 [+0.193, +0.391], n = 96); seeds 0-1: +0.057 [+0.005,
    #   +0.141] (n = 192). But `structured` at 64 labels, seeds 0-1: -0.154 [-0.307, 0.000] (n = 192; its lineages
    #   hardly moved, KL < 0.7 after four rounds). One rate does not serve both: 1e-4 stays, and `kl_checkpoints`
    #   keeps the part of an overshooting round's step that fits in max_kl
    adam_eps: float = 1e-5  # larger than torch's 1e-8: stops tiny second moments of fresh LoRA B blowing up steps
    max_grad_norm: float = 1.0  # DPO's gradients spike when a pair flips; clipping keeps one pair from a big jump
    lora_r: int = 16  # the design's LoRA rank: ~4.9M trainable weights on SmolLM2-135M, cheap to save and swap
    lora_alpha: int = 32  # alpha = 2r, the common LoRA scale (effective update scale alpha/r = 2)
    lora_dropout: float = 0.0  # dropout makes policy and reference disagree at step 0; TRL's DPO docs advise off
    lora_target_modules: str = "all-linear"  # every linear layer but the output head, as the design says
    lora_layers: int = 0  # adapt only the top N transformer layers (0: all of them). The backward pass
    #   stops below the lowest adapted layer, so steps cost less: one DPO step of SmolLM2 (8 x 192 tokens, bf16
    #   autocast, 2-core CPU) took 0.71x the all-layer step's time with the top 15 of 30 layers, 0.46x with the top
    #   10; a whole default round on 24 rankings 142 s vs 164 s, but its policy moved a tenth as far (KL 0.10 vs
    #   0.88 nats, held-out implicit-reward accuracy 0.62 vs 0.88, n = 24; docs/benchmarks.md): at this learning rate
    #   it learns less, and no learning-benchmark run says otherwise, so all layers stay the default. Like lora_r it
    #   shapes a new adapter: a version continues its parent's (policy and reward model), so it takes effect from the
    #   next version 0 on

    # --- which data: human labels and on-policy rollouts (learner/data.py plans every step's batch)
    max_label_staleness: int | None = 2  # human labels on answers from at most 2 DEPLOYED versions back along the
    #   serving lineage (storage computes each label's `staleness`); None = all labels (offline). Measured
    #   (docs/benchmarks.md, bench.loop, `structured`, 128 labels, 3 seeds): 0 (each label in one round) kept every
    #   lineage within max_kl (KL 2.3-3.4 after 8 rounds vs 10 at v7) but won 0.79 [0.72, 0.86] vs 0.88 [0.79, 0.97]
    #   (paired -0.092 [-0.203, +0.023], n = 288): it learns less from the same labels, so 2 stays
    human_epochs: int = 1  # passes over the human labels per round, in shuffled epoch order split evenly over the
    #   steps: every label is seen exactly this often (1: a round's labels are few and rounds repeat as they grow).
    #   Measured (docs/benchmarks.md, bench.loop, `structured`, 64 labels, seed 0): one offline round with 3 passes
    #   won 0.62 [0.56, 0.69] vs base (n = 96) by collapsing (KL 13.2, 23 words vs 74, held-out accuracies at chance).
    #   2 passes, semi-online, 32 labels, 3 seeds each (n = 288): `structured` 0.57 [0.51, 0.62] vs 0.54 (paired
    #   +0.023 [-0.049, +0.094]), `concise` 0.88 [0.82, 0.94] vs 0.93 (paired -0.043 [-0.162, +0.066], +0.071
    #   [-0.031, +0.188] with a bf16 rerun of seed 0; one lineage refused by max_kl at round 2): it moves the policy
    #   further, not shown toward the persona, so 1 stays
    onpolicy_fraction: float = 0.5  # share of each step's examples that are on-policy (the semi-online paper mixes
    #   fresh and human data; half keeps the human signal dominant per label while the policy sees its own answers)
    sync_every: int = 4  # regenerate on-policy pairs every 4 optimizer steps: semi-online (arXiv 2506.21495);
    #   1 = online (fresh rollouts every step), >= steps = offline (one generation before the first step).
    #   Measured (docs/benchmarks.md, bench.loop, `structured`, 64 labels, rollouts always, i.e. before the
    #   rollouts_min_reward_accuracy default, win-rate vs base): semi-online 0.59
    #   [0.52, 0.65] over 3 seeds (n = 288), the only arm shown above 0.5; offline 0.50 [0.43, 0.58] (n = 288),
    #   paired difference +0.082 [-0.016, +0.198]: not shown to differ; online (1) regenerates 12 times a round,
    #   not 3 (rounds ~6 min instead of ~5 on the CPU), for 0.55 [0.48, 0.61] at seed 0 (n = 96). `concise`, 32
    #   labels, today's defaults (rollouts ran), 3 seeds each (n = 288): online 0.92 [0.82, 0.99], semi-online 0.93
    #   [0.84, 1.00], offline 0.75 [0.62, 0.88]; online - offline +0.168 [+0.056, +0.318], semi-online - online
    #   +0.003 [-0.113, +0.111] (-0.111 [-0.304, +0.094] with a second, bf16 run of seed 0 in place of the fp32
    #   one): 4 stays, as it regenerates a quarter as often for a difference not shown. Under rpo_alpha 1 (both
    #   arms, 3 seeds, n = 288) semi-online - offline: `concise` 32 labels +0.177 [+0.078, +0.269] (0.86 vs 0.68),
    #   `structured` 48 labels +0.068 [-0.017, +0.156] (0.62 vs 0.55)
    onpolicy_fill_steps: bool = True  # a step without a human example (a round with fewer human examples than
    #   steps) trains on `batch_size` on-policy examples. So a sparse round is mostly on-policy: one `structured`
    #   round (48 labels, seed 1, docs/benchmarks.md) had 3 human pairs and 39 on-policy uses, picked by a reward
    #   model trained on 3 pairs. False: such a round takes one step per human example (each keeps onpolicy_fraction).
    #   Not measured as an arm (`bench.loop --round onpolicy_fill_steps=false`): such rounds' reward models are rarely
    #   shown above chance, so the default rollouts_min_reward_accuracy already trains them on human labels alone
    onpolicy_max_uses: int = 4  # steps one on-policy example may serve: a regeneration samples enough prompts for
    #   its window at this reuse, so a large sync_every means older rollouts, not fewer (bench.loop: offline repeated
    #   6 pairs 21 times and won 0.81 vs base; with 4, 29 pairs, 0.94); 4 = what the default sync_every gives
    rollouts_min_reward_accuracy: float | None = 0.5  # on-policy pairs only while the reward model's held-out pair
    #   accuracy has its 95% lower bound >= this (0.5: shown better than chance), else human pairs alone, with a
    #   warning. None = always (the default until 2026-12-01). Measured (docs/benchmarks.md, bench.loop, 48 held-out
    #   prompts x 2, win-rate vs base): `structured` at 48 labels, seeds 0-2, 0.68 [0.58, 0.78] with it vs 0.54
    #   [0.46, 0.61] without (n = 288 each; paired +0.144 [+0.010, +0.292]): its early reward models are near chance
    #   (3-15 held-out pairs), and on-policy pairs they pick are noise the policy learns; once one is shown better
    #   (seed 1's rounds 2-3: 0.93, 0.89) rollouts return. `concise` learns either way: at 32 labels, seeds 0-2,
    #   0.93 [0.84, 1.00] with it vs 0.94 [0.89, 0.99] without (n = 288 each; with - without -0.019 [-0.090,
    #   +0.040]; its reward models passed, its rollouts ran). Rounds without rollouts are also shorter (policy phase
    #   23-85 s instead of 120-175 s in those runs)
    rollout_judge: str = "reward_model"  # what ranks a prompt's rollouts (best vs worst, around the median): the
    #   round's reward model, or "auto": whichever of it and the policy's implicit reward (log-ratio to the reference,
    #   as the policy is at that regeneration) ranked the held-out human pairs better at the round's start (the
    #   parent policy's; without a parent, or with `ref_sync`, the policy starts as its reference, its implicit
    #   reward 0 for every answer, so the reward model judges); or "policy": the policy's implicit reward in every
    #   round whose policy does not start as its reference (from round 2 on), without waiting for held-out evidence
    #   (a run of "auto" never switched: 3-9 held-out pairs a round, docs/benchmarks.md). Default unchanged: one
    #   run of "policy" (`structured`, seed 1, 64 labels) drifted, its own samples judged by itself: KL 2.9, 13.5,
    #   20 (round 4 refused by max_kl), answers 75 -> 46 words, its held-out accuracy 0.67 -> 0.25, win-rate vs
    #   base 0.46 [0.40, 0.53] (n = 96), though across ten default `structured` runs the policy's implicit reward
    #   ranked held-out pairs better at the rounds' end, 0.73 vs 0.56 (paired +0.167 [+0.084, +0.243], n = 234)
    rollout_prompts: int = 4  # prompts sampled per regeneration at least: 4 x 4 answers ~ 15 s of sampling on a
    #   CPU; more when one step's on-policy share, or its window at onpolicy_max_uses, needs more
    rollout_n: int = 4  # answers per prompt, best vs worst by the reward model (K=4 as annotators see)
    rollout_pairs: str = "best_worst"  # which DPO pairs a prompt's rollout_n answers give, in the judge's order:
    #   "best_worst" one (the semi-online paper's, arXiv 2506.21495: the widest margin), "all" every pair it orders
    #   (6 of K=4, as a human ranking gives). "all" needs fewer prompts per regeneration and its pairs share their
    #   answers in one forward pass (a step's on-policy half takes 4 answers per 6 pairs instead of 12), so a round
    #   costs less; its narrow-margin pairs are noisier. Measured (docs/benchmarks.md): a default round on 24
    #   rankings with rollouts 148 s -> 117 s (policy phase 112 -> 79 s); bench.loop `concise`, 64 labels, seeds 0-2:
    #   0.92 [0.84, 0.98] vs 0.93 [0.86, 0.98] (paired -0.005 [-0.115, +0.104], n = 288): not shown different, not
    #   enough to change the paper's choice (with rollout_prompts 2 as well, a 94 s round: -0.010 [-0.094, +0.078]);
    #   under rpo_alpha 1 (today's loss) `all` with rollout_prompts 2 cost `concise` at 64 labels: 0.89 [0.77, 0.97]
    #   vs 0.98 [0.96, 1.00], paired -0.095 [-0.215, -0.005] (n = 288), so a round with "all" and rpo_alpha > 0
    #   says so (`advisories`). `structured`'s rounds at these sizes take no rollouts to act on
    max_new_tokens: int = 64  # rollout and eval answers; shorter than the app's 96 to keep a CPU round quick
    temperature: float = 0.8  # the policy service's temperature, so rollouts look like what annotators rank
    top_p: float = 0.95  # same as the policy service: cuts the junk tail of a small model
    ref_sync: bool = False  # False: reference = base model (disabled adapter); True: the parent version, so the KL
    #   (and max_kl) measure each round's own step and a lineage is no longer held at max_kl, its distance from the
    #   base model then unbounded (README, "A lineage's KL budget"). Measured (`structured`, 128 labels, 3 seeds):
    #   every round deployed, 0.92 vs base with it, 0.88 without (paired +0.040 [-0.104, +0.188], n = 288), one
    #   lineage's last round a 12.9-nat step that lost ground: not shown better, so off

    # --- reward model (Bradley-Terry on human pairs)
    reward_steps: int = 10  # optimizer steps per round, warm-started from the parent's reward adapter: ~1 min.
    #   30 steps trained a better judge but not a better policy (`structured`, 64 labels, seeds 0-1): held-out pair
    #   accuracy at round 4 0.90 (n = 20) and 0.80 (n = 15) where 10 steps ended between 0.35 and 0.93; win-rate
    #   vs base 0.57 [0.48, 0.64] vs 0.60 [0.52, 0.67] (n = 192, paired -0.031 [-0.094, +0.031]), for ~2.5x the
    #   reward model's time (~250 s a round in fp32 on a 2-core CPU) (docs/benchmarks.md)
    reward_batch_items: int = 2  # rankings per step; a K=4 ranking has 6 pairs but only 4 sequences to score
    reward_learning_rate: float = 2e-4  # the fresh scalar head needs a larger rate than the policy's LoRA
    reward_centering: float = 0.01  # c·mean((r_w + r_l)^2) keeps scores near 0 (TRL's value, arXiv 2312.09244)
    heldout_fraction: float = 0.2  # prompts (by a hash of the prompt text) whose human labels are never trained
    #   on, by the policy or the reward model: the held-out pair accuracies are measured on them

    # --- evaluation and gate
    eval_prompts: int = 4  # held-out prompts scored per round: ~9 s of sampling on a 2-core CPU when the base's and
    #   the parent's draws are reused (a round in a chain), ~24 s when all three models are sampled
    eval_n: int = 2  # answers per prompt and model; win-rates compare all policy x other answers of a prompt
    eval_seed: int = 1  # the eval answers' draw, apart from `seed`: every round, whatever its training seed, compares
    #   its policy with the same base answers and reuses the stored draws (1: the seed + 1 rounds drew with before)
    eval_fraction: float = 0.1  # prompts (by a hash of the prompt text) kept for evaluation: never used for rollouts,
    #   and their human labels are neither trained on nor in the held-out label set
    max_kl: float = 15.0  # nats per answer (~0.25 per token of 64): beyond that a 135M model's text degrades. With
    #   the base model as reference it bounds the whole lineage: `structured` at 128 labels reached it at round 8
    kl_checkpoints: int = 0  # policy adapters kept at evenly spaced steps of a round (3: after steps 3, 6 and 9 of
    #   12); when the final step's exact KL is over max_kl, the latest kept one within it is measured and deployed
    #   instead of refusing the whole round (one more evaluation each, ~10-20 s on the CPU, only then). Why: a lineage
    #   near the budget loses every later round (`concise` at learning_rate 1e-4, seed 0: rounds 3 and 4 took +14.6
    #   and +13.8 nats and were refused, each later round starting from the same parent). 0 (off) until the learning
    #   benchmark shows what it does to a lineage; one process only (`--round-processes 1`)
    min_win_rate: float = 0.4  # vs parent by the reward model, ADVISORY: the gate refuses only when the win-rate's
    #   95% upper bound is below it (8 comparisons cannot show a version is better; the canary decides that)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> RoundConfig:
        """A config from a dict (JSON file, Admin form); unknown keys and invalid values raise ConfigError."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown config key {key!r}; known: {', '.join(known)}")
        typed = cls.typed(values)
        if typed.get("algorithm", "dpo") != "dpo":
            typed = {**DPO_ONLY, **typed}
        return cls(**typed)

    @classmethod
    def typed(cls, values: dict) -> dict:
        """`values`' RoundConfig fields in their declared types (JSON's 0 for a float field is 0.0), each checked on
        its own; other keys are left out. `from_dict` checks them together."""
        return {f.name: _coerce(f.name, f.type, values[f.name]) for f in fields(cls) if f.name in values}

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sampling(self) -> SamplingParams:
        """How rollouts and evaluation answers are sampled."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)


# Combinations of settings the learning benchmark measured worse than a neighbour (docs/benchmarks.md), each as
# (applies to a config, what to say). Each is a choice an admin may still make, so not a ConfigError: a round run with
# one says so among its warnings (Admin -> Versions, the round's events, metrics.json), and so do POST /api/train and
# Admin -> Train when it starts. One cell of three seeds each, so advice, not a changed default.
ADVISORIES: tuple[tuple[Callable[[RoundConfig], bool], str], ...] = (
    (lambda c: c.algorithm == "dpo" and c.sync_every == 1 and c.rpo_alpha > 0,
     "rpo_alpha {c.rpo_alpha:g} with sync_every 1 (online rounds) was measured worse than rpo_alpha 0 there "
     "(bench.loop, `concise`, 32 labels, the same 3 seeds: win-rate vs base 0.74 vs 0.88, paired -0.137 [-0.227, "
     "-0.042], n = 288; docs/benchmarks.md): set rpo_alpha 0 for online rounds, or sync_every 4 (semi-online) to "
     "keep RPO"),
    (lambda c: c.algorithm == "dpo" and c.rollout_pairs == "all" and c.rpo_alpha > 0,
     "rollout_pairs 'all' with rpo_alpha {c.rpo_alpha:g} was measured worse than 'best_worst' (bench.loop, "
     "`concise`, 64 labels, 3 seeds, with rollout_prompts 2: win-rate vs base 0.89 vs 0.98, paired -0.095 [-0.215, "
     "-0.005], n = 288; docs/benchmarks.md): keep 'best_worst' under RPO (under plain DPO, rpo_alpha 0, 'all' "
     "was not shown different: -0.005 [-0.115, +0.104])"),
)


def advisories(c: RoundConfig) -> list[str]:
    """What the learning benchmark says against this config's combination of settings (empty when nothing)."""
    return [advice.format(c=c) for applies, advice in ADVISORIES if applies(c)]


def _coerce(name: str, type_name: str, value):
    """Check a value's JSON type against the field's annotation (JSON has no int/float distinction for 1 vs 1.0)."""
    allows_none = "None" in type_name
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{name} must not be null")
    base = type_name.replace("| None", "").strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _problems(c: RoundConfig) -> list[str]:
    """Every rule a config must satisfy, as messages that say what they got."""
    checks = [
        (c.algorithm in ALGORITHMS, f"algorithm must be one of {', '.join(ALGORITHMS)}, got {c.algorithm!r}"),
        (c.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {c.loss_type!r}"),
        (c.beta > 0, f"beta must be > 0, got {c.beta}"),
        (0 <= c.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {c.label_smoothing}"),
        (c.label_smoothing == 0 or c.loss_type == "robust",
         f"label_smoothing only applies to loss_type 'robust', got {c.label_smoothing} with {c.loss_type!r}"),
        (math.isfinite(c.rpo_alpha) and c.rpo_alpha >= 0, f"rpo_alpha must be >= 0, got {c.rpo_alpha}"),
        (c.rpo_alpha == 0 or c.algorithm == "dpo",
         f"rpo_alpha applies to algorithm 'dpo' (it weighs the chosen answer of a pair), got {c.rpo_alpha} with "
         f"{c.algorithm!r}: set rpo_alpha 0 (RoundConfig.from_dict does when it is not given)"),
        (c.desirable_weight > 0, f"desirable_weight must be > 0, got {c.desirable_weight}"),
        (c.undesirable_weight > 0, f"undesirable_weight must be > 0, got {c.undesirable_weight}"),
        (c.steps >= 0, f"steps must be >= 0, got {c.steps}"),
        (c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"),
        (c.algorithm != "kto" or c.batch_size >= 2,
         f"batch_size must be >= 2 for kto (its KL term pairs answers with other prompts), got {c.batch_size}"),
        (math.isfinite(c.learning_rate) and c.learning_rate > 0, f"learning_rate must be > 0, got {c.learning_rate}"),
        (1e-6 <= c.adam_eps <= 1e-4, f"adam_eps must be in [1e-6, 1e-4], got {c.adam_eps}"),
        (c.max_grad_norm > 0, f"max_grad_norm must be > 0, got {c.max_grad_norm}"),
        (c.lora_r >= 1, f"lora_r must be >= 1, got {c.lora_r}"),
        (c.lora_alpha > 0, f"lora_alpha must be > 0, got {c.lora_alpha}"),
        (0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {c.lora_dropout}"),
        (c.lora_layers >= 0, f"lora_layers must be >= 0 (0: every layer), got {c.lora_layers}"),
        (c.max_label_staleness is None or c.max_label_staleness >= 0,
         f"max_label_staleness must be >= 0 or null, got {c.max_label_staleness}"),
        (c.human_epochs >= 1, f"human_epochs must be >= 1, got {c.human_epochs}"),
        (0 <= c.onpolicy_fraction < 1, f"onpolicy_fraction must be in [0, 1), got {c.onpolicy_fraction}"),
        (c.rollouts_min_reward_accuracy is None or 0 <= c.rollouts_min_reward_accuracy < 1,
         f"rollouts_min_reward_accuracy must be None or in [0, 1), got {c.rollouts_min_reward_accuracy}"),
        (c.sync_every >= 1, f"sync_every must be >= 1, got {c.sync_every}"),
        (c.rollout_judge in ROLLOUT_JUDGES,
         f"rollout_judge must be one of {', '.join(ROLLOUT_JUDGES)}, got {c.rollout_judge!r}"),
        (c.rollout_prompts >= 0, f"rollout_prompts must be >= 0, got {c.rollout_prompts}"),
        (c.onpolicy_max_uses >= 1, f"onpolicy_max_uses must be >= 1, got {c.onpolicy_max_uses}"),
        (c.rollout_pairs in ROLLOUT_PAIRS,
         f"rollout_pairs must be one of {', '.join(ROLLOUT_PAIRS)}, got {c.rollout_pairs!r}"),
        (c.rollout_pairs == "best_worst" or c.algorithm != "kto",
         f"rollout_pairs {c.rollout_pairs!r} applies to dpo only (kto's rollouts are split around their median), "
         f"got algorithm {c.algorithm!r}: set rollout_pairs 'best_worst' (RoundConfig.from_dict does when it is not "
         "given)"),
        (c.rollout_n >= 2, f"rollout_n must be >= 2 (best vs worst needs two answers), got {c.rollout_n}"),
        (c.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {c.max_new_tokens}"),
        (c.temperature > 0, f"temperature must be > 0, got {c.temperature}"),
        (0 < c.top_p <= 1, f"top_p must be in (0, 1], got {c.top_p}"),
        (c.max_length >= 8, f"max_length must be >= 8, got {c.max_length}"),
        (c.reward_steps >= 0, f"reward_steps must be >= 0, got {c.reward_steps}"),
        (c.reward_batch_items >= 1, f"reward_batch_items must be >= 1, got {c.reward_batch_items}"),
        (math.isfinite(c.reward_learning_rate) and c.reward_learning_rate > 0,
         f"reward_learning_rate must be > 0, got {c.reward_learning_rate}"),
        (c.reward_centering >= 0, f"reward_centering must be >= 0, got {c.reward_centering}"),
        (0 <= c.heldout_fraction < 1, f"heldout_fraction must be in [0, 1), got {c.heldout_fraction}"),
        (c.eval_fraction + c.heldout_fraction < 1,
         f"eval_fraction + heldout_fraction must be < 1 (some prompts must train), got "
         f"{c.eval_fraction} + {c.heldout_fraction}"),
        (c.eval_prompts >= 0, f"eval_prompts must be >= 0, got {c.eval_prompts}"),
        (c.eval_n >= 1, f"eval_n must be >= 1, got {c.eval_n}"),
        (0 <= c.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {c.eval_fraction}"),
        (c.max_kl > 0, f"max_kl must be > 0, got {c.max_kl}"),
        (c.kl_checkpoints >= 0, f"kl_checkpoints must be >= 0, got {c.kl_checkpoints}"),
        (0 <= c.min_win_rate <= 1, f"min_win_rate must be in [0, 1], got {c.min_win_rate}"),
    ]
    return [message for ok, message in checks if not ok]
