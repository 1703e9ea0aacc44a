"""The training rows of bench/bench.py: one training step of each engine, and its peak memory.

A step is one forward and backward pass in fp32 on a [4, 256] batch of token ids ([4, 32] with
--quick), the loss over every next token, and no optimizer step. The kinds:

    full        every weight trains
    lora        LoRA r=8, alpha 16, on q, k, v, o, gate, up, down
                  lmzoo: add_lora(model, LoraConfig(...))   transformers: peft.LoraConfig(...)
    ptuning_v2  32 virtual tokens per layer, made by a projection MLP (P-tuning v2)
                  lmzoo: add_virtual(model, PrefixConfig(n_virtual=32, projection=True))
                  transformers: peft.PrefixTuningConfig(num_virtual_tokens=32, prefix_projection=True)
    lora_bf16   lmzoo: the same LoRA in bf16 mixed precision, as `lmzoo finetune --dtype bfloat16`
                  runs it: lmzoo.load(dtype=torch.bfloat16), so the frozen weights and the
                  activations are bf16, while the adapters (and their gradients) stay fp32 and
                  the loss is computed in fp32
                transformers: the fp32 `lora` model (the issue's yardstick: transformers+peft fp32)

Every figure comes from a fresh process per engine, kind and run (`run_fresh`), which loads
the model and runs two steps: the first warms up (each engine pays its first-touch page faults
there), the second is timed. Timing both engines inside bench.py's one process made each
engine's speed depend on what the other had left in the C heap (glibc returns freed memory to
the system or keeps it depending on the sizes freed before), which moved transformers' figure
by up to 25% between runs. The process reads its own VmHWM from /proc/self/status at the end:

    .venv/bin/python bench/training.py lmzoo lora --ids ids.pt [--hf-dir DIR] [--threads 2] [--steps 2]

prints one line of JSON (sizes in bytes):
    step_s         seconds of each step, in order (the last one is the timed one)
    peak_rss       the process's peak RSS over its whole life: loading + the steps (VmHWM)
    step_peak_rss  the peak RSS from the end of loading to the end of the steps (VmHWM, reset
                   after loading by writing 5 to /proc/self/clear_refs); None if the kernel
                   refuses the reset
    load_peak_rss, loaded_rss   VmHWM and VmRSS when the model is loaded, before the steps
Both peaks are absolute (the weights, the interpreter and the libraries included), not added
memory.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

KINDS = ("full", "lora", "ptuning_v2", "lora_bf16")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(engine, kind, hf_dir=None):
    """A fresh model of `engine` ("lmzoo" or "transformers") set up for `kind` training: fp32,
    except lmzoo's lora_bf16. transformers loads `hf_dir`; lmzoo loads it too if given, else the
    embedded GGUF (the same weights)."""
    with torch.inference_mode(False):
        if engine == "lmzoo":
            import lmzoo
            from lmzoo.peft import LoraConfig, PrefixConfig, add_lora, add_virtual
            m = lmzoo.load(hf_dir, dtype=torch.bfloat16 if kind == "lora_bf16" else None)[0]
            if kind in ("lora", "lora_bf16"):
                add_lora(m, LoraConfig(r=8, alpha=16, targets=LORA_TARGETS))
            elif kind == "ptuning_v2":
                add_virtual(m, PrefixConfig(n_virtual=32, projection=True))
        else:
            import peft
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
            if kind in ("lora", "lora_bf16"):  # the yardstick of lora_bf16 is fp32
                m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_LORA_TARGETS))
            elif kind == "ptuning_v2":
                m = peft.get_peft_model(m, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=32,
                                                                   prefix_projection=True))
    return m.train()


def step(engine, model, ids):
    """One forward + backward; the gradients are dropped afterwards (no optimizer)."""
    with torch.enable_grad(), torch.inference_mode(False):
        loss = model.loss(ids) if engine == "lmzoo" else model(input_ids=ids, labels=ids).loss
        loss.backward()
    for p in model.parameters():
        p.grad = None


def trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def row(kind):
    """The bench row for `kind`: tokens / s of the timed step of a fresh process (`run_fresh`);
    each process's memory figures are kept in args.train_memory[kind][engine]."""
    def timed(engine, args):
        stats = run_fresh(engine.name, kind, args.train_ids, getattr(engine, "hf_dir", None), args.threads)
        args.train_memory.setdefault(kind, {}).setdefault(engine.name, []).append(stats)
        return stats["tokens"] / stats["step_s"][-1]
    precision = "lmzoo bf16 mixed precision vs transformers fp32" if kind == "lora_bf16" else "fp32"
    timed.__doc__ = (f"one {kind} training step (forward + backward, {precision}, no optimizer) on 4x256 tokens, "
                     "the second of a fresh process per engine and run; tokens/s (that process's peak RSS: "
                     "`peak_memory`)")
    return timed


def run_fresh(engine, kind, ids, hf_dir=None, threads=2, steps=2):
    """Run `steps` `kind` steps of `engine` in a fresh process; its figures (see the top)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ids.pt")
        torch.save(ids, path)
        cmd = [sys.executable, os.path.abspath(__file__), engine, kind, "--ids", path, "--threads", str(threads),
               "--steps", str(steps)]
        if hf_dir:
            cmd += ["--hf-dir", hf_dir]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak():
    """Set VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description="one training step in this process, then its peak RSS as JSON")
    p.add_argument("engine", choices=("lmzoo", "transformers"))
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--ids", required=True, help="a torch.save'd [batch, seq] tensor of token ids")
    p.add_argument("--hf-dir", help="the Hugging Face directory transformers loads")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps to run; the figures cover them all")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.load(args.ids)
    model = build(args.engine, args.kind, args.hf_dir)
    gc.collect()
    load_peak, loaded = _status("VmHWM"), _status("VmRSS")
    reset = _reset_peak()
    seconds = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(args.engine, model, ids)
        seconds.append(time.perf_counter() - t)
    after = _status("VmHWM")
    print(json.dumps({"peak_rss": max(load_peak, after), "step_peak_rss": after if reset else None,
                      "load_peak_rss": load_peak, "loaded_rss": loaded, "step_s": seconds,
                      "tokens": ids.numel(), "trainable_params": trainable_params(model)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
