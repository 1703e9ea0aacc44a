"""The training loss at the head: next-token cross-entropy that never holds [tokens, vocab] logits.

Decoder.loss hands over the labelled rows' hidden states h [N, d], the head's weight W [vocab, d]
and the targets y. Full logits of a [4, 256] batch over a 49k vocabulary are 200 MB in fp32, and
their gradient as much again. ChunkedHeadCrossEntropy makes them a piece at a time and computes
the gradients while each piece is at hand, so backward has nothing left to do. It goes through
the logits in one of two orders:

- A trainable head (full fine-tuning) takes a chunk of rows at a time, over the whole vocabulary.
  Each row's softmax is then complete when its chunk is done, and W's gradient can take it.
- A frozen head (LoRA, P-tuning v2) needs only h's gradient, softmax(h W^T) W - W[y]. That is
  attention with h as the queries and W's rows as the keys and values, so it is computed the way
  flash attention computes attention: a slice of the vocabulary at a time, keeping each row's
  running max and sum, and rescaling what was summed whenever the max grows. A slice of W
  (4096 x 576, 9 MB) stays in cache while a block of 1024 rows uses it; in the row order, every
  165 rows read all of W (113 MB) again. Measured on 1020 rows of SmolLM2 here: the head's
  products ran at 206 instead of 184 GFLOP/s, and the head took 595 instead of 669 ms of a
  LoRA or P-tuning v2 step (bf16: 330 instead of 372 ms).
"""

from __future__ import annotations

import torch

from .linear import g_w, uses_onednn, x_wt


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """scale * sum_i cross_entropy(h_i W^T, y_i) over rows h [N, d], with its gradients. For a
    plain loss.backward() the gradient handed back is the accumulated one itself: no copy of a
    [vocab, d] matrix. Equals F.cross_entropy(reduction="sum") * scale up to fp32 summation order."""

    # A trainable head's chunk: [256, vocab] fp32 logits, 48 MB for a 49k vocabulary. 1024 rows
    # run the head's products a little faster (about 2% of a fine-tuning step here) for 144 MB
    # more peak memory. oneDNN's products (fp32) write a fresh output per chunk, so there a chunk
    # keeps its logits under 31 MB (165 rows here): glibc maps anything over 32 MB straight from
    # the OS, and a fresh 48 MB chunk page-faulted 49k times a step (the head took the same time
    # at 160 rows).
    rows = 256
    # A frozen head's blocks: [1024, 4096] fp32 logits, 16 MB (see the top).
    frozen_rows = 1024
    vocab_slice = 4096

    @staticmethod
    def forward(ctx, h, weight, y, scale=1.0):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if want_w:
            total, grad_h, grad_w = _rows_at_a_time(h, weight, y, scale, want_h)
        else:
            (total, grad_h), grad_w = _vocabulary_slices(h, weight, y, scale, want_h), None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_total.item() != 1.0:  # loss.backward() hands 1: then the gradients are final
            grad_h = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_total
        return grad_h, None if grad_w is None else grad_w.to(ctx.weight_dtype), None, None


