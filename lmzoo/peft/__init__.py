"""Parameter-efficient fine-tuning: LoRA, P-tuning v2 and prompt tuning, as modules that
attach to the decoder. Their files (PEFT's format) are read and written by lmzoo.formats.peft.

    add_lora(model, LoraConfig(r=8, targets=("q", "v")))   # wrap, freeze the rest
    add_virtual(model, PrefixConfig(n_virtual=32))         # or P-tuning v2 (PromptConfig: prompt tuning)
"""

from __future__ import annotations

from .lora import LoraConfig, LoRALinear, add_lora, lora_modules, merge_lora, strip_lora, trainable_report, unmerge_lora
from .prefix import PrefixConfig, PrefixEncoder, PromptConfig, PromptEncoder, add_virtual

__all__ = ["LoraConfig", "LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "strip_lora", "lora_modules",
           "trainable_report", "PrefixConfig", "PromptConfig", "PrefixEncoder", "PromptEncoder", "add_virtual"]
