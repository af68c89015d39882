"""Version directories that travel: portable base names, model cards, and the reward model in transformers' format."""

import json
import re
import shutil

import pytest
import torch
from test_round import TINY, write_snapshot

from learner.config import RoundConfig
from learner.model import (
    BASE_INFO_FILE,
    SMOLLM2_BASE,
    Device,
    base_model_info,
    load_base_model,
    resolve_model,
)
from learner.model_card import version_card
from learner.reward import (
    HF_INFO_FILE,
    attach_reward_model,
    save_hf_reward_adapter,
    save_reward_model,
    score,
)
from learner.round import run_round

CPU = Device(torch.device("cpu"), torch.float32)
ADAPTER_DIRS = ("adapter", "reward", "reward-hf")


@pytest.fixture(scope="module")
def version(tmp_path_factory, tiny_model_dir):
    """Version 1 of a DPO round on the tiny model (whose directory has no hub id: its name is the portable name)."""
    root = tmp_path_factory.mktemp("travel")
    run_round(write_snapshot(root / "snapshot"), tiny_model_dir, None, root / "v1", RoundConfig.from_dict(TINY))
    return root / "v1"


def front_matter(card: str) -> dict[str, str | list[str]]:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "no YAML front matter"
    fields: dict = {}
    key = ""
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            fields[key].append(line[2:])
        else:
            key, _, value = line.partition(":")
            fields[key] = json.loads(value) if value.strip().startswith('"') else (value.strip() or [])
    return fields


def test_adapters_name_their_base_portably_and_prefloop_still_loads_them(version, tiny_model_dir):
    from peft import PeftModel

    from app.generation.transformers_backend import TransformersBackend

    for name in ADAPTER_DIRS:
        config = json.loads((version / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == tiny_model_dir.name, name
    for path in version.rglob("*"):
        if path.suffix in (".json", ".md"):
            assert str(tiny_model_dir) not in path.read_text(), f"{path} holds the local path of the base"
    # PeftModel.from_pretrained(model, dir) ignores the name: the adapter goes onto the base already in memory.
    model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, CPU), str(version / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.disable_adapter():
        before = model(ids).logits
    assert not torch.allclose(model(ids).logits, before)
    backend = TransformersBackend(tiny_model_dir, CPU)
    backend.load_version(1, version / "adapter")
    assert backend.loaded_versions() == [0, 1]


def test_the_version_card_names_data_metrics_with_n_gate_config_and_loading(version, tiny_model_dir):
    metrics = json.loads((version / "metrics.json").read_text())
    card = (version / "README.md").read_text()
    fields = front_matter(card)
    assert fields["base_model"] == tiny_model_dir.name and fields["library_name"] == "peft"
    assert fields["tags"] == ["prefloop", "dpo", "lora"]
    for key in ["reward_heldout_accuracy", "policy_heldout_accuracy", "win_rate_vs_parent", "win_rate_vs_base"]:
        figure = metrics[key]
        low, high = figure["ci95"]
        assert f"| {figure['value']:.3f} | {figure['n']} | [{low:.3f}, {high:.3f}] |" in card, key
    assert f"| human labels that trained the policy (within max_label_staleness) | {metrics['labels_used']} |" in card
    assert "parent: the base model (version 0)" in card and "the gate passed" in card
    assert "| `beta` | `0.1` |" in card and "| `algorithm` | `\"dpo\"` |" in card
    assert 'PeftModel.from_pretrained(base, "path/to/this/version/adapter")' in card
    assert "is the name of the local base model directory" in card  # no hub id known for the tiny model
    for name in ADAPTER_DIRS:
        assert front_matter((version / name / "README.md").read_text())["base_model"] == tiny_model_dir.name


def test_a_refused_version_says_why_and_what_was_not_measured():
    metrics = {"status": "rejected", "algorithm": "kto", "parent_version": 3,
               "gate": {"passed": False, "reason": "KL to reference 9.1 > max_kl 5", "win_rate_check": None},
               "reward_heldout_accuracy": None, "win_rate_vs_parent": {"value": None, "n": 0, "ci95": [0, 1]},
               "warnings": ["KTO weights: desirable share 0.9"]}
    base = base_model_info_from(SMOLLM2_BASE)
    card = version_card("4", base, metrics, {"algorithm": "kto", "beta": 0.1}, {}, reward_bias=None)
    fields = front_matter(card)
    assert fields["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and fields["license"] == "apache-2.0"
    assert fields["tags"] == ["prefloop", "kto", "lora"]
    assert "parent: version 3" in card and "refused: KL to reference 9.1 > max_kl 5" in card
    assert "| win-rate vs the parent on eval prompts (reward model as judge) | not measured | 0 | - |" in card
    assert "- KTO weights: desirable share 0.9" in card and "dequantized" in card


def base_model_info_from(info: dict):
    from learner.model import BaseModelInfo

    return BaseModelInfo(info["name"], info["license"], info["note"])


def test_base_names_come_from_the_converted_model_the_config_the_cache_or_the_directory(tmp_path, tiny_model_dir):
    # The default model, converted before prefloop wrote BASE_INFO_FILE: resolve_model adds it without converting.
    converted = tmp_path / "models" / "smollm2"
    shutil.copytree(tiny_model_dir, converted)
    assert resolve_model("smollm2", tmp_path / "models") == converted
    assert json.loads((converted / BASE_INFO_FILE).read_text()) == SMOLLM2_BASE
    info = base_model_info(converted)
    assert (info.name, info.license, info.is_hub_id) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", True)
    # A hub snapshot in the HF cache: the repo id from the folder name, the license from its model card.
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\ntags: [chat]\n---\n# tiny chat\n")
    assert (base_model_info(snapshot).name, base_model_info(snapshot).license) == ("acme/tiny-chat", "mit")
    # A local directory whose config carries a hub id (saved by transformers 4), and one that does not.
    named = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, named)
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "acme/base-7b"}))
    assert base_model_info(named).name == "acme/base-7b"
    (named / "config.json").write_text(json.dumps({**config, "_name_or_path": "/home/x/models/base"}))
    assert (base_model_info(named).name, base_model_info(named).is_hub_id) == ("my-model", False)


