"""The serving engine: one thread owns the model and runs continuous batching.

HTTP handlers only submit requests and read their events; this loop does all the work:

    loop:  take new requests (while rows are free)
           prefill one chunk of one waiting prompt      <- long prompts never stall the streams
           one decode step for every running row, per model
           finished rows leave; their slots are free for the next request

Rows share a static KV cache per model ([max_batch, max_len] slots, lmzoo.nn.cache). A new
request is prefilled alone, in chunks, into a cache of its own (so its numbers do not depend on
the batch), then its keys and values are copied into a free row, ending at the batch's current
slot. Rows are therefore aligned at their last slot; each row's own padding and gaps are masked
by `key_valid`, and positions are passed per row, so a row decodes exactly as if it were alone.
When the slots run out, each row's valid slots are packed to the end (compaction).

Adapters: every adapter is a model name. P-tuning v2 and prompt tuning change only the prefill
(their virtual keys/values or embeddings end up in the cache), so their rows decode in the base
model's batch, side by side with plain rows. A LoRA adapter is folded into a model of its own
(lmzoo.infer.prepare) whose rows form a batch of their own: LoRA grouped by adapter.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import LmzooError
from ..nn.cache import KVCache
from ..nn.generate import sample

PREFILL_CHUNK = 128  # prompt tokens per engine iteration: a 128-token chunk is ~0.1 s on 2 cores


@dataclass
class Request:
    """One completion: prompt tokens in, events out (see Engine.submit)."""

    prompt: list[int]
    model: str  # the base model's name or an adapter's
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    echo_logprobs: bool = False  # also the log-probabilities of the prompt's tokens (completions' echo)
    emit: Callable[[tuple], None] = print  # called from the engine thread with each event
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # engine state
    generated: int = 0
    next_position: int = 0
    generator: torch.Generator | None = None


@dataclass
class _Prefill:
    request: Request
    cache: KVCache
    done: int = 0  # prompt tokens already run


@dataclass
class _Batch:
    """A model and its rows: a static cache of max_batch rows; rows 0..len(rows)-1 are in use."""

    model: torch.nn.Module
    cache: KVCache
    rows: list = field(default_factory=list)  # Request per row, in row order
    last: torch.Tensor | None = None  # [rows] the token each row feeds next


def _logprob_info(logits: torch.Tensor, token: int, k: int) -> dict:
    logp = logits.float().log_softmax(-1)
    info = {"token": token, "logprob": float(logp[token])}
    if k:
        top = logp.topk(k)
        info["top"] = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return info


class Engine:
    """Continuous batching over one base model, its prefix/prompt adapters and its LoRA models.

    models:   name -> a model prepared for inference that decodes in a batch of its own (the base,
              each LoRA adapter folded in)
    virtual:  name -> (batch name, encoder) for P-tuning v2 / prompt-tuning adapters: prefilled with
              that encoder attached to the batch's model, then decoded in that batch
    """

    def __init__(self, models: dict, virtual: dict, *, max_batch: int = 8, max_context: int = 2048,
                 max_queue: int = 64, spare_slots: int = 256, on_step: Callable | None = None):
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.virtual = virtual
        self.batches = {}
        for name, model in models.items():
            c = model.config
            p = model.tok_emb.weight
            extra = max((enc.n_virtual for b, enc in virtual.values() if b == name), default=0)
            # spare slots for the gaps that joins leave, before a compaction; never past the context
            max_len = min(max_context + extra + spare_slots, c.context_limit)
            _check_servable(c, max_len)
            cache = KVCache(c, max_batch, max_len, dtype=p.dtype, device=p.device, rolling=False)
            cache.all_valid = False  # rows always carry their own gaps: always mask by key_valid
            self.batches[name] = _Batch(model, cache)
        self.waiting: queue.Queue = queue.Queue()
        self.prefilling: list[_Prefill] = []
        self.on_step = on_step or (lambda kind, n: None)
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmzoo-engine", daemon=True)

    # ------------------------------------------------------------------ public
    def names(self) -> list[str]:
        return [*self.batches, *self.virtual]

    def batch_of(self, name: str) -> str:
        return self.virtual[name][0] if name in self.virtual else name

    def context_of(self, name: str) -> int:
        """Tokens a request for `name` may hold in all: prompt + completion."""
        model = self.batches[self.batch_of(name)].model
        extra = self.virtual[name][1].n_virtual if name in self.virtual else 0
        return min(self.max_context, model.config.context_limit - extra)

    def queue_length(self) -> int:
        return self.waiting.qsize() + len(self.prefilling)

    def running(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    def submit(self, request: Request) -> None:
        """Queue a request; raises LmzooError('queue full') when max_queue are already waiting."""
        if request.model not in self.batches and request.model not in self.virtual:
            raise LmzooError(f"unknown model {request.model!r}")
        if not request.prompt:
            raise LmzooError("the prompt has no tokens")
        if self.queue_length() >= self.max_queue:
            raise LmzooError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.waiting.put(request)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.waiting.put(None)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as e:  # a bug must not kill the engine silently: fail the rows, go on
                for req in self._all_requests():
                    req.emit(("error", f"engine error: {type(e).__name__}: {e}"))
                for b in self.batches.values():
                    b.rows.clear()
                    b.last = None
                self.prefilling.clear()

    def _all_requests(self):
        yield from (p.request for p in self.prefilling)
        for b in self.batches.values():
            yield from b.rows

    def _iteration(self) -> None:
        idle = not self.prefilling and self.running() == 0
        self._admit(block=idle)
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        for name, batch in self.batches.items():
            if batch.rows:
                self._decode(name, batch)

    def _admit(self, block: bool) -> None:
        free = self.max_batch * len(self.batches) - self.running() - len(self.prefilling)
        while free > 0:
            try:
                req = self.waiting.get(timeout=0.5) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if req is None:  # stop()
                return
            if req.cancelled.is_set():
                continue
            batch = self.batches[self.batch_of(req.model)]
            if len(batch.rows) + sum(self.batch_of(p.request.model) == self.batch_of(req.model)
                                     for p in self.prefilling) >= self.max_batch:
                self.waiting.put(req)  # this model's rows are full: wait for one to leave
                return
            n_virtual = self.virtual[req.model][1].n_virtual if req.model in self.virtual else 0
            try:
                cache = batch.model.new_cache(1, len(req.prompt) + n_virtual, rolling=False)
                if req.seed is not None:
                    req.generator = torch.Generator(device=cache.key_valid.device).manual_seed(req.seed)
            except (RuntimeError, ValueError, OverflowError) as e:  # this request's own fault: it alone fails
                req.emit(("error", f"{type(e).__name__}: {e}"))
                continue
            self.prefilling.append(_Prefill(req, cache))
            free -= 1

    @torch.inference_mode()
    def _prefill_chunk(self, p: _Prefill) -> None:
        req = p.request
        if req.cancelled.is_set():
            self.prefilling.remove(p)
            return
        batch_name = self.batch_of(req.model)
        batch = self.batches[batch_name]
        model = batch.model
        encoder = self.virtual[req.model][1] if req.model in self.virtual else None
        ids = torch.tensor([req.prompt[p.done:p.done + PREFILL_CHUNK]], dtype=torch.long,
                           device=p.cache.key_valid.device)
        attached, model.virtual = model.virtual, encoder
        try:
            if req.echo_logprobs:
                logits = model(ids, cache=p.cache)[0]
                self._echo(req, p.done, logits)
                last = logits[-1]
            else:
                last = model.lm_head(model.hidden_states(ids, cache=p.cache)[0, -1])
        finally:
            model.virtual = attached
        self.on_step("prefill", ids.shape[1])
        p.done += ids.shape[1]
        if p.done < len(req.prompt):
            return
        # p stays in self.prefilling until it is placed or finished, so that an error reaches it
        # positions continue after the prompt's: its text positions, shifted as the adapter shifts them
        shift = 0
        if encoder is not None and (encoder.kind == "prompt" or encoder.text_positions == "after"):
            shift = encoder.n_virtual
        req.next_position = shift + len(req.prompt)
        if req.max_tokens == 0:  # scoring the prompt only (completions' echo)
            req.emit(("done", "length"))
        else:
            token = self._emit_token(req, last)
            if token is not None:
                self._place(batch, p.cache, req, token)
        self.prefilling.remove(p)

    def _echo(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """Log-probabilities of prompt tokens start+1.. given the ones before (the first has none)."""
        logp = logits.float().log_softmax(-1)
        for i in range(logits.shape[0] - 1 + (start + logits.shape[0] < len(req.prompt))):
            target = start + i + 1
            if target >= len(req.prompt):
                break
            info = {"token": req.prompt[target], "logprob": float(logp[i, req.prompt[target]])}
            if req.logprobs:
                top = logp[i].topk(req.logprobs)
                info["top"] = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            req.emit(("prompt_logprob", target, info))

    def _emit_token(self, req: Request, logits: torch.Tensor) -> int | None:
        """Sample, emit, and say whether the request goes on (the token) or is finished (None)."""
        token = int(sample(logits[None], req.temperature, req.top_k, req.top_p, req.generator)[0])
        req.generated += 1
        if token in req.stop_ids:
            req.emit(("done", "stop"))
            return None
        info = _logprob_info(logits, token, req.logprobs) if req.logprobs is not None else None
        req.emit(("token", token, info))
        if req.cancelled.is_set():
            req.emit(("done", "cancelled"))
            return None
        if req.generated >= req.max_tokens:
            req.emit(("done", "length"))
            return None
        return token

    def _place(self, batch: _Batch, own: KVCache, req: Request, token: int) -> None:
        """Copy a prefilled request's keys and values into the next free row, ending at the batch's slot."""
        cache, m = batch.cache, own.length
        if not batch.rows:
            cache.length = 0
        if max(cache.length, m) + 1 > cache.max_len:
            self._compact(batch)
        cache.length = max(cache.length, m)  # if m is longer, the running rows gain invalid slots in front
        r, end = len(batch.rows), cache.length
        for layer in range(len(cache.k)):
            cache.k[layer][r, :, end - m:end] = own.k[layer][0, :, :m]
            cache.v[layer][r, :, end - m:end] = own.v[layer][0, :, :m]
        cache.key_valid[r] = False
        cache.key_valid[r, end - m:end] = own.key_valid[0, :m]
        batch.rows.append(req)
        new = torch.tensor([token], device=cache.key_valid.device)
        batch.last = new if batch.last is None else torch.cat([batch.last, new])

    def _compact(self, batch: _Batch) -> None:
        """Pack every row's valid slots to the end, in order: the gaps of joins and departures go."""
        cache = batch.cache
        counts = cache.key_valid[:len(batch.rows)].sum(-1)
        end = int(counts.max()) if len(batch.rows) else 0
        for r in range(len(batch.rows)):
            slots = cache.key_valid[r].nonzero().squeeze(-1)
            n = len(slots)
            for t in (*cache.k, *cache.v):
                t[r, :, end - n:end] = t[r, :, slots]
            cache.key_valid[r] = False
            cache.key_valid[r, end - n:end] = True
        cache.length = end

    def _remove_row(self, batch: _Batch, r: int) -> None:
        """Row r leaves; the last row moves into its place, so rows 0..n-1 stay the ones in use."""
        cache, last = batch.cache, len(batch.rows) - 1
        if r != last:
            for t in (*cache.k, *cache.v):
                t[r] = t[last]
            cache.key_valid[r] = cache.key_valid[last]
            batch.rows[r] = batch.rows[last]
            batch.last[r] = batch.last[last]
        cache.key_valid[last] = False
        batch.rows.pop()
        batch.last = batch.last[:last]

    @torch.inference_mode()
    def _decode(self, name: str, batch: _Batch) -> None:
        cache, n = batch.cache, len(batch.rows)
        if cache.length + 1 > cache.max_len:
            self._compact(batch)
        view = _rows_view(cache, n)
        positions = torch.tensor([[req.next_position] for req in batch.rows], device=cache.key_valid.device)
        step = getattr(batch.model, "decode_step", None)  # compiled (lmzoo.infer.compiled), when asked for
        if step:
            logits = step(batch.last[:, None], view, positions)[:, -1]
        else:
            logits = batch.model(batch.last[:, None], position_ids=positions, cache=view)[:, -1]
        cache.length = view.length
        self.steps += 1
        self.on_step("decode", n)
        finished = []
        for r, req in enumerate(batch.rows):
            req.next_position += 1
            token = self._emit_token(req, logits[r])
            if token is None:
                finished.append(r)
            else:
                batch.last[r] = token
        for r in reversed(finished):
            self._remove_row(batch, r)


