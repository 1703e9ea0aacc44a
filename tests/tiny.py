"""A tiny random SmolLM2-shaped model with the real SmolLM2 tokenizer, saved as a HF directory:
fast end-to-end runs of the CLI (fine-tuning, torchrun, compare-peft) in tests."""

import json

import torch

import lmzoo
from lmzoo.formats.gguf_file import read_gguf
from lmzoo.formats.tokenizer import Tokenizer
from lmzoo.train.tasks import dates


def smollm_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf(lmzoo.default_model_path(), load_tensors=False).metadata, "smollm2")


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    sizes = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=256, init_std=0.3)
    return lmzoo.from_config(lmzoo.preset("smollm2-135m").replace(**{**sizes, **overrides}))


def tiny_dir(path, **overrides) -> str:
    lmzoo.save_hf_dir(tiny_model(**overrides), path, smollm_tokenizer())
    return str(path)


def date_data(path, n: int, seed: int) -> str:
    train, _ = dates.make(n_train=n, n_test=1, seed=seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    return str(path)
