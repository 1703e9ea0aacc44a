"""The one decoder: embeddings -> blocks -> final norm -> head. Every family runs through it.

Read top to bottom: a block is attention and MLP, each wrapped in a norm and a residual; the
config decides where the norm sits, how positions enter, and how each sublayer is shaped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import Config
from ..errors import LmzooError
from .attention import Attention, Step
from .cache import KVCache
from .head_loss import ChunkedHeadCrossEntropy
from .linear import Linear, is_plain_linear
from .local_attention import plan_for
from .masks import Visibility, build_mask, prefix_end_slots, reach_of, with_virtual
from .mlp import MLP, MoE
from .recompute import recomputed
from .rope import rope_tables


def logn_scale(positions: torch.Tensor, trained_len: int) -> torch.Tensor:
    """Qwen1's logn attention: a query at position p > trained_len is scaled by log_{trained_len}(p+1)."""
    p = positions.float() + 1
    scale = torch.where(p > trained_len, p.log() / math.log(trained_len), torch.ones_like(p))
    return scale[:, None, :, None]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 so bf16 models normalise as precisely as fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op, the same numbers
        return rms_norm(x, self.weight, self.eps)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(weight * normalised x, 1/rms per row), as Llama's reference computes it: the statistics in
    fp32, the normalised x rounded to x's dtype (bf16, fp16), then times the weight."""
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    xn = x32 * r if x32 is x else x32.mul_(r)  # in place only on our own fp32 copy, never on x
    return weight * xn.to(x.dtype), r


