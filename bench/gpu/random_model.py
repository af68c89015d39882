"""SmolLM2-135M's architecture and tokenizer with seeded random weights, where the converted model cannot travel
(98 MB GGUF, 64 MiB per device call): step and sampling times are those of the real shapes; answers run to
max_new_tokens (random weights rarely pick EOS), so sampling figures are upper bounds per item.

    python bench/gpu/random_model.py SRC DST   # SRC: a converted model directory without its weights
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, dirs_exist_ok=True)  # config, tokenizer, chat template, prefloop_base.json
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
print("random SmolLM2-shaped model:", sum(p.numel() for p in model.parameters()), "parameters ->", dst)
