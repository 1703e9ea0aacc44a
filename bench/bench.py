"""lmzoo vs transformers, side by side, on the same weights, in one run.

    .venv/bin/python bench/bench.py [--repeats 3] [--rows prefill,decode] [--quick] [--json PATH]

Both engines run the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to
fp32): lmzoo loads the .gguf, saves it as a Hugging Face directory, and transformers loads that
directory; the script checks that the two produce the same logits before timing anything.

A row is a function `row(engine, args) -> tokens/s` timing one call of the engine methods below;
adding a row is adding a function to ROWS. The training rows live in bench/training.py (their
peak memory is measured in a fresh process per engine), the quality of the bf16/int8/int4
modes in bench/quality.py. See bench/README.md for the method and the figures.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import llamacpp  # bench/llamacpp.py
import quality  # bench/quality.py
import torch
import training  # bench/training.py

import lmzoo

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
        "produce books quickly and cheaply. ")
DECODE_PROMPT = ("Write a long, detailed essay about the history of the printing press: its inventors, the "
                 "first books it produced, and how it changed science, religion, trade and politics in Europe.")


# ---------------------------------------------------------------------------------- engines
# What the rows may ask of an engine (each call runs under torch.inference_mode):
#   logits(ids [1, T]) -> [1, T, vocab], all positions
#   last_logits(ids [1, T]) -> [1, 1, vocab], the last position only
#   generate(ids [1, T], n) -> exactly n new greedy tokens [1, n], never stopping at EOS
class Lmzoo:
    name = "lmzoo"

    def __init__(self, model):
        import copy

        from lmzoo.infer.prepare import prepare_for_inference
        self.plain = model  # as loaded: the source of the bf16/int8/int4 variants and the quality table
        # What `lmzoo generate` and `lmzoo chat` run: q|k|v and gate|up fused, weights packed for oneDNN.
        self.model = prepare_for_inference(copy.deepcopy(model))

    def logits(self, ids):
        return self.model(ids)

    def last_logits(self, ids):
        return self.model.lm_head(self.model.hidden_states(ids)[:, -1:])

    def generate(self, ids, n):
        # No stop_tokens: lmzoo never stops early; it returns prompt + new tokens.
        return self.model.generate(ids, n)[:, ids.shape[1]:]


class HF:
    name = "transformers"

    def __init__(self, model):
        self.model = model
        # Never stop at EOS (as lmzoo without stop_tokens): both then emit the same greedy tokens.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    def logits(self, ids):
        # use_cache=False: no DynamicCache is built; logits_to_keep=0 (the default) keeps all.
        return self.model(ids, use_cache=False).logits

    def last_logits(self, ids):
        return self.model(ids, use_cache=False, logits_to_keep=1).logits

    def generate(self, ids, n):
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:]


# ---------------------------------------------------------------------------------- rows
def prefill(engine, args):
    """Full forward over the 512-token prompt (64 with --quick), batch 1, logits at every position."""
    t = time.perf_counter()
    engine.logits(args.prefill_ids)
    return args.prefill_ids.shape[1] / (time.perf_counter() - t)


def prefill_last(engine, args):
    """The same forward, but the head is applied to the last position only (what generate needs)."""
    t = time.perf_counter()
    engine.last_logits(args.prefill_ids)
    return args.prefill_ids.shape[1] / (time.perf_counter() - t)


def decode(engine, args):
    """A whole greedy generate call: prompt prefill + 128 steps (16 with --quick); new tokens / s."""
    t = time.perf_counter()
    new = engine.generate(args.decode_ids, args.new_tokens)
    s = time.perf_counter() - t
    assert new.shape[1] == args.new_tokens, f"{engine.name} made {new.shape[1]} tokens, not {args.new_tokens}"
    args.generated[engine.name] = new[0].tolist()
    return args.new_tokens / s


def _decode_variant(mode, compile=False):
    """lmzoo decoding in a cheaper weight format (or compiled) vs transformers decoding in fp32
    (the issue's yardstick)."""
    def row(engine, args):
        if engine.name != "lmzoo":  # transformers in fp32; llama.cpp in the GGUF's own 4/8-bit formats
            return decode(engine, args)
        t = time.perf_counter()
        new = variant(engine, mode, compile).generate(args.decode_ids, args.new_tokens)[:, args.decode_ids.shape[1]:]
        seconds = time.perf_counter() - t
        assert new.shape[1] == args.new_tokens
        if compile and mode == "fp32":  # the compiled fp32 step's greedy tokens, against transformers'
            args.generated["lmzoo compiled"] = new[0].tolist()
        return args.new_tokens / seconds
    how = ("compiled decode step, " if compile else "") + f"{mode} weights"
    row.__doc__ = f"decode as above, lmzoo with {how}, transformers in fp32"
    return row


def variant(engine, mode, compile=False):
    """The lmzoo model in fp32, bf16 or quantized, prepared as `lmzoo generate --dtype/--quantize
    [--compile]` does (made once, kept). A compiled one is compiled here, by a short untimed
    generate, and the compile time is kept in engine.compile_seconds."""
    import copy

    from lmzoo.infer.prepare import prepare_for_inference
    cache = engine.__dict__.setdefault("variants", {})
    if (mode, compile) not in cache:
        m = copy.deepcopy(engine.plain)
        if mode == "bf16":
            m = m.to(torch.bfloat16)
        m = prepare_for_inference(m, mode if mode in ("int8", "int4") else None, compile=compile)
        if compile:
            t = time.perf_counter()
            m.generate(torch.tensor([[1, 2, 3]]), 2)
            engine.__dict__.setdefault("compile_seconds", {})[mode] = time.perf_counter() - t
        cache[mode, compile] = m
    return cache[mode, compile]


def _decode_batch(compile=False):
    def row(engine, args):
        n = args.new_tokens // 4
        prompts = [args.decode_ids[0, :k].tolist() for k in (37, 30, 25, 20, 16, 12, 8, 5)]
        t = time.perf_counter()
        if engine.name == "lmzoo":
            (variant(engine, "fp32", compile) if compile else engine.model).generate(prompts, n)
        else:
            tok = args.tok_pad
            width = max(map(len, prompts))
            ids = torch.tensor([[tok] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            engine.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return 8 * n / (time.perf_counter() - t)
    row.__doc__ = ("8 prompts of different lengths (left-padded), 32 greedy new tokens each (8 with --quick); "
                   "new tokens / s" + (", lmzoo with its compiled decode step" if compile else ""))
    return row


# llama.cpp (when llama-cpp-python is installed) runs the rows that compare with it: prefill with
# the last position's logits, and decoding from the same GGUF against lmzoo's 4-bit mode.
LLAMACPP_ROWS = ("prefill_last", "decode_int4", "decode_int4_compiled")

ROWS = {"prefill": prefill, "prefill_last": prefill_last, "decode": decode,
        "decode_bf16": _decode_variant("bf16"), "decode_int8": _decode_variant("int8"),
        "decode_int4": _decode_variant("int4"), "decode_batch": _decode_batch(),
        # The same with `--compile` (lmzoo.infer.compiled); compiling is done, and timed, before the runs.
        **{f"decode{'' if m == 'fp32' else '_' + m}_compiled": _decode_variant(m, compile=True)
           for m in ("fp32", "bf16", "int8", "int4")},
        "decode_batch_compiled": _decode_batch(compile=True),
        **{f"train_{kind}": training.row(kind) for kind in training.KINDS}}


# ---------------------------------------------------------------------------------- harness
N_PARAMS = 134.5e6  # SmolLM2-135M: weights read once per decoded token (fp32: 4 bytes each)
HEAD_PARAMS = 49152 * 576  # its tied head; prefill_last applies it to one position, not to every token


def measure_machine():
    """This machine's ceilings, with the benchmark's thread count: memory bandwidth as the best
    fp32 matrix-vector product over a 256 MB matrix (oneDNN's packed kernel and MKL's), and fp32
    matmul FLOP/s of a 2048^3 product."""
    def best(fn, n=5):
        fn()
        return min(timed for timed in (_time(fn) for _ in range(n)))
    with torch.inference_mode():
        w = torch.randn(4096 * 16, 1024)
        x = torch.randn(1, 1024)
        seconds = best(lambda: x @ w.t())
        if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            packed = torch.ops.mkldnn._reorder_linear_weight(w)
            seconds = min(seconds, best(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")))
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        flops = 2 * 2048 ** 3 / best(lambda: a @ b)
    return {"matvec_gbs": w.numel() * 4 / seconds / 1e9, "matmul_gflops": flops / 1e9}


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def roofline(results, machine):
    """Fractions of the machine's ceilings: decode bytes/s vs memory bandwidth, prefill and
    training FLOP/s vs fp32 matmul FLOP/s (2 FLOPs per weight per token, 6 for training)."""
    bytes_per_weight = {"decode": 4, "decode_bf16": 2, "decode_int8": 1, "decode_int4": 0.5}
    for name, fig in results.items():
        rate, kind = fig["lmzoo"]["median"], name.removesuffix("_compiled")
        if kind in bytes_per_weight:
            frac = rate * N_PARAMS * bytes_per_weight[kind] / 1e9 / machine["matvec_gbs"]
            what = "of memory bandwidth"
        elif name.startswith("prefill") or name == "train_full":
            per_token = N_PARAMS - HEAD_PARAMS if name == "prefill_last" else N_PARAMS
            frac = rate * per_token * (6 if name.startswith("train") else 2) / 1e9 / machine["matmul_gflops"]
            what = "of fp32 matmul FLOP/s"
        else:
            continue
        fig["roofline"] = frac
        print(f"roofline {name:<22}{100 * frac:6.1f}% {what}")


def environment():
    import transformers
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lmzoo": lmzoo.__version__, "python": platform.python_version(), "platform": platform.platform()}


NOISY = 0.2  # cores busy with other processes above which a timed run is redone, then flagged


def cpu_clock():
    """(wall s, CPU s busy on the whole machine, CPU s used by this process), to see who else ran."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    t = os.times()  # a fresh process that a row runs (the training rows) counts as ours
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def others_cores(start, end):
    """Average number of cores that other processes kept busy between two cpu_clock() readings."""
    wall, busy, ours = (b - a for a, b in zip(start, end, strict=True))
    return max(0.0, (busy - ours) / wall)


def wait_quiet(max_wait):
    """Wait (at most max_wait s) for a 1-s spell in which other processes keep < 0.1 core busy."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        start = cpu_clock()
        time.sleep(1)
        if others_cores(start, cpu_clock()) < 0.1:
            return


def quiet_run(row, engine, args):
    """One timed run, after waiting for a quiet CPU; redone (--retries times) if others got busy."""
    for _ in range(args.retries + 1):
        wait_quiet(args.wait)
        start = cpu_clock()
        rate = row(engine, args)
        if (others := others_cores(start, cpu_clock())) <= NOISY:
            break
    return rate, others


def load_engines():
    model, tok = lmzoo.load()
    from transformers import AutoModelForCausalLM
    tmp = tempfile.mkdtemp(prefix="lmzoo-bench-")  # kept for the training rows, which load fresh copies
    import atexit
    import shutil
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    hf_dir = lmzoo.save_hf_dir(model, os.path.join(tmp, "hf"), tok)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = HF(hf_model.eval())
    theirs.hf_dir = hf_dir
    return Lmzoo(model.eval()), theirs, tok


def check_same_model(ours, theirs, ids):
    """The loaded models agree to fp32 summation order (the same weights; lmzoo's products run on
    oneDNN, transformers' on MKL: lmzoo.nn.linear), and the prepared (packed) one too."""
    with torch.inference_mode():
        plain = ours.plain(ids)
        diff = (plain - theirs.logits(ids)).abs().max().item()
        packed = (ours.logits(ids) - plain).abs().max().item()
    assert diff < 1e-5 * plain.abs().max().item(), f"the engines disagree: max |logits diff| = {diff:.3g}"
    assert packed < 1e-3 * plain.abs().max().item(), f"packed weights change logits by {packed:.3g}"
    return diff, packed


def measure(row, engines, args):
    with torch.inference_mode():
        for e in engines:                          # warm-up, not timed
            row(e, args)
        runs = {e.name: [] for e in engines}
        for r in range(args.repeats):              # alternate; flip the order every repeat
            for e in (engines if r % 2 == 0 else engines[::-1]):
                runs[e.name].append(quiet_run(row, e, args))
    fig = {"noisy": 0, "runs": len(engines) * args.repeats}
    for name, v in runs.items():  # runs still noisy after the retries are left out, unless all are
        kept = [rate for rate, busy in v if busy <= NOISY] or [rate for rate, _ in v]
        fig[name] = {"median": statistics.median(kept), "best": max(kept), "runs": [rate for rate, _ in v],
                     "others_cores": [busy for _, busy in v]}
        fig["noisy"] += sum(busy > NOISY for _, busy in v)
    return fig


def peak_memory(rows, engines, args, results):
    """The training rows' peak RSS: the median over the fresh processes that timed them."""
    kinds = [name[len("train_"):] for name in rows if name.startswith("train_")]
    if not kinds:
        return
    print("\npeak RSS of loading + two training steps, a fresh process per engine and run (VmHWM; median of runs)")
    print(f"{'row':<18}{'lmzoo MiB':>11}{'transformers MiB':>18}{'ratio':>8}")
    for kind in kinds:
        processes = args.train_memory[kind]
        mem = {name: {"peak_rss": statistics.median(p["peak_rss"] for p in runs), "processes": runs}
               for name, runs in processes.items()}
        ours, hf = mem["lmzoo"]["peak_rss"], mem["transformers"]["peak_rss"]
        mem["ratio"] = ours / hf
        results[f"train_{kind}"]["peak_memory"] = mem
        print(f"{'train_' + kind:<18}{ours / 2**20:>11.0f}{hf / 2**20:>18.0f}{ours / hf:>8.2f}", flush=True)
        for name, runs in processes.items():  # the peak is normally the steps'; say so when loading was higher
            if any(p["load_peak_rss"] >= p["peak_rss"] for p in runs):
                print(f"  note: {name}'s peak was reached while loading, not in the steps")


def prompt_ids(tok, text, n):
    ids = tok.encode(text * (n // 8))  # a sentence is well over 8 tokens
    return torch.tensor([ids[:n]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait", type=float, default=120, help="max s to wait for a quiet CPU before each run")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run during which others were busy")
    p.add_argument("--quick", action="store_true", help="64-token prefill, 16 new tokens, 1 repeat, no waiting")
    p.add_argument("--no-quality", action="store_true", help="skip the quality table of the bf16/int8/int4 modes")
    p.add_argument("--no-llamacpp", dest="llamacpp", action="store_false",
                   help="leave llama.cpp out even when llama-cpp-python is installed")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    args.repeats, args.wait = (1, 0) if args.quick else (args.repeats, args.wait)
    args.prefill_len, args.new_tokens = (64, 16) if args.quick else (512, 128)

    torch.set_num_threads(args.threads)
    env = environment()
    print("environment:", ", ".join(f"{k}={v}" for k, v in env.items()))

    t0 = time.perf_counter()
    ours, theirs, tok = load_engines()
    engines = [ours, theirs]
    print(f"loaded both engines in {time.perf_counter() - t0:.1f}s ({lmzoo.default_model_path()}, fp32)")

    args.prefill_ids = prompt_ids(tok, TEXT, args.prefill_len)
    args.decode_ids = torch.tensor([tok.encode(DECODE_PROMPT)])
    args.generated = {}
    args.train_memory = {}
    args.tok_pad = 0
    args.train_ids = prompt_ids(tok, TEXT, 4 * 256).reshape(4, 256) if not args.quick else \
        prompt_ids(tok, TEXT, 4 * 32).reshape(4, 32)
    diff, packed = check_same_model(ours, theirs, args.prefill_ids)
    print(f"same model: max |logits(lmzoo) - logits(transformers)| = {diff:.2e} over {args.prefill_len} tokens; "
          f"packed for inference: {packed:.2e}")
    peer = None
    if args.llamacpp and llamacpp.available():
        peer = llamacpp.LlamaCpp(lmzoo.default_model_path(), args.threads)
    elif args.llamacpp:
        print("llama.cpp: not measured (pip install -e .[bench] installs llama-cpp-python)")

    print(f"\n{'row':<18}{'lmzoo tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}{'ratio(best)':>13}{'noisy':>7}"
          + (f"{'llama.cpp tok/s':>17}{'vs llama.cpp':>14}" if peer else ""))
    results = {}
    for name in rows:
        with_peer = engines + [peer] if peer is not None and name in LLAMACPP_ROWS else engines
        results[name] = fig = measure(ROWS[name], with_peer, args)
        fig["ratio"] = fig["lmzoo"]["median"] / fig["transformers"]["median"]
        fig["ratio_best"] = fig["lmzoo"]["best"] / fig["transformers"]["best"]
        fig["what"] = ROWS[name].__doc__
        line = (f"{name:<18}{fig['lmzoo']['median']:>14.1f}{fig['transformers']['median']:>20.1f}"
                f"{fig['ratio']:>8.2f}{fig['ratio_best']:>13.2f}{fig['noisy']:>5}/{fig['runs']}")
        if "llama.cpp" in fig:
            fig["ratio_llamacpp"] = fig["lmzoo"]["median"] / fig["llama.cpp"]["median"]
            line += f"{fig['llama.cpp']['median']:>17.1f}{fig['ratio_llamacpp']:>14.2f}"
        print(line, flush=True)
    if compiled := getattr(ours, "compile_seconds", None):
        notes_compile = {m: round(t, 1) for m, t in compiled.items()}
        print("compiling the decode step took (s, once per model, before the timed runs):",
              ", ".join(f"{m} {t}" for m, t in notes_compile.items()))
    print(f"(medians of {args.repeats} alternating runs; ratio = lmzoo / transformers, above 1 = lmzoo faster;\n"
          " noisy = runs during which other processes kept > 0.2 core busy; left out of the figures)")
    if any(fig["noisy"] for fig in results.values()):  # 2-thread kernels stall when a core is taken
        print("note: some runs were noisy; rerun on a quieter machine if many were", file=sys.stderr)

    peak_memory(rows, engines, args, results)
    wait_quiet(args.wait)
    env["measured"] = machine = measure_machine()
    print(f"\nthis machine, {args.threads} threads: matrix-vector {machine['matvec_gbs']:.1f} GB/s, "
          f"fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s")
    roofline(results, machine)

    notes = {"prefill_len": args.prefill_len, "decode_prompt_len": args.decode_ids.shape[1], "repeats": args.repeats,
             "new_tokens": args.new_tokens, "compile_seconds": getattr(ours, "compile_seconds", {}),
             "max_abs_logits_diff": diff, "max_abs_logits_diff_packed": packed,
             "lmzoo_path": os.path.dirname(lmzoo.__file__)}
    for ours_name, key in (("lmzoo", "decode_same_tokens"), ("lmzoo compiled", "decode_compiled_same_tokens")):
        if ours_name in args.generated and "transformers" in args.generated:
            a, b = args.generated[ours_name], args.generated["transformers"]
            notes[key] = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
            print(f"decode: {ours_name} and transformers agree on the first {notes[key]} of {args.new_tokens} "
                  "new greedy tokens (fp32)")

    out = {"environment": env, "settings": notes, "rows": results}
    if not args.no_quality:
        out["quality"] = quality.measure(ours.plain, tok)
        quality.print_table(out["quality"])
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
