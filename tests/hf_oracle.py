"""Tiny random transformers models, saved as HF directories: the oracle for parity tests."""

import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)


def tiny_hf_model(model_type: str, **overrides):
    """A random transformers model of `model_type` whose weights are all non-trivial."""
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms and biases start at 1 and 0; randomise them so they are tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def ids(batch=2, length=24, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
