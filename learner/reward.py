"""The reward model: a scalar head on the base model's last hidden state, read through its own LoRA adapter.

Memory: the reward model is a second named adapter ("reward") on the SAME PeftModel as the policy, not a second
model. peft injects LoRA layers into the base modules in place, so two PeftModels wrapping one base would stack
into each other; one PeftModel with named adapters shares the base weights and switches adapters per forward.
The head (hidden -> 1) is a plain Linear kept beside the PeftModel and saved next to the adapter: a reward model
whose head is not saved, or loaded untrained, scores at random (TRL issues #1379 and #2743).

score(x, y) = head(h_last), h_last the final-layer hidden state (after the final norm) at the answer's last
token, which is the eos ending the turn unless the answer was truncated. The LM head over the vocabulary is
never computed.

On disk (a version's reward/): the adapter, the head and prefloop_reward.json; save_hf_reward_adapter writes the same
model as a standard sequence-classification PEFT adapter (reward-hf/) for transformers, TRL and other tools.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from learner.errors import ModelError
from learner.logprobs import EncodedAnswer, encode_answer, finish_ended, layout, transformer_body
from learner.losses import bradley_terry_loss
from learner.stats import Proportion, proportion
from learner.train import TrainResult, train_loop, training_adapter, use_adapter

REWARD_ADAPTER = "reward"
HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "prefloop_reward.json"  # {"trained_pairs": n}: how many human pairs this reward model has learned from


@dataclass
class RewardModel:
    """The reward adapter's name on a PeftModel, the head, and how answers are tokenized."""

    model: object  # a PeftModel holding the reward adapter (and possibly the policy's)
    head: torch.nn.Linear
    tokenizer: object
    max_length: int
    adapter: str = REWARD_ADAPTER

    def parameters(self) -> list[torch.nn.Parameter]:
        """What training the reward model updates: its LoRA weights and the head."""
        lora = [p for n, p in self.model.named_parameters() if f".{self.adapter}." in n]
        return lora + list(self.head.parameters())

    def rewards(self, encoded: Sequence[EncodedAnswer]) -> Tensor:
        """(B,) scores of encoded answers, with gradients unless called under no_grad."""
        batch = layout(self.model, encoded, self.tokenizer.pad_token_id)  # a ranking's answers share its prompt
        _, decoder = transformer_body(self.model)  # the decoder stack without the LM head
        with use_adapter(self.model, self.adapter):
            hidden = decoder(**batch.forward_kwargs()).last_hidden_state
        return self.head(hidden[batch.last[0], batch.last[1]].float()).squeeze(-1)

    def encode(self, prompt: str, answer: str, ended: bool = True) -> EncodedAnswer:
        return encode_answer(self.tokenizer, prompt, answer, self.max_length, ended)


def _new_head(hidden_size: int, device) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden_size, 1)
    # Small weights: the final-norm hidden state has RMS ~1, so scores start within ~1/sqrt(hidden) of 0 and the
    # first Bradley-Terry steps see a loss near log 2 rather than confident noise.
    torch.nn.init.normal_(head.weight, std=1 / hidden_size)
    torch.nn.init.zeros_(head.bias)
    return head.to(device)


def attach_reward_model(model, tokenizer, max_length: int, lora_config=None, reward_dir: Path | None = None,
                        trainable: bool = True) -> RewardModel:
    """Add the reward adapter to a PeftModel: loaded from `reward_dir` (a saved reward model) or fresh from
    `lora_config` with a new head."""
    device = next(model.parameters()).device
    if reward_dir is not None:
        if not (Path(reward_dir) / HEAD_FILE).is_file():
            raise ModelError(f"{reward_dir} has no {HEAD_FILE}: not a reward model saved by prefloop")
        model.load_adapter(str(reward_dir), adapter_name=REWARD_ADAPTER, is_trainable=trainable)
        head = _load_head(Path(reward_dir) / HEAD_FILE, device)
    else:
        model.add_adapter(REWARD_ADAPTER, lora_config)
        if trainable:
            model.set_requires_grad(REWARD_ADAPTER, True)
        head = _new_head(model.get_base_model().config.hidden_size, device)
    head.requires_grad_(trainable)
    return RewardModel(model, head, tokenizer, max_length)


def _load_head(path: Path, device) -> torch.nn.Linear:
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.to(device)


def trained_pairs(reward_dir: Path | None) -> int:
    """Human pairs a saved reward model has been trained on, over all its rounds; 0 for none, or for a reward model
    saved before this was recorded (it cannot be shown to be trained, so it is not trusted to judge)."""
    if reward_dir is None or not (Path(reward_dir) / INFO_FILE).is_file():
        return 0
    return int(json.loads((Path(reward_dir) / INFO_FILE).read_text()).get("trained_pairs", 0))


