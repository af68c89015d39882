"""The in-process transformers backend: one base model, one serving copy per version with its adapter merged.

Why merged copies: serving a LoRA adapter unmerged costs two extra small matmuls per linear layer at every token;
merged, a version runs at the base model's speed (bench/serving.py prints both). A copy per version also lets the
item sampler and an on-demand answer (Demo, /api/generate) use different versions at once without switching adapters
under a lock. The cost is one model's memory per served version (SmolLM2-135M: ~0.5 GB in fp32, ~0.4 GB with its
linear weights in bf16 under bf16 autocast); the app's PolicyService bounds how many it keeps and drops the rest, and
large models belong on the OpenAI-compatible backend (vLLM keeps one base and many adapters).
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from app.generation.backend import ItemRequest, group_requests
from learner.errors import ModelError
from learner.model import Device, cast_linear_weights, keep_lora_sums_fp32, load_base_model, load_tokenizer
from learner.sampling import SampledAnswer, SamplingParams, sample_many, stream_answer

# peft reads transformers' deprecated `is_gradient_checkpointing` on every adapter it loads: one FutureWarning in the
# admin's terminal at the first deploy, meant for whoever upgrades the libraries. Only that notice is silenced
# (a filter for the process, not a catch_warnings block: that swaps the filters of every thread while it runs).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class TransformersBackend:
    def __init__(self, model_path: Path, device: Device, merge: bool = True, cast: bool = True):
        self.model_path = model_path
        self.device = device
        # False: serve the adapter unmerged (bench/serving.py measures the difference). Only fp32 weights merge
        # (`Device.merges_for_sampling`): merged into bf16 weights (a GPU) a young adapter's changes round away.
        self.merge = merge and device.merges_for_sampling
        # fp32 weights under bf16 autocast (a CPU with native bf16): merged copies keep their linear weights in bf16,
        # the values autocast would cast them to at every token, cast once (`learner.model.cast_linear_weights`).
        # cast False: keep them as loaded (bench/serving.py measures the difference).
        self.cast = device.casts_weights if cast and self.merge else None
        self.tokenizer = load_tokenizer(model_path)
        self.base = load_base_model(model_path, device)  # what every serving copy is copied from: kept as loaded
        self._version0 = self._serving_base()
        self._models: dict[int, torch.nn.Module] = {0: self._version0}
        self._adapters: dict[int, Path] = {}
        self._lock = threading.Lock()  # guards the dicts; generation itself runs outside it

    def load_version(self, version: int, adapter_dir: Path | None) -> None:
        if version == 0:
            return
        with self._lock:
            if version in self._models:
                return
        if adapter_dir is None or not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise ModelError(f"version {version}: {adapter_dir} holds no LoRA adapter (adapter_config.json missing)")
        model = self._build(Path(adapter_dir))
        with self._lock:
            self._models.setdefault(version, model)
            self._adapters[version] = Path(adapter_dir)

    def drop_version(self, version: int) -> None:
        if version == 0:
            return
        with self._lock:
            self._models.pop(version, None)
            self._adapters.pop(version, None)

    def loaded_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._models)

    def sample_items(self, requests: Sequence[ItemRequest], params: SamplingParams) -> list[list[SampledAnswer]]:
        out: list[list[SampledAnswer] | None] = [None] * len(requests)
        for (version, k), indices in group_requests(requests).items():
            with self.device.compute():
                answers = sample_many(self._model(version), self.tokenizer, [requests[i].prompt for i in indices], k,
                                      params, seed=requests[indices[0]].seed)
            for i, item_answers in zip(indices, answers):
                out[i] = item_answers
        return out  # type: ignore[return-value]

    def stream(self, messages: list[dict], params: SamplingParams, version: int,
               seed: int | None = None) -> Iterator[str]:
        model = self._model(version)
        if seed is not None:
            torch.manual_seed(seed)
        yield from stream_answer(model, self.tokenizer, messages, params, self.device.compute)

    def close(self) -> None:
        with self._lock:
            self._models = {0: self._version0}

    # -- internals ------------------------------------------------------------------------------------------------
    def _model(self, version: int) -> torch.nn.Module:
        with self._lock:
            if version not in self._models:
                raise ModelError(f"version {version} is not loaded in the policy backend")
            return self._models[version]

    def _serving_base(self) -> torch.nn.Module:
        """What serves version 0: the base model itself, or with `cast` a copy of it in that dtype (the base stays as
        it was loaded: merging into bf16 weights would round a young adapter's changes away)."""
        return self.base if self.cast is None else self._for_serving(copy.deepcopy(self.base))

    def _for_serving(self, model: torch.nn.Module) -> torch.nn.Module:
        """A merged copy as it is served: with `cast`, its linear weights in that dtype, cast once (a tied output
        layer gets its own bf16 tensor there; the input embeddings keep theirs)."""
        if self.cast is not None:
            cast_linear_weights(model, self.cast)
        return model

    def _build(self, adapter_dir: Path) -> torch.nn.Module:
        """A serving copy of the base with the adapter applied (merged into the weights unless `merge` is off)."""
        from peft import PeftModel

        try:
            serving = copy.deepcopy(self.base)
            if self.merge:
                _untie_output(serving)
            model = PeftModel.from_pretrained(serving, adapter_dir, is_trainable=False)
            if self.merge:
                model = self._for_serving(model.merge_and_unload())  # merged in the base's fp32, then cast once
            else:
                keep_lora_sums_fp32(model, self.device)
        except Exception as exc:  # peft/safetensors raise many types for a broken adapter; name the directory
            raise ModelError(f"the adapter in {adapter_dir} could not be loaded: {type(exc).__name__}: {exc}") from exc
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model


def _untie_output(model: torch.nn.Module) -> None:
    """Give the output layer its own copy of tied input embeddings, so merging an adapter on `lm_head` changes the
    outputs only, as serving the adapter unmerged does (merged into a tied weight it would change the inputs too)."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and inputs is not None and output.weight is inputs.weight:
        output.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False  # what the copy now is (peft warned at every merge otherwise)
