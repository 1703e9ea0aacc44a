"""Tiny random transformers models, saved as HF directories: the oracle for parity tests."""

import torch
import transformers

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)
MATRIX_STD = 0.1  # see tiny_hf_model


def tiny_hf_model(model_type: str, **overrides):
    """A random transformers model of `model_type` whose weights are all non-trivial.

    Matrices get std 0.1, not transformers' 0.02: at 0.02 these 64-wide models' attention scores
    have a std of ~0.03, attention is nearly uniform, and a position or window defect barely
    moves the logits. Measured on llama (GQA) and mistral (window 7) over 40 tokens: rotary
    positions one too far from the middle on moved the logits by 1.3e-3 at 0.02 and by 1.07 at
    0.1; a window one token too wide moved them by 0.14 and by 2.45. Parity itself holds to
    ~2.5e-6 at 0.1 (the tests' tolerance is 1e-5). test_parity_hf keeps that margin checked."""
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms and biases start at 1 and 0; randomise them so they are tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, MATRIX_STD)
    return model.eval()


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def ids(batch=2, length=24, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def assert_incremental_equals_full(model, chunks, vocab, batch=2):
    """Feeding a sequence through the KV cache in `chunks` gives the full forward's logits."""
    x = torch.randint(0, vocab, (batch, sum(chunks)))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(batch, sum(chunks) + 4)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(x[:, start:start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def assert_round_trip_through_transformers(oracle, tmp_path, length=20, atol=1e-5):
    """lmzoo loads the oracle's directory and saves its own; transformers loads that back as the
    same class with the same logits, and lmzoo reads the same config again. Returns lmzoo's model."""
    import lmzoo

    ours, _ = lmzoo.load(save(oracle, tmp_path / "a"))
    lmzoo.save_hf_dir(ours, tmp_path / "b")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    assert type(reloaded) is type(oracle)
    x = ids(length=length)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, oracle(x).logits, atol=atol, rtol=0)
        torch.testing.assert_close(ours(x), oracle(x).logits, atol=atol, rtol=0)
    again, _ = lmzoo.load(tmp_path / "b")
    assert again.config == ours.config
    return ours
