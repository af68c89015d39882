import itertools

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.reward import (
    attach_reward_model,
    items_from_pairs,
    load_reward_model,
    pair_accuracy,
    save_reward_model,
    score,
    train_reward_model,
    trained_pairs,
)
from learner.train import use_adapter

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def ranking_pairs(n_items: int) -> pd.DataFrame:
    """Rankings of 3 answers where the best answer always says yes and the worst no: an obvious feature."""
    rows = []
    for i in range(n_items):
        ranked = [f"yes yes yes, {i}", f"perhaps {i}", f"no no no, {i}"]  # best first
        for (a, chosen), (b, rejected) in itertools.combinations(enumerate(ranked), 2):
            rows.append({"ranking_id": f"r{i}", "item_id": f"item{i}", "prompt": f"Question {i}?",
                         "chosen_answer_id": f"a{i}-{a}", "chosen": chosen, "rejected_answer_id": f"a{i}-{b}",
                         "rejected": rejected, "chosen_rank": a + 1, "rejected_rank": b + 1, "policy_version": 0})
    return pd.DataFrame(rows)


def peft_model(model):
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(**LORA), adapter_name="policy")


def test_items_group_all_pairs_of_a_ranking():
    items = items_from_pairs(ranking_pairs(2))
    assert [i.item_id for i in items] == ["item0", "item1"]
    assert len(items[0].answers) == 3  # answers deduplicated by answer id
    assert items[0].pairs == ((0, 1), (0, 2), (1, 2))


def test_items_keep_each_answers_finish_reason():
    frame = ranking_pairs(1).assign(chosen_finish_reason="eos", rejected_finish_reason="eos")
    frame.loc[frame["rejected_answer_id"] == "a0-2", "rejected_finish_reason"] = "length"
    (item,) = items_from_pairs(frame)
    assert item.ended == (True, True, False)


def test_reward_model_learns_an_obvious_feature(tiny_model, tiny_tokenizer):
    model = peft_model(tiny_model)
    reward_model = attach_reward_model(model, tiny_tokenizer, 64, lora_config=LoraConfig(**LORA))
    head_before = reward_model.head.weight.detach().clone()
    policy_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".policy." in n}
    items = items_from_pairs(ranking_pairs(6))
    result = train_reward_model(reward_model, items, steps=12, batch_items=3, learning_rate=1e-2, adam_eps=1e-5,
                                max_grad_norm=1.0, centering=0.01, seed=0)
    losses = [r["loss"] for r in result.history]
    assert result.failure is None and len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1
    assert not torch.equal(reward_model.head.weight, head_before)
    accuracy = pair_accuracy(reward_model, items)
    assert accuracy.value > 0.8 and accuracy.n == 18 and accuracy.ci95[0] < accuracy.value <= accuracy.ci95[1]
    # Only the reward adapter and head trained; the policy's adapter is untouched and still the active one.
    assert model.active_adapter == "policy"
    assert all(torch.equal(p, policy_before[n]) for n, p in model.named_parameters() if ".policy." in n)


def test_save_and_load_give_identical_scores(tiny_model_dir, tiny_tokenizer, tmp_path):
    from learner.model import Device, load_base_model

    cpu = Device(torch.device("cpu"), torch.float32)
    model = peft_model(load_base_model(tiny_model_dir, cpu))
    reward_model = attach_reward_model(model, tiny_tokenizer, 64, lora_config=LoraConfig(**LORA))
    items = items_from_pairs(ranking_pairs(3))
    train_reward_model(reward_model, items, steps=2, batch_items=2, learning_rate=1e-2, adam_eps=1e-5,
                       max_grad_norm=1.0, centering=0.0, seed=0)
    prompts, answers = ["Question 0?"] * 3, list(items[0].answers)
    before = score(reward_model, prompts, answers)
    save_reward_model(reward_model, tmp_path / "reward", pairs_trained=9)
    assert {"adapter_model.safetensors", "adapter_config.json", "reward_head.safetensors"} <= {
        p.name for p in (tmp_path / "reward").iterdir()}
    assert trained_pairs(tmp_path / "reward") == 9 and trained_pairs(None) == 0

    # Into a fresh base model (standalone), and into another PeftModel beside its policy adapter.
    standalone = load_reward_model(tmp_path / "reward", load_base_model(tiny_model_dir, cpu), tiny_tokenizer, 64)
    assert score(standalone, prompts, answers) == pytest.approx(before, abs=1e-6)
    shared = load_reward_model(tmp_path / "reward", peft_model(load_base_model(tiny_model_dir, cpu)),
                               tiny_tokenizer, 64)
    assert score(shared, prompts, answers) == pytest.approx(before, abs=1e-6)
    assert len(set(before)) == 3  # a trained head gives different answers different scores


def test_a_rankings_answers_score_together_as_each_alone(tiny_model, tiny_tokenizer):
    """A ranking's answers share one copy of their prompt in the forward pass (learner.logprobs.layout): each score
    is the one the answer gets alone, the eos-less (cut) answer included."""
    model = peft_model(tiny_model)
    reward_model = attach_reward_model(model, tiny_tokenizer, 64, lora_config=LoraConfig(**LORA))
    torch.nn.init.normal_(reward_model.head.weight, std=1.0)  # scores far apart enough to tell answers apart
    answers = [("Yes, it is.", True), ("No", True), ("Perhaps, if the sky is clear tonight", False)]
    encoded = [reward_model.encode("Is it blue?", a, ended) for a, ended in answers]
    encoded.append(reward_model.encode("Name a fruit.", "Apple", True))
    with torch.no_grad():
        together = reward_model.rewards(encoded)
        alone = []
        with use_adapter(model, reward_model.adapter):
            for e in encoded:  # the decoder's last hidden state of the answer alone, through the head
                hidden = model.get_base_model().model(input_ids=torch.tensor([e.input_ids])).last_hidden_state
                alone.append(reward_model.head(hidden[0, -1]).squeeze(-1))
        alone = torch.stack(alone)
    assert len(set(together.tolist())) == 4
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