def _rows_at_a_time(h, weight, y, scale, want_h):
    """The trainable head's order: (sum of losses, scale * h's gradient or None, scale * W's
    gradient in fp32), `rows` rows at a time."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    # the first chunk writes grad_w whole (beta=0 below); with no rows at all it stays zero
    grad_w = (torch.empty_like if len(h) else torch.zeros_like)(weight, dtype=torch.float32)
    # In fp32 on a CPU, oneDNN makes each chunk's logits (lmzoo.nn.linear): faster than MKL's
    # product, even into a fresh output. Otherwise one logits buffer serves every chunk: a
    # fresh one per chunk would be new memory each time (large blocks come straight from the
    # OS, page by page: in bf16, where each chunk also has an fp32 copy and a bf16 gradient,
    # those page faults cost ~4% of a LoRA step).
    onednn = uses_onednn(h, weight)
    rows = ChunkedHeadCrossEntropy.rows
    if onednn:  # fresh logits of at most 31 MB, which glibc serves from its heap (see `rows`)
        rows = min(rows, max(64, (31 << 20) // (4 * weight.shape[0])))
    n = min(rows, h.shape[0])
    buffer = None if onednn else h.new_empty(n, weight.shape[0])
    buffer32 = buffer if h.dtype == torch.float32 else buffer.new_empty(n, weight.shape[0], dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        hc, yc = h[i:i + rows], y[i:i + rows]
        if onednn:
            logits = p = g = None  # the last chunk's logits go before this one's are made
            logits = x_wt(hc, weight)
        else:
            logits = torch.matmul(hc, weight.t(), out=buffer[:len(yc)])
            logits = buffer32[:len(yc)].copy_(logits) if buffer32 is not buffer else logits
        target = logits.gather(1, yc[:, None]).squeeze(1)
        # logsumexp by hand, in place: logits.logsumexp() would make a second [rows, vocab] tensor
        top = logits.amax(-1, keepdim=True)
        p = logits.sub_(top).exp_()
        norm = p.sum(-1, keepdim=True)
        total += (top.squeeze(1) + norm.log().squeeze(1) - target).sum()
        g = p.div_(norm)  # d loss / d logits = softmax - one_hot
        g[torch.arange(len(yc), device=g.device), yc] -= 1
        g = buffer[:len(yc)].copy_(g) if g.dtype != h.dtype else g  # back to h's dtype, in place
        if want_h and onednn:
            torch.mul(g_w(g, weight), scale, out=grad_h[i:i + len(yc)])
        elif want_h:
            out = grad_h[i:i + len(yc)]
            torch.addmm(out, g, weight.to(h.dtype), beta=0, alpha=scale, out=out)
        first = 0 if i == 0 else 1  # beta: the first chunk writes grad_w, the others add to it
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.t(), hc, beta=first, alpha=scale)  # in place: no [vocab, d] temporary
        else:  # a bf16 g with an fp32 grad_w: no mixed-dtype addmm
            chunk = (g.t() @ hc).float()
            grad_w.add_(chunk, alpha=scale) if first else torch.mul(chunk, scale, out=grad_w)
    return total, grad_h, grad_w


def _vocabulary_slices(h, weight, y, scale, want_h):
    """The frozen head's order (see the top): (sum of losses, scale * h's gradient or None), for
    blocks of `frozen_rows` rows, each over the vocabulary a `vocab_slice` at a time."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    rows, size = ChunkedHeadCrossEntropy.frozen_rows, ChunkedHeadCrossEntropy.vocab_slice
    for i in range(0, len(h), rows):
        hb, yb = h[i:i + rows], y[i:i + rows]
        n = len(yb)
        top = torch.full((n,), -torch.inf, device=h.device)  # each row's largest logit so far
        norm = torch.zeros(n, device=h.device)  # sum of exp(logit - top) so far
        summed = torch.zeros(n, h.shape[1], device=h.device) if want_h else None  # of exp(logit - top) * W's row
        target = torch.zeros(n, device=h.device)  # each row's target logit, from the slice holding it
        for j in range(0, weight.shape[0], size):
            w = weight[j:j + size]
            logits = x_wt(hb, w).float()
            here = (yb >= j) & (yb < j + len(w))  # a mask, not indices: no host sync on a GPU
            target = torch.where(here, logits.gather(1, (yb - j).clamp(0, len(w) - 1)[:, None]).squeeze(1), target)
            new_top = torch.maximum(top, logits.amax(-1))
            shrink = (top - new_top).exp_()  # puts what was summed under the old max under the new one
            p = logits.sub_(new_top[:, None]).exp_()
            norm.mul_(shrink).add_(p.sum(-1))
            if want_h:
                summed.mul_(shrink[:, None]).add_(g_w(p.to(h.dtype), w))
            top = new_top
        total += (top + norm.log() - target).sum()
        if want_h:  # softmax(h W^T) W - W[y]
            grad_h[i:i + n] = summed.div_(norm[:, None]).sub_(weight[yb]).mul_(scale)
    return total, grad_h