def _random_reward_model(model, tokenizer, seed: int = 1):
    """A reward model whose LoRA and head (bias included) are far from their zero start, as after training."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora, adapter_name="policy")
    reward = attach_reward_model(peft_model, tokenizer, max_length=96, lora_config=lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and ".reward." in name:
                param.normal_(0.0, 0.3)
        reward.head.weight.normal_(0.0, 1.0)
        reward.head.bias.fill_(0.75)
    return reward


def test_the_reward_model_in_transformers_format_scores_as_prefloop_does(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = _random_reward_model(load_base_model(tiny_model_dir, CPU), tiny_tokenizer)
    save_reward_model(reward, tmp_path / "reward", pairs_trained=5, base_name="tiny")
    info = save_hf_reward_adapter(tmp_path / "reward", tmp_path / "reward-hf", tiny_tokenizer, "tiny")
    assert json.loads((tmp_path / "reward-hf" / HF_INFO_FILE).read_text()) == info
    assert info["score_bias"] == pytest.approx(0.75) and info["pad_token_id"] != tiny_tokenizer.eos_token_id

    prompts = ["Tell me one fact about 7.", "Name a colour.", "What is 2 + 2?"]
    answers = ["Seven is prime, and it is also the number of days in a week.", "Blue.", "4, cut off at max_new"]
    ended = [True, True, False]
    expected = score(reward, prompts, answers, ended=ended)

    # As the card says: the saved tokenizer, its pad_token_id, the adapter; right-padded batches.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "reward-hf")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(model, str(tmp_path / "reward-hf")).eval()
    rows = []
    for prompt, answer, end in zip(prompts, answers, ended):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        rows.append(tokenizer(text + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * end)
    batch = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right" and batch["input_ids"].shape[1] > min(len(r) for r in rows)
    with torch.no_grad():
        logits = model(**batch).logits[:, 0]
    assert (logits + info["score_bias"]).tolist() == pytest.approx(expected, abs=1e-4)

    # The pad token matters: padded with the eos (SmolLM2's own pad), the answers that ended would be read one token
    # early, before the eos prefloop scores.
    model.config.pad_token_id = tokenizer.eos_token_id
    with torch.no_grad():
        wrong = model(**batch).logits[:, 0] + info["score_bias"]
    assert wrong[0].item() != pytest.approx(expected[0], abs=1e-3)


def test_a_reward_only_round_from_a_portable_version_warm_starts_and_stays_portable(version, tmp_path,
                                                                                     tiny_model_dir):
    metrics = run_round(write_snapshot(tmp_path / "snapshot", parent_version=1), tiny_model_dir, version,
                        tmp_path / "v2", RoundConfig.from_dict(dict(TINY, algorithm="reward", eval_prompts=0)))
    assert metrics["reward_warm_start"] is True
    for name in ADAPTER_DIRS:
        config = json.loads((tmp_path / "v2" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == tiny_model_dir.name, name
    assert (version / "adapter/adapter_model.safetensors").read_bytes() == (
        tmp_path / "v2/adapter/adapter_model.safetensors").read_bytes()
    card = (tmp_path / "v2" / "README.md").read_text()
    assert front_matter(card)["tags"] == ["prefloop", "reward-model", "lora"] and "parent: version 1" in card
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["base_model"] == tiny_model_dir.name
