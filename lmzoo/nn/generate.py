"""Generation: prefill the prompt into a static KV cache, then decode one token at a time.

Prompts of different lengths are left-padded into one batch; the attention mask hides the
padding and positions count real tokens only, so each row decodes as if it were alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import LmzooError

# The decode step of a model not prepared for inference: model -> a step, or None to decode eagerly.
# lmzoo.infer.compiled sets it (its compiled step, built once per model layout); nn sits below infer
# and cannot import it.
default_decode_step = None


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, else top-k/top-p sampling.
    Temperatures below 1e-5 are greedy too: dividing by them can overflow to inf, and NaN odds."""
    if temperature < 1e-5:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Token lists of different lengths -> (ids [B, T], attention_mask [B, T]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmzooError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           stop_tokens: Sequence[int] | None = None, seed: int | None = None,
           prefix_len: int | None = None, compile: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] step by step until every row has stopped.

    A row stops after emitting a stop token; later steps yield `-1` for it. With prefix_len
    (or a prefix-LM config) the prompt is encoded bidirectionally, then decoding is causal.
    compile=False: never the default compiled step (see default_decode_step) for this call.
    """
    c = model.config
    B, T = input_ids.shape
    n_virtual = model.virtual.n_virtual if model.virtual is not None else 0
    if n_virtual + T > c.context_limit:
        virtual = f"{n_virtual} virtual tokens + " if n_virtual else ""
        raise LmzooError(f"prompt of {virtual}{T} tokens is longer than the model's context of "
                         f"{c.context_limit} tokens")
    max_new_tokens = min(max_new_tokens, c.context_limit - T - n_virtual)  # the context is a hard wall
    device = model.tok_emb.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=device)
    cache = model.new_cache(B, T + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    # A model prepared with compile=True decodes through its compiled step (lmzoo.infer.compiled); one
    # prepared without it (decode_step False) eagerly; a plain one through the default step, if any.
    step = getattr(model, "decode_step", None)
    if step is None and compile and default_decode_step is not None:
        step = default_decode_step(model)
    step = step or (lambda ids, cache: model(ids, cache=cache))
    # The prompt's logits are needed at its last position only: apply the head there alone.
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, cache=cache, prefix_len=prefix_len)
    logits = model.lm_head(hidden[:, -1])
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(done, -1)
        yield token
        if len(stops):  # without stop tokens no row ever stops: no check, no host sync
            done = done | torch.isin(token, stops)
            if bool(done.all()):
                return
        if i == max_new_tokens - 1:  # the last token's own step would only fill the cache's last slot
            return
        # Positions continue from the cache's record of real tokens, so padded rows stay aligned.
        logits = step(token.clamp(min=0)[:, None], cache)[:, -1]


def generate(model, input_ids, max_new_tokens: int = 64, *, pad_id: int | None = None, **options):
    """Prompt + new tokens. Greedy when temperature is 0 (the default).

    input_ids: LongTensor [B, T] (every row the same length), or a list of token lists of
               different lengths, which are left-padded into one batch.
    Returns a LongTensor [B, T + n] for tensor input (rows that stopped early are filled with
    pad_id, default the first stop token or 0), or a list of token lists for list input.
    options: temperature, top_k, top_p, stop_tokens, seed, attention_mask, prefix_len, compile.
    """
    stop_tokens = options.get("stop_tokens") or []
    fill = pad_id if pad_id is not None else (min(stop_tokens) if stop_tokens else 0)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        out = [input_ids.cpu()]
        for token in stream(model, input_ids, max_new_tokens, **options):
            out.append(token.cpu().masked_fill(token.cpu() < 0, fill)[:, None])
        return torch.cat(out, dim=1)
    prompts = [list(p) for p in input_ids]
    ids, mask = left_pad(prompts, fill)
    new: list[list[int]] = [[] for _ in prompts]
    for token in stream(model, ids, max_new_tokens, attention_mask=mask, **options):
        for row, t in enumerate(token.tolist()):
            if t >= 0:
                new[row].append(t)
    return [p + n for p, n in zip(prompts, new, strict=True)]
