"""A compiled decode step, built once per model layout and kept on disk.

    model.decode_step = CompiledDecodeStep(model)          # what prepare_for_inference(..., compile=True) does
    logits = model.decode_step(token_ids, cache)            # [B, 1] -> [B, 1, vocab]; lmzoo.nn.generate uses it
    CompiledDecodeStep(model, background=True)              # chat, serve: decode eagerly until it is built
    model.generate(...)  # a model not prepared for inference: the same, by default (default_step below)

Decoding one token on a CPU runs about 45 small ops per block, each costing a few microseconds
of Python and dispatch on top of its work. For a small model those costs are as large as the
matrix products themselves. Compiled, the norms, rotary, residuals and cache writes of a step
become a few fused C++ loops, and the Python is gone: the embedded model decodes ~2x faster
(bench/startup.py, bench/bench.py).

How it is built, and why so:
- torch.export traces one decode step; AOTInductor compiles it to a shared library, packaged as
  a .pt2 file. A later process loads that file in milliseconds, where torch.compile would trace
  and compile again (1-3 minutes here, even with a warm cache).
- The weights are inputs of the graph, not constants. The artifact holds only kernels (a few
  MB); at each call the model's own tensors are passed in, so there is no second copy of the
  weights, and one artifact serves every model of the same layout (a fine-tuned copy, say).
- The file's name is a hash of everything the graph depends on: the model's modules, config and
  tensor shapes and types, the cache's layout (rolling buffers, virtual tokens, padding, one row
  or several), lmzoo's source, torch's version and the CPU. The same hash is stored inside the
  package and checked on load: a file that cannot be loaded (truncated) or whose hash differs is
  removed and built again, never used.
- Shapes that vary (the cache's fill, its size, the batch) are symbolic. Where the model's code
  branches on one (a sliding window reached or not), export narrows its range; a call outside
  the ranges an artifact was built for decodes eagerly.
- Each layout is built once, at the first call that needs it. That call traces the step (a few
  seconds: tracing changes torch's process-wide state, so nothing may run beside it); then the
  step is compiled there (generate), or by a child process while this one decodes eagerly (chat,
  serve, and plain models by default); the compiled step takes over at the first call after it
  is ready.

It computes what the eager step computes: the tests check the logits (fp32 to 1e-4; bf16 kernels
of int4/int8 to two bf16 steps) and greedy tokens, in tests/test_compiled_step.py. Where it cannot
be built (no C++ compiler, or a model whose step export cannot trace), it says so in one line and
the step decodes eagerly.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import platform
import sys
import threading
import warnings
import weakref

import torch
from torch import nn

from ..errors import LmzooError
from ..formats.atomic import atomic_file
from ..nn.cache import KVCache

# torch 2.13's inductor calls a deprecated storage API, and warns of mixed bf16/fp16 in a kernel: not the
# user's concern.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", module="torch._inductor")
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed", module="torch._inductor")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def cache_dir() -> str:
    """Where compiled steps are kept: $LMZOO_CACHE_DIR, else $XDG_CACHE_HOME/lmzoo, else ~/.cache/lmzoo."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("LMZOO_CACHE_DIR") or os.path.join(base, "lmzoo")


def _note(message: str) -> None:
    print(f"lmzoo: {message}", file=sys.stderr, flush=True)


class _Graph(nn.Module):
    """One decode step as a function of tensors only: (weights, token ids, cache tensors[, positions])."""

    def __init__(self, weightless, names: list[str], layout: tuple, positions: bool):
        super().__init__()
        self.__dict__["model"] = weightless  # not a submodule: export must see no weights but the inputs
        self.names, self.layout, self.positions = names, layout, positions

    def forward(self, weights, input_ids, tensors):
        position_ids = tensors[-1] if self.positions else None
        cache = KVCache.from_state(self.layout, tensors[:-1] if self.positions else tensors)
        return torch.func.functional_call(self.model, dict(zip(self.names, weights, strict=True)), (input_ids,),
                                          dict(cache=cache, position_ids=position_ids))


class _Loaded:
    """A loaded artifact: its runner, and the sizes of the inputs it was built for."""

    def __init__(self, runner, sizes: list):
        self.runner, self.sizes = runner, sizes  # per input after the weights, per dim: [lowest, highest or None]

    def fits(self, inputs: list[torch.Tensor]) -> bool:
        if len(inputs) != len(self.sizes):
            return False
        return all(t.dim() == len(dims) and all(lo <= n and (hi is None or n <= hi)
                                                for n, (lo, hi) in zip(t.shape, dims, strict=True))
                   for t, dims in zip(inputs, self.sizes, strict=True))