class RMSNormFunction(torch.autograd.Function):
    """rms_norm with a hand-written backward that keeps only x and the per-row scale. In bf16,
    autograd of those five ops kept fp32 copies of x, ~190 MB of a bf16 LoRA step's peak here. In
    fp32 the fused F.rms_norm's backward is a chain of autograd ops: 2.8-3.0 ms per [4, 256, 576]
    forward + backward here, against 0.6-1.4 ms for this one. The forward numbers are those of
    RMSNorm without gradients (F.rms_norm in fp32), so a norm recomputed in backward has the same
    bits; gradients within the dtype's rounding."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            y = F.rms_norm(x, (x.shape[-1],), weight, eps)
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # backward's row scale
        else:
            y, r = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        xhat = x * r  # fp32 (r is fp32): x.float() * r without the copy
        g = (dy * weight).to(x.dtype).float()  # d loss / d (normalised x), rounded as autograd would
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (dy * xhat.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        # d/dx of x * r(x) with r = (mean(x^2) + eps)^-1/2:  r * (g - xhat * mean(g * xhat))
        dot = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(dot)).mul_(r).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


def make_norm(c: Config) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(c.d_model, c.norm_eps)
    return nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.norm_bias)


class Block(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.norm_position = c.norm_position
        self.alpha = c.residual_scale
        self.attn_norm = make_norm(c)
        self.attn = Attention(c, layer)
        self.mlp_norm = make_norm(c)
        self.mlp = MoE(c) if c.n_experts else MLP(c)
        if c.post_sublayer_norm:
            self.attn_post_norm = make_norm(c)
            self.mlp_post_norm = make_norm(c)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        x = self.sublayer(x, lambda h: self.attn(h, step, layer), self.attn_norm, getattr(self, "attn_post_norm", None))
        return self.sublayer(x, self.mlp, self.mlp_norm, getattr(self, "mlp_post_norm", None))

    def sublayer(self, x, f, norm, post_norm):
        """One residual sublayer, with the norm where the config puts it."""
        if self.norm_position == "post":  # GPT-1: normalise after the add
            return norm(x + f(x))
        h = norm(x)
        with recomputed(h, lambda: norm(x)):  # the norm keeps x anyway; h is one cheap op away
            out = f(h)
        if post_norm is not None:  # GLM-4: normalise the sublayer's output too
            out = post_norm(out)
        if self.norm_position == "deepnorm":  # GLM v1: the residual is the normed input, scaled
            return self.alpha * h + out
        return x + out  # pre-norm (GPT-2 onwards): the residual stream itself is never normalised


class Decoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.final_norm = make_norm(c) if c.final_norm else nn.Identity()
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        # Windowed and sparse layers attend chunk by chunk over the keys their pattern keeps
        # (lmzoo.nn.local_attention); False: always the masked dense path, the reference it is tested against.
        self.local_attention = True
        self.virtual: nn.Module | None = None  # prompt tuning or P-tuning v2 encoder (lmzoo.peft.prefix)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        c = self.config
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm scales
                nn.init.ones_(p)
            else:
                std = c.init_std
                if c.scaled_residual_init and name.endswith(("attn.o.weight", "down.weight")):
                    # GPT-2: each block adds two residual branches; scaling their init by
                    # 1/sqrt(2*n_layers) keeps the variance of the residual sum at one.
                    std = std / math.sqrt(2 * c.n_layers)
                nn.init.normal_(p, mean=0.0, std=std)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prefix_len: int | torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T].

        attention_mask: [B, T] with 0 at padding (as in transformers); padding keys are hidden.
        position_ids:   [B, T]; default: consecutive, starting after the cache (or after the
                        left padding, when attention_mask is given).
        prefix_len:     int or [B]: the first prefix_len tokens see each other both ways.
        cache:          a KVCache; the new keys/values are appended and the cache advances.
        """
        return self.lm_head(self.hidden_states(input_ids, attention_mask=attention_mask,
                                               position_ids=position_ids, prefix_len=prefix_len, cache=cache))

    def hidden_states(self, input_ids, *, attention_mask=None, position_ids=None, prefix_len=None, cache=None):
        """The final-norm output [B, T, d_model], before the head."""
        c = self.config
        B, T = input_ids.shape
        x = self.tok_emb(input_ids)
        fresh = cache is None or cache.length == 0
        virtual = self.virtual
        n_prompt = n_prefix = 0
        prefix_kv = None
        if virtual is not None and virtual.kind == "prompt" and fresh:
            # Prompt tuning: learned embeddings enter in front of the text, as if they were tokens.
            n_prompt = virtual.n_virtual
            x, attention_mask, position_ids, prefix_len = virtual.prepend(x, attention_mask, position_ids, prefix_len)
            T += n_prompt
        elif virtual is not None and virtual.kind == "prefix":
            # P-tuning v2: every layer's attention sees learned keys/values before the text.
            n_prefix = virtual.n_virtual
            if cache is None:
                prefix_kv = virtual.key_values(B)
            elif fresh:
                cache.write_virtual(virtual.key_values(B))
        start = cache.length - cache.n_virtual if cache is not None else 0  # text slots already cached
        if n_prefix + start + T > c.context_limit:
            what = f"{n_prefix} virtual tokens + " if n_prefix else ""
            raise LmzooError(
                f"sequence of {what}{start + T} tokens is longer than the context of {c.context_limit} "
                f"(Config.max_seq_len); shorten the prompt or lower max_new_tokens")
        if cache is not None and cache.length + T > cache.max_len:
            raise LmzooError(f"KV cache holds {cache.max_len} tokens; {cache.length + T} requested")

        key_valid = self._key_validity(attention_mask, cache, T)
        if prefix_len is None and c.lm_type == "prefix" and start == 0:
            prefix_len = self._default_prefix(key_valid, T)
        after_prefix = virtual is not None and virtual.kind == "prefix" and virtual.text_positions == "after"
        shift = n_prefix if after_prefix else 0
        if position_ids is None:
            position_ids = self._default_positions(key_valid, start, T, B, x.device)
        else:
            shift = 0  # the caller's positions are final
        if c.positions == "rope_2d" and position_ids.dim() == 2:
            position_ids = self._with_block_positions(position_ids, prefix_len, cache, start, T)
        if shift:  # PEFT's convention: the text's positions start after the virtual tokens
            if position_ids.dim() == 2:
                position_ids = position_ids + shift
            else:  # GLM: only the first stream is a position; the second counts within the span
                position_ids = torch.stack([position_ids[0] + shift, position_ids[1]])

        rope = query_scale = None
        if c.positions == "learned":
            x = x + self.pos_emb(position_ids)
        elif c.positions.startswith("rope"):
            rope = rope_tables(c, position_ids, seq_len=self._rope_length(key_valid, cache, start, T), dtype=x.dtype)
        if c.logn_attention:
            query_scale = logn_scale(position_ids if position_ids.dim() == 2 else position_ids[0], c.max_seq_len)

        masks = self._masks(start, T, key_valid, prefix_len, x.device, B, n_prefix, cache)
        step = Step(rope=rope, query_scale=query_scale, masks=masks, cache=cache, prefix_kv=prefix_kv)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, step, i, use_reentrant=False)
            else:
                x = block(x, step, i)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x[:, n_prompt:])

    # ------------------------------------------------------------------ helpers
    def _rope_length(self, key_valid, cache, start, T):
        """The length that drives length-dependent rotary scaling. Qwen1's NTK alpha is fixed
        per prompt: each row's real token count at the prefill, kept while
        decoding from the cache; the other scalings follow the current length."""
        if self.config.rope_scaling != "ntk_alpha":
            return start + T
        if cache is not None and start > 0:
            return cache.rope_length
        length = T if key_valid is None else key_valid[:, :T].sum(-1)
        if cache is not None:
            cache.rope_length = length
        return length

    @staticmethod
    def _key_validity(attention_mask, cache, T):
        """Which text slots hold real tokens: [B, start+T], or None when all of them do
        (P-tuning's virtual slots at the front of a cache are always valid, and not counted)."""
        if cache is not None:
            new = attention_mask.bool() if attention_mask is not None else True
            cache.key_valid[:, cache.length:cache.length + T] = new
            if attention_mask is not None and cache.all_valid:  # one host sync, when a mask comes in
                cache.all_valid = bool(attention_mask.bool().all())
            return None if cache.all_valid else cache.key_valid[:, cache.n_virtual:cache.length + T]
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        return attention_mask.bool()

    @staticmethod
    def _default_positions(key_valid, start, T, B, device):
        if key_valid is None:
            return torch.arange(start, start + T, device=device).expand(B, T)
        # Positions count real tokens only, so a left-padded prompt starts at position 0.
        pos = key_valid.long().cumsum(-1) - 1
        return pos[:, start:start + T].clamp(min=0)

    def _default_prefix(self, key_valid, T):
        """A prefix LM reads the whole prompt both ways (minus a span-opening last token)."""
        real = key_valid[:, :T].sum(-1) if key_valid is not None else torch.tensor([T])
        return (real - int(self.config.span_start_token)).clamp(min=0)

    def _with_block_positions(self, positions, prefix_len, cache, start, T):
        """GLM's 2-D positions: over the generated span the first stream stays at the last
        context token (the [gMASK] the span fills) and the second counts 1, 2, ...; over the
        context the second is 0. A cache remembers each row's prefix length for decoding."""
        B = positions.shape[0]
        if cache is not None and start > 0:
            prefix = cache.prefix_len
        elif prefix_len is not None:
            prefix = torch.as_tensor(prefix_len, device=positions.device).expand(B)
        else:
            prefix = torch.full((B,), T, device=positions.device)
        if cache is not None and start == 0:
            cache.prefix_len = prefix
        block = (positions - prefix[:, None] + 1).clamp(min=0)
        positions = torch.minimum(positions, (prefix[:, None] - 1).clamp(min=0))
        return torch.stack([positions, block])

    def _masks(self, start, T, key_valid, prefix_len, device, B, n_virtual=0, cache=None):
        """How each kind of layer attends, keyed (sparse, windowed) and shared by all layers of a kind:
        (mask, is_causal) for SDPA, where mask=None with is_causal says SDPA's own causal mask does the
        job (a rolling cache's mask reads its keys in ring order); or, over a whole sequence, a
        LocalPlan that computes only the keys the pattern keeps (lmzoo.nn.local_attention)."""
        c = self.config
        prefix_end = None
        if prefix_len is not None:
            prefix_len = torch.as_tensor(prefix_len, device=device).expand(B)
            if bool((prefix_len > T).any()) or bool((prefix_len < 0).any()):
                raise LmzooError(f"prefix_len={prefix_len.tolist()} must be between 0 and the sequence length {T}")
            if start > 0:
                raise LmzooError("prefix_len applies to the first chunk only: prefill the whole prefix at once")
            prefix_end = prefix_end_slots(prefix_len, key_valid, T)
        q_slots = torch.arange(start, start + T, device=device)

        def mask_for(sparse: bool, windowed: bool):
            pattern = c.attention_pattern if sparse else "dense"
            window = c.sliding_window if windowed else None
            rules = dict(window=window, pattern=pattern, block=c.sparse_block, summary=c.sparse_summary,
                         prefix_end=prefix_end, key_valid=key_valid)
            ring = rings.get((sparse, windowed))
            ring_keys = cache.ring_keys(ring, T) if ring else None
            if ring_keys is not None:  # a rolling cache: keys in ring order, each read by its slot
                allowed = Visibility(**rules)(q_slots[None, :, None], ring_keys[None, None, :]) & (ring_keys >= 0)
                return with_virtual(allowed[:, None], n_virtual), False
            reach = reach_of(c, sparse, windowed)[0]
            causal = reach is None or start + T <= reach  # the window or pattern hides nothing among so few keys
            if causal and key_valid is None and prefix_end is None and not n_virtual:
                if start == 0:
                    return None, T > 1
                if T == 1:
                    return None, False  # one new query sees every cached key
            if start == 0 and self.local_attention:  # a whole sequence: compute only what the pattern keeps
                plan = plan_for(c, sparse, windowed, T, Visibility(**rules), n_virtual, prefix_end, key_valid)
                if plan is not None:
                    return plan
            return build_mask(q_slots, start + T, n_virtual=n_virtual, **rules), False

        kinds = {(c.is_sparse_layer(i), c.is_window_layer(i)) for i in range(c.n_layers)}
        rings = {} if cache is None else {(c.is_sparse_layer(i), c.is_window_layer(i)): cache.ring[i]
                                          for i in range(c.n_layers)}
        return {kind: mask_for(*kind) for kind in kinds}

    # ------------------------------------------------------------------ conveniences
    def new_cache(self, batch: int, max_len: int | None = None, *, rolling: bool = True) -> KVCache:
        """A cache for `max_len` text tokens (plus any virtual tokens of an attached adapter);
        rolling=False: every layer keeps every slot, in order (no ring buffers, see lmzoo.nn.cache)."""
        p = self.tok_emb.weight
        extra = self.virtual.n_virtual if self.virtual is not None else 0
        prefix = extra if extra and self.virtual.kind == "prefix" else 0  # P-tuning v2's own slots in front
        return KVCache(self.config, batch, (max_len or self.config.context_limit) + extra, dtype=p.dtype,
                       device=p.device, virtual=prefix, rolling=rolling)

    def generate(self, input_ids, max_new_tokens: int = 64, **kwargs):
        """Prompt + new tokens; see lmzoo.nn.generate.generate for the options."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss of the MoE layers from the last training forward pass."""
        losses = [b.mlp.aux_loss for b in self.blocks if getattr(b.mlp, "aux_loss", None) is not None]
        return torch.stack(losses).mean() if losses else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def loss(self, input_ids, labels=None, *, prefix_len=None, reduction="mean", scale=1.0,
             **kwargs) -> torch.Tensor:
        """Next-token cross-entropy over labelled positions (label -100 is ignored); mean or sum,
        times `scale`. Without labels every token is a target, except a prefix LM's prefix, which
        is context. A training loop's normalisation belongs in `scale`: multiplied in afterwards,
        it would make backward copy the head's gradient to scale it."""
        if labels is None:
            labels = input_ids.clone()
            if prefix_len is not None:
                end = torch.as_tensor(prefix_len, device=input_ids.device).expand(input_ids.shape[0])
                labels[torch.arange(input_ids.shape[1], device=input_ids.device)[None] < end[:, None]] = -100
            if kwargs.get("attention_mask") is not None:
                labels[kwargs["attention_mask"] == 0] = -100
        if prefix_len is None and self.config.lm_type == "prefix":
            # A prefix LM's context ends where its targets begin: a target must never be seen
            # both ways, or training would read the answer it is asked to predict.
            targeted = labels != -100
            prefix_len = torch.where(targeted.any(1), targeted.int().argmax(1), 0)
        head = self.lm_head
        if not is_plain_linear(head) or head.bias is not None or _is_sharded(head.weight):
            # a LoRA or quantized head, or FSDP (which gathers weights in forward hooks): the plain way
            logits = self(input_ids, prefix_len=prefix_len, **kwargs)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction=reduction)
            return loss if scale == 1 else loss * scale
        # The same loss without ever holding [B, T, vocab] logits: the head runs only on the
        # labelled positions, a chunk of them at a time (see ChunkedHeadCrossEntropy).
        hidden = self.hidden_states(input_ids, prefix_len=prefix_len, **kwargs)[:, :-1].flatten(0, 1)
        targets = labels[:, 1:].flatten()
        keep = targets != -100
        labelled = int(keep.sum())
        if reduction != "sum":  # a mean over no labelled position is 0/0, as F.cross_entropy's
            scale = scale / labelled if labelled else float("nan")
        return ChunkedHeadCrossEntropy.apply(hidden[keep], head.weight, targets[keep], scale)


def _is_sharded(weight: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)
