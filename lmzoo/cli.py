"""The `lmzoo` command line. Errors print one line (no traceback) and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from .errors import LmzooError


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("source", help="preset name, Hugging Face directory or .gguf file")
    else:
        p.add_argument("--model", dest="source", default=None,
                       help="preset, Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    if not positional:
        p.add_argument("--adapter", default=None,
                       help="adapter directory (LoRA, P-tuning v2, prompt tuning), e.g. a finetune output")
        p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                       help="weight-only quantization for inference (faster decoding on CPU)")


def _decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="decode with a compiled step, about 2x faster tokens on CPU: built once per model "
                        "layout (about a minute for the embedded model; chat decodes eagerly meanwhile), "
                        "kept in ~/.cache/lmzoo/compiled (LMZOO_CACHE_DIR) and loaded in milliseconds by later runs; "
                        "needs a C++ compiler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmzoo", description="The decoder-only LLM families as one decoder.")
    parser.add_argument("--version", action="version", version=f"lmzoo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="continue or answer a prompt")
    p.add_argument("prompt")
    _model_args(p)
    _decoding_args(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    _model_args(p)
    _decoding_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("info", help="family, config differences and parameter counts of a model")
    _model_args(p, positional=True)
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="write any loadable model as a Hugging Face directory or a GGUF file")
    _model_args(p, positional=True)
    p.add_argument("out_dir", metavar="OUT", help="a directory (Hugging Face), or a file ending in .gguf (llama.cpp)")
    _gguf_type_arg(p)
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("finetune", help="fine-tune on a JSONL file: LoRA, P-tuning v2, prompt tuning or full")
    _model_args(p)
    p.add_argument("--data", required=True, help="JSONL: chat `messages`, `prompt`/`response`, or `text` per line")
    p.add_argument("--out", required=True, help="output directory (adapter/, metrics.jsonl, loss.png, checkpoint/)")
    p.add_argument("--method", default="lora", help="lora (default), ptuning-v2, prompt-tuning or full")
    # Long names that torchrun's own options cannot swallow by prefix (it would take "--r").
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default=None, help="comma-separated: q,k,v,o,gate,up,down,qkv,gate_up,experts "
                   "(default: q,v, or qkv where q|k|v are fused)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--num-virtual-tokens", type=int, default=32, help="P-tuning/prompt tuning: P (default 32)")
    p.add_argument("--prefix-projection", action="store_true", help="P-tuning v2: THUDM's MLP over the prefix")
    p.add_argument("--encoder-hidden", type=int, default=None, help="width of the prefix/prompt encoder's MLP")
    p.add_argument("--prefix-dropout", type=float, default=0.0)
    p.add_argument("--text-positions", default="after", choices=["after", "zero"],
                   help="P-tuning v2: text positions start after the prefix (PEFT) or at zero (ChatGLM)")
    p.add_argument("--prompt-reparam", default=None, choices=["mlp", "lstm"],
                   help="prompt tuning: P-tuning v1's reparameterisation")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--too-long", default="truncate", choices=["truncate", "refuse"])
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share for validation")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--pack", action="store_true", help="pack examples into full rows")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N more steps, with a checkpoint (continue later with --resume)")
    p.add_argument("--strategy", default=None, choices=["ddp", "fsdp"],
                   help="data-parallel training under torchrun (DistributedDataParallel or FSDP2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base; write a Hugging Face directory or GGUF")
    p.add_argument("base", help="base model: preset, Hugging Face directory or .gguf file")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("out_dir", metavar="OUT", help="a directory (Hugging Face), or a file ending in .gguf (llama.cpp)")
    p.add_argument("--dtype", default=None)
    _gguf_type_arg(p)
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("convert-lora", help="write a LoRA adapter as a llama.cpp LoRA GGUF (applied unmerged: --lora)")
    p.add_argument("base", help="its base model: preset, Hugging Face directory or .gguf file")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    p.set_defaults(run=cmd_convert_lora)

    p = sub.add_parser("demo", help="the main job: LoRA teaches the embedded model a task it fails")
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--steps", type=int, default=40, help="LoRA steps of 8 examples (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("compare-peft", help="LoRA vs P-tuning v2 vs prompt tuning, same data and budget, measured")
    p.add_argument("--data", default=None, help="JSONL to train on (default: the embedded date task)")
    p.add_argument("--budget", "--steps", dest="steps", type=int, default=40, help="steps per method (default 40)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--with-full", action="store_true", help="add full fine-tuning")
    p.add_argument("--model", default=None, help="model to fine-tune (default: the embedded SmolLM2)")
    p.add_argument("--out", default="out/compare-peft")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_compare_peft)

    p = sub.add_parser("masks", help="draw attention patterns: causal vs prefix LM, sliding window, sparse")
    p.add_argument("--kind", default="all", help="causal, prefix, sliding, strided, fixed or all (default)")
    p.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    p.add_argument("--prefix", type=int, default=6, help="prefix length for the prefix LM (default 6)")
    p.add_argument("--window", type=int, default=4, help="sliding window (default 4)")
    p.add_argument("--stride", type=int, default=4, help="stride / block length of sparse patterns (default 4)")
    p.add_argument("--summary", type=int, default=1, help="summary positions per block, fixed pattern (default 1)")
    p.add_argument("--out", default=None, help="also save the picture as this PNG file")
    p.set_defaults(run=cmd_masks)

    from .serve.commands import register as register_serve
    from .show.commands import register

    register(sub)
    register_serve(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _load(args, inference: bool = True):
    from .formats.checkpoint import load
    from .infer.gguf_quant import keeps_quantized, load_gguf_quantized

    if inference and keeps_quantized(args.source, args.dtype, args.device, getattr(args, "quantize", None),
                                     getattr(args, "adapter", None)):
        model, tokenizer = load_gguf_quantized(args.source)
    else:
        model, tokenizer = load(args.source, dtype=args.dtype, device=args.device,
                                adapter=getattr(args, "adapter", None))
    if not inference:
        return model, tokenizer
    from .infer.prepare import prepare_for_inference

    # generate and chat only read the model: fuse, pack or quantize it (a LoRA adapter is folded in first).
    # A compiled step not yet built: generate waits for it (one answer), chat answers eagerly meanwhile.
    compile = getattr(args, "compile", False) and (True if args.command == "generate" else "background")
    prepare_for_inference(model, getattr(args, "quantize", None), compile=compile)
    return model, tokenizer


def _sampling(args, tokenizer) -> dict:
    if args.max_new_tokens < 1:
        raise LmzooError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LmzooError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise LmzooError(f"--top-k must be >= 1, got {args.top_k}")
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                stop_tokens=tokenizer.stop_ids)


def _need_tokenizer(tokenizer, source):
    if tokenizer is None:
        raise LmzooError(f"{source}: no tokenizer found (a preset has none; a directory needs tokenizer.json)")
    return tokenizer


def _stream_reply(model, tokenizer, ids: list[int], sampling: dict) -> list[int]:
    """Print tokens as they come; return them (without the stop token)."""
    import torch

    from .nn.generate import stream

    decoder = tokenizer.stream_decoder()
    out: list[int] = []
    for token in stream(model, torch.tensor([ids]), sampling.pop("max_new_tokens"), **sampling):
        t = int(token[0])
        if t in sampling["stop_tokens"]:
            break
        out.append(t)
        sys.stdout.write(decoder.put(t))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    return out


def cmd_generate(args) -> None:
    model, tokenizer = _load(args)
    tokenizer = _need_tokenizer(tokenizer, args.source)
    text = args.prompt
    if not args.raw and tokenizer.chat_template:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(text)
    _stream_reply(model, tokenizer, ids, {**_sampling(args, tokenizer), "max_new_tokens": args.max_new_tokens})


def cmd_chat(args) -> None:
    model, tokenizer = _load(args)
    tokenizer = _need_tokenizer(tokenizer, args.source)
    if not tokenizer.chat_template:
        raise LmzooError(f"{args.source or 'model'}: has no chat template; use `lmzoo generate --raw`")
    sampling = _sampling(args, tokenizer)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("lmzoo chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tokenizer.encode_chat(history, add_generation_prompt=True)
        sys.stdout.write("assistant> ")
        reply = _stream_reply(model, tokenizer, ids, {**sampling, "max_new_tokens": args.max_new_tokens})
        history.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})


def cmd_info(args) -> None:
    from .show.report import info

    print(info(args.source))  # config.json / GGUF header only, counted on the meta device


def _gguf_type_arg(p) -> None:
    p.add_argument("--type", default=None, choices=("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"),
                   help="GGUF only: the weight matrices' type (default auto: as read from a GGUF source, else f16)")


def cmd_convert(args) -> None:
    model, tokenizer = _load(args, inference=False)
    _save(model, tokenizer, args)


def _save(model, tokenizer, args) -> None:
    """A Hugging Face directory, or a GGUF file when OUT ends in .gguf."""
    if not args.out_dir.endswith(".gguf"):
        from .formats.checkpoint import save_hf_dir

        if args.type is not None:
            raise LmzooError(f"--type applies to GGUF output; {args.out_dir} does not end in .gguf")
        print(f"wrote {save_hf_dir(model, args.out_dir, tokenizer)}")
        return
    from .formats.gguf_write import save_gguf

    path, dropped = save_gguf(model, args.out_dir, tokenizer, type=args.type or "auto")
    for note in dropped:
        print(f"note: not written: {note}")
    print(f"wrote {path}")


def cmd_finetune(args) -> None:
    from .formats.checkpoint import load
    from .peft import LoraConfig, PrefixConfig, PromptConfig
    from .train import TrainConfig, finetune

    world = None
    if args.strategy:
        from .train.distributed import World

        world = World(args.strategy)
    model, tokenizer = load(args.source, dtype=args.dtype, device=args.device)
    tokenizer = _need_tokenizer(tokenizer, args.source)
    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else None
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                      rslora=args.rslora)
    prefix = PrefixConfig(n_virtual=args.num_virtual_tokens, projection=args.prefix_projection,
                          encoder_hidden=args.encoder_hidden, dropout=args.prefix_dropout,
                          text_positions=args.text_positions)
    prompt = PromptConfig(n_virtual=args.num_virtual_tokens, reparam=args.prompt_reparam,
                          encoder_hidden=args.encoder_hidden)
    train = TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
                        seed=args.seed, bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
                        save_every=args.save_every, eval_every=args.eval_every)
    torch_seed(args.seed)
    result = finetune(model, tokenizer, args.data, args.out, method=args.method, lora=lora, prefix=prefix,
                      prompt=prompt, train=train,
                      val_fraction=args.val_fraction, skip_bad_lines=args.skip_bad_lines, too_long=args.too_long,
                      packing=args.pack, resume=args.resume, max_len=args.max_len, world=world,
                      stop_after=args.stop_after, base_name=args.source or "SmolLM2-135M-Instruct")
    if world is not None:
        world.close()
        if world.rank != 0:
            return
    print(f"data: {result.data}")
    print(f"trainable parameters: {result.trainable:,} of {result.total:,} ({result.trainable_percent:.3f}%)")
    print(f"final loss {result.metrics[-1]['loss']:.4f} after {result.metrics[-1]['step']} steps")
    print(f"saved {result.saved}" + (f"\nloss curve {result.loss_png}" if result.loss_png else ""))


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def cmd_merge(args) -> None:
    from .formats.checkpoint import load
    from .peft import strip_lora

    model, tokenizer = load(args.base, dtype=args.dtype, adapter=args.adapter)
    if not any(".lora_" in n for n, _ in model.named_parameters()):
        raise LmzooError(f"{args.adapter}: `lmzoo merge` merges LoRA adapters only")
    strip_lora(model)
    _save(model, tokenizer, args)


def cmd_convert_lora(args) -> None:
    from .formats.checkpoint import load
    from .formats.gguf_write import save_lora_gguf

    if not args.out.endswith(".gguf"):
        raise LmzooError(f"{args.out}: a LoRA GGUF's name must end in .gguf")
    model, _ = load(args.base, adapter=args.adapter)
    print(f"wrote {save_lora_gguf(model, args.out, type=args.type)}")


def cmd_demo(args) -> None:
    from .train.demo import run

    run(args.out, steps=args.steps, seed=args.seed)


def cmd_compare_peft(args) -> None:
    from .train.compare_peft import run

    run(args.out, data=args.data, steps=args.steps, batch_size=args.batch_size, with_full=args.with_full,
        seed=args.seed, model=args.model)


def cmd_masks(args) -> None:
    from .show.mask_pictures import KINDS, as_text, mask_of, save_png, title_of

    kinds = KINDS if args.kind == "all" else [args.kind]
    opts = dict(prefix=args.prefix, window=args.window, stride=args.stride, summary=args.summary)
    masks = {title_of(k, **opts): mask_of(k, args.seq, **opts) for k in kinds}
    print("\n\n".join(as_text(m, t) for t, m in masks.items()))
    if args.out:
        save_png(masks, args.out)
        print(f"\nwrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LmzooError as e:
        print(f"lmzoo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