class CompiledDecodeStep:
    def __init__(self, model: nn.Module, *, background: bool = False, directory: str | None = None):
        # weakly: the model holds its step (model.decode_step), and the default steps are kept by model
        self.model_ref, self.background = weakref.ref(model), background
        self.directory = os.path.join(directory or cache_dir(), "compiled")
        named = [*model.named_parameters(), *model.named_buffers()]
        self.names, self.weights = [n for n, _ in named], [t for _, t in named]
        # export traces a copy whose tensors are weightless: the real ones are the graph's inputs,
        # and a thread tracing it never touches the model that decodes meanwhile
        memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
                if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta") for t in self.weights}
        self.weightless = copy.deepcopy(model, memo).eval()  # decoding: no MoE balancing loss, no dropout
        self.model_key = _model_key(model, named)
        self.steps: dict[tuple, _Loaded | None] = {}  # by layout; None: not available (building, or failed)
        self.lock = threading.Lock()
        self.failed: str | None = None
        self.compiled_calls = 0  # steps the compiled graph ran (the rest decoded eagerly)
        self.threads: list[threading.Thread] = []  # waiting for a child process that compiles a step

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None):
        """Logits [B, 1, vocab]; position_ids [B, 1] when rows are not where the cache says
        (lmzoo.serve's rows, aligned at their last slot)."""
        layout, tensors = cache.state()
        key = (layout, input_ids.shape[0] == 1, position_ids is not None)
        inputs = [input_ids, *tensors, *([position_ids] if position_ids is not None else [])]
        # an example whose cache holds one slot would build a graph for exactly one (torch specializes 1s)
        new = key not in self.steps and self.failed is None and cache.length > 1
        with self.lock:
            step = self.steps.get(key)
            if new:
                self.steps[key] = None
        if new:
            self._build(key, inputs)
            step = self.steps.get(key)
        if step is None or not step.fits(inputs):
            return self.model_ref()(input_ids, cache=cache, position_ids=position_ids)
        out = step.runner.boxed_run([*self.weights, *inputs])[0]
        self.compiled_calls += 1
        cache.length += input_ids.shape[1]  # the graph advanced a copy of the cache; its tensors are written
        return out

    def artifact(self, key: tuple) -> tuple[str, str]:
        """(file, digest) of the step for `key` (a layout, one row or not, positions given or not): the
        digest of everything its graph depends on, also stored inside the file."""
        layout, one_row, positions = key
        digest = hashlib.sha256(json.dumps([self.model_key, repr(layout), one_row, positions, _machine_key()])
                                .encode()).hexdigest()[:32]
        return os.path.join(self.directory, f"decode-{digest}.pt2"), digest

    def wait(self, timeout: float | None = None) -> None:
        """Until the steps being built in the background are ready (or failed)."""
        for thread in list(self.threads):
            thread.join(timeout)

    # ------------------------------------------------------------------ building and loading
    def _build(self, key: tuple, inputs: list[torch.Tensor]) -> None:
        """Load the step for `key`, or trace it here (seconds) and compile it: here (the foreground),
        or in a child process while this one decodes eagerly (the background). Tracing never runs
        beside the caller's work: it changes torch's process-wide tracing state."""
        try:
            path, digest = self.artifact(key)
            loaded = _load(path, digest)
            if loaded is None:
                if not self.background:
                    _note(f"compiling the decode step once (about a minute for a small model); it is kept in {path}")
                exported, settings = self._export(key, inputs, digest)
                os.makedirs(self.directory, exist_ok=True)
                if self.background:
                    thread = threading.Thread(target=self._compile_in_a_child, args=(key, exported, settings, path,
                                                                                       digest), daemon=True)
                    self.threads.append(thread)
                    thread.start()
                    return
                _compile(exported, settings, path)
                loaded = _loaded_or_error(path, digest)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: decode eagerly, and say why
            self._failed(e)
            return
        with self.lock:
            self.steps[key] = loaded

    def _failed(self, e: BaseException) -> None:
        first = (str(e).strip().splitlines() or [""])[0]
        self.failed = f"{type(e).__name__}: {first[:200]}"
        _note(f"the decode step could not be compiled ({self.failed}); decoding without it")

    def _export(self, key, inputs, digest: str):
        layout, _, positions = key
        graph = _Graph(self.weightless, self.names, layout, positions)
        # every size of the cache and the batch may vary, but not a size of 1 (a batch of one, say): torch
        # specializes those, and so does the graph
        auto = torch.export.Dim.AUTO
        dynamic = [{d: auto for d, n in enumerate(t.shape) if n > 1} for t in inputs]
        dynamic = [None] * len(self.weights), dynamic[0], dynamic[1:]
        with torch.no_grad():
            exported = torch.export.export(graph, (self.weights, inputs[0], inputs[1:]), dynamic_shapes=dynamic)
        sizes = _input_sizes(exported, len(self.weights))
        return exported, {"aot_inductor.metadata": {"lmzoo_key": digest, "lmzoo_sizes": json.dumps(sizes)}}

    def _compile_in_a_child(self, key, exported, settings: dict, path: str, digest: str) -> None:
        """The traced step, saved (torch.export's own format: no code), compiled by a child process."""
        import subprocess
        import tempfile

        try:
            with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
                traced = os.path.join(tmp, "step.pt2")
                torch.export.save(exported, traced)
                run = subprocess.run([sys.executable, "-m", "lmzoo.infer.compiled", traced, path,
                                      json.dumps(settings)], capture_output=True, text=True)
            if run.returncode != 0:
                lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
                raise LmzooError(lines[-1] if lines else f"the compiling process exited with {run.returncode}")
            loaded = _loaded_or_error(path, digest)
        except Exception as e:  # noqa: BLE001 - as in _build
            self._failed(e)
            return
        with self.lock:
            self.steps[key] = loaded