def save_reward_model(reward_model: RewardModel, out_dir: Path, pairs_trained: int = 0,
                      base_name: str | None = None) -> None:
    """Save the reward adapter (peft's format), the head and how many pairs it learned from into `out_dir`; its
    adapter_config.json names the base as `base_name` (portable, learner.model.base_model_info) when given."""
    from safetensors.torch import save_file

    from learner.model import save_adapter

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    base_name = base_name or reward_model.model.get_base_model().name_or_path
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        saved = Path(tmp) / "reward"
        save_adapter(reward_model.model, reward_model.adapter, saved, base_name)
        state = {k: v.detach().cpu().contiguous() for k, v in reward_model.head.state_dict().items()}
        save_file(state, str(saved / HEAD_FILE))
        (saved / INFO_FILE).write_text(json.dumps({"trained_pairs": int(pairs_trained)}) + "\n")
        os.replace(saved, out_dir)


# --- the same reward model as a standard sequence-classification adapter ---------------------------------------

HF_ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_INFO_FILE = "prefloop_reward_hf.json"  # {"score_bias", "pad_token", "pad_token_id"}: what the HF format cannot hold
_BODY_PREFIX = "base_model.model.model."  # peft's key prefix for the decoder body, alike in CausalLM and SeqCls


def save_hf_reward_adapter(reward_dir: Path, out_dir: Path, tokenizer, base_name: str) -> dict:
    """Write the reward model saved in `reward_dir` (prefloop's format) as a PEFT adapter for
    AutoModelForSequenceClassification(num_labels=1), with a tokenizer, into `out_dir`; returns its info
    ({"score_bias", "pad_token", "pad_token_id"}).

    The two models match: transformers' `score` is the head (bias=False) on the final-norm hidden state, read at the
    last token that is not padding, prefloop's the head on the answer's last token (the eos ending the turn). The
    LoRA weights keep their keys (the decoder body is `model` in both); LoRA on modules outside it (lm_head) never
    touched the reward and is left out. The head's weight travels as `score` in modules_to_save; its bias cannot
    (`score` has none) and is recorded in HF_INFO_FILE: the adapter scores prefloop's reward minus the bias. Where the
    tokenizer pads with its eos (SmolLM2 does), the pooling would skip the eos prefloop scores, so the saved tokenizer
    pads with another special token (its unk, e.g. <|endoftext|>), and the card says to pass its pad_token_id."""
    import copy

    from safetensors.torch import load_file, save_file

    reward_dir, out_dir = Path(reward_dir), Path(out_dir)
    config = json.loads((reward_dir / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = sorted(t for t in targets if t.split(".")[-1] != "lm_head")
    config.update(task_type="SEQ_CLS", modules_to_save=["score"], base_model_name_or_path=base_name,
                  inference_mode=True)
    weights = {k: v for k, v in load_file(str(reward_dir / HF_ADAPTER_WEIGHTS)).items() if k.startswith(_BODY_PREFIX)}
    head = load_file(str(reward_dir / HEAD_FILE))
    weights["base_model.model.score.weight"] = head["weight"].reshape(1, -1).contiguous()
    bias = float(head["bias"].reshape(-1)[0]) if "bias" in head else 0.0
    pad_tokenizer = copy.deepcopy(tokenizer)
    pad_tokenizer.pad_token = _pad_token_besides_eos(tokenizer)
    info = {"score_bias": bias, "pad_token": pad_tokenizer.pad_token, "pad_token_id": pad_tokenizer.pad_token_id,
            "note": "score = prefloop's reward - score_bias; pass pad_token_id to from_pretrained"}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        save_file(weights, str(tmp / HF_ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / HF_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        pad_tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _pad_token_besides_eos(tokenizer) -> str | None:
    """A pad token that is not the eos (transformers' pooling skips every pad id, prefloop scores the eos): the
    tokenizer's own when it differs, else its unk or another special token that never ends an answer; None if none."""
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return tokenizer.pad_token
    candidates = [tokenizer.unk_token, *tokenizer.all_special_tokens]
    return next((t for t in candidates if t is not None and t not in (eos, tokenizer.bos_token)), None)


def load_reward_model(reward_dir: Path, model, tokenizer, max_length: int = 512) -> RewardModel:
    """A saved reward model, frozen, for scoring. `model` is the base causal LM (from learner.model.load_base_model)
    or a PeftModel over it (e.g. the policy service's): the reward adapter is added to it, never a second copy."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return attach_reward_model(model, tokenizer, max_length, reward_dir=reward_dir, trainable=False)
    if not (Path(reward_dir) / HEAD_FILE).is_file():
        raise ModelError(f"{reward_dir} has no {HEAD_FILE}: not a reward model saved by prefloop")
    peft_model = PeftModel.from_pretrained(model, str(reward_dir), adapter_name=REWARD_ADAPTER)
    head = _load_head(Path(reward_dir) / HEAD_FILE, next(model.parameters()).device)
    head.requires_grad_(False)
    return RewardModel(peft_model, head, tokenizer, max_length)


@torch.no_grad()
def score(reward_model: RewardModel, prompts: Sequence[str], answers: Sequence[str],
          batch_size: int = 8, ended: Sequence[bool] | None = None) -> list[float]:
    """Scores of (prompt, answer) pairs, `batch_size` answers per forward pass; `ended` False for an answer cut at
    max_new_tokens (scored without an eos)."""
    ended = [True] * len(answers) if ended is None else ended
    pairs = list(zip(prompts, answers, ended, strict=True))
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        encoded = [reward_model.encode(p, a, e) for p, a, e in pairs[start:start + batch_size]]
        scores.extend(reward_model.rewards(encoded).tolist())
    return scores


# --- training on human rankings -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankedItem:
    """One item's answers and its pairs (index into answers), from every ranking of that item."""

    item_id: str
    prompt: str
    answers: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected)
    ended: tuple[bool, ...] = ()  # per answer: finish_reason "eos" (scored with its eos); empty = all ended

    def answer_ended(self, index: int) -> bool:
        return self.ended[index] if self.ended else True


def items_from_pairs(pairs) -> list[RankedItem]:
    """Group a pairs DataFrame (pairs.parquet columns) by item_id; answers deduplicated by answer id. Finish reasons
    come from chosen_finish_reason / rejected_finish_reason when the frame has them."""
    items = []
    has_finish = "chosen_finish_reason" in pairs.columns
    for item_id, rows in pairs.groupby("item_id", sort=True):
        index: dict[str, int] = {}
        texts: list[str] = []
        ended: list[bool] = []
        item_pairs = []
        for row in rows.itertuples():
            ids = []
            sides = ((row.chosen_answer_id, row.chosen, row.chosen_finish_reason if has_finish else "eos"),
                     (row.rejected_answer_id, row.rejected, row.rejected_finish_reason if has_finish else "eos"))
            for answer_id, text, finish in sides:
                if str(answer_id) not in index:
                    index[str(answer_id)] = len(texts)
                    texts.append(text)
                    ended.append(finish_ended(finish))
                ids.append(index[str(answer_id)])
            item_pairs.append((ids[0], ids[1]))
        items.append(RankedItem(str(item_id), rows["prompt"].iloc[0], tuple(texts), tuple(item_pairs),
                                tuple(ended)))
    return items


def _item_batch_scores(reward_model: RewardModel, items: Sequence[RankedItem]) -> tuple[Tensor, Tensor, Tensor]:
    """Score every answer of the items in one forward pass; (chosen scores, rejected scores, group ids) per pair."""
    encoded, chosen, rejected, groups = [], [], [], []
    for g, item in enumerate(items):
        offset = len(encoded)
        encoded.extend(reward_model.encode(item.prompt, a, item.answer_ended(i)) for i, a in enumerate(item.answers))
        for c, r in item.pairs:
            chosen.append(offset + c)
            rejected.append(offset + r)
            groups.append(g)
    scores = reward_model.rewards(encoded)
    device = scores.device
    return (scores[torch.tensor(chosen, device=device)], scores[torch.tensor(rejected, device=device)],
            torch.tensor(groups, device=device))


@torch.no_grad()
def pair_accuracy(reward_model: RewardModel, items: Sequence[RankedItem], batch_items: int = 4) -> Proportion:
    """Share of pairs whose chosen answer scores higher, with n (pairs) and a 95% Wilson interval."""
    correct = total = 0
    for start in range(0, len(items), batch_items):
        chosen, rejected, _ = _item_batch_scores(reward_model, items[start:start + batch_items])
        correct += int((chosen > rejected).sum())
        total += len(chosen)
    return proportion(correct, total)


def train_reward_model(reward_model: RewardModel, items: Sequence[RankedItem], steps: int, batch_items: int,
                       learning_rate: float, adam_eps: float, max_grad_norm: float, centering: float, seed: int,
                       accelerator=None, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Bradley-Terry training: each step takes `batch_items` rankings in epoch order (learner.data.reward_batches:
    under accelerate every rank its own), all C(K,2) pairs of a ranking in one batch element (`bradley_terry_loss`)."""
    from learner.data import reward_batches

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    plan = reward_batches(len(items), batch_items, steps, seed, rank, world)

    def step_loss(step: int):
        chosen, rejected, groups = _item_batch_scores(reward_model, [items[i] for i in plan[step]])
        loss, metrics = bradley_terry_loss(chosen, rejected, groups, centering=centering)
        yield loss, 1.0, metrics

    with training_adapter(reward_model.model, reward_model.adapter):
        return train_loop(reward_model.parameters(), step_loss, steps, learning_rate, adam_eps, max_grad_norm,
                          accelerator=accelerator, on_step=on_step)