def _check_servable(c, max_len: int) -> None:
    """Rows sit at different slots than their positions (they are aligned at their last slot):
    fine for causal attention over positions, not for rules that count slots or need a per-prompt
    setting. Those models are refused, each with its reason."""
    reason = None
    if c.lm_type == "prefix" or c.positions == "rope_2d":
        reason = "a prefix LM (GLM) reads each prompt both ways, which the batch does not do yet"
    elif c.rope_scaling == "ntk_alpha":
        reason = "Qwen1's NTK rotary scaling is fixed per prompt length, which the batch does not keep per row yet"
    elif c.attention_pattern != "dense":
        reason = f"attention_pattern={c.attention_pattern!r} counts slots, which differ from positions in the batch"
    elif c.sliding_window is not None and max_len > c.sliding_window:
        reason = (f"the sliding window ({c.sliding_window}) would count slots, not positions, past its size; "
                  f"serve with --max-context below {c.sliding_window} minus 256")
    if reason:
        raise LmzooError(f"lmzoo serve cannot batch this model: {reason}")


def _rows_view(cache: KVCache, n: int) -> KVCache:
    """The first n rows of a cache, sharing its storage (writes land in the cache)."""
    view = copy.copy(cache)
    view.k = [t[:n] for t in cache.k]
    view.v = [t[:n] for t in cache.v]
    view.key_valid = cache.key_valid[:n]
    return view