def _compile(exported, settings: dict, path: str) -> None:
    """AOTInductor: the traced step -> a .pt2 package at path, written atomically."""
    with atomic_file(path) as tmp:
        torch._inductor.aoti_compile_and_package(exported, package_path=tmp + ".pt2", inductor_configs=settings)
        os.replace(tmp + ".pt2", tmp)


def _loaded_or_error(path: str, digest: str) -> _Loaded:
    loaded = _load(path, digest)
    if loaded is None:
        raise LmzooError(f"{path}: the compiled step just written cannot be loaded")
    return loaded


# ---------------------------------------------------------------------- the default for plain models
_DEFAULT_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its tensors' ids, step)


def default_step(model: nn.Module) -> CompiledDecodeStep | None:
    """The step a model that was not prepared for inference (`lmzoo.load()` then `model.generate()`)
    decodes with: its compiled step, loaded from disk when it was built before (by any process, for
    any model of the same layout), else built in the background while it decodes eagerly.

    This is how the plain Python API gets the compiled speed without an extra call while the model
    stays trainable: the weights are the graph's inputs, so the step reads them as they are now (a
    fine-tuning step changes them in place), and a model whose tensors changed (an adapter added,
    say) gets a step of its own. A model with dropout in training mode (an adapter's), off the CPU,
    or with LMZOO_COMPILE=0 in the environment decodes eagerly. (The decoder itself has no dropout:
    lmzoo.load() gives a model in training mode, as torch does, that decodes the same in either.)"""
    if os.environ.get("LMZOO_COMPILE", "1") == "0" or any(
            isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules()):
        return None
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.device.type != "cpu" or type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return None
    ids = tuple(map(id, tensors))
    known = _DEFAULT_STEPS.get(model)
    if known is None or known[0] != ids:
        known = ids, CompiledDecodeStep(model, background=True)
        _DEFAULT_STEPS[model] = known
    return known[1]


def _load(path: str, digest: str) -> _Loaded | None:
    """The artifact at path, or None when there is none; a stale or unreadable one is removed. Its
    metadata is read first: a library built for something else is never loaded into the process.
    torch's C++ loader directly: torch._inductor's Python side would cost ~2 s of imports."""
    if not os.path.exists(path):
        return None
    aoti = torch._C._aoti.AOTIModelPackageLoader
    try:
        meta = aoti.load_metadata_from_package(path, "model")
        if meta.get("lmzoo_key") != digest:
            raise LmzooError("built for another model, torch or CPU")
        sizes = json.loads(meta["lmzoo_sizes"])
        runner = aoti(path, "model", False, 1, -1)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign: never run it
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        _note(f"{path}: not a usable compiled step ({reason}); building it again")
        os.remove(path)
        return None
    return _Loaded(runner, sizes)


def _input_sizes(exported, n_weights: int) -> list:
    """For each input after the weights, each dim's [lowest, highest or None] size, as export narrowed them
    (a fixed size n is [n, n]): a call with other sizes must not run the artifact."""
    by_name = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    sizes = []
    for name in exported.graph_signature.user_inputs[n_weights:]:
        dims = []
        for size in by_name[name].meta["val"].shape:
            if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
                r = exported.range_constraints[size.node.expr]
                dims.append([int(r.lower), int(r.upper) if r.upper.is_Integer else None])
            else:
                dims.append([int(size), int(size)])
        sizes.append(dims)
    return sizes


def _model_key(model: nn.Module, named) -> str:
    """What a compiled graph depends on in the model: its modules, config, tensor shapes and types."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in named]
    return hashlib.sha256(json.dumps([repr(model), repr(getattr(model, "config", None)), tensors]).encode()).hexdigest()


_MACHINE: list[str] = []


def _machine_key() -> str:
    """torch, Python, lmzoo's own source, and the CPU (its model and instruction sets)."""
    if not _MACHINE:
        h = hashlib.sha256(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
            with open(path, "rb") as f:
                h.update(f.read())
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                h.update("".join(sorted({line for line in f if line.startswith(("model name", "flags"))})).encode())
        except OSError:
            h.update(platform.processor().encode())
        _MACHINE.append(h.hexdigest())
    return _MACHINE[0]


if __name__ == "__main__":  # the child process of CompiledDecodeStep._compile_in_a_child: TRACED OUT SETTINGS
    os.nice(10)  # the parent's eager decoding comes first
    _compile(torch.export.load(sys.argv[1]), json.loads(sys.argv[3]), sys.argv[2])
