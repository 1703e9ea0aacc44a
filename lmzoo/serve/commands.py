"""`lmzoo serve`: an OpenAI-compatible server (lmzoo.serve.api) over the engine (lmzoo.serve.engine)."""

from __future__ import annotations

import sys

from ..errors import LmzooError


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching; "
                                     "every adapter is a model")
    p.add_argument("--model", dest="source", default=None,
                   help="preset, Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: from the source)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve an adapter (LoRA, P-tuning v2, prompt tuning) as the model NAME; repeatable")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the "
                                                    "LMZOO_API_KEY environment variable, else no key)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoding together, per model (default 8)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="prompt + completion tokens per request, at most (default 2048, or the model's context)")
    p.add_argument("--max-tokens", type=int, default=1024, help="completion tokens per request, at most (default 1024)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting, at most; more get 503 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body bytes, at most (default 1 MiB)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantization")
    p.add_argument("--compile", action="store_true",
                   help="decode with compiled steps (about 2x faster on CPU), built once per model layout in "
                        "the background while the server answers eagerly, and kept in ~/.cache/lmzoo/compiled")
    p.set_defaults(run=cmd_serve)


def _adapters(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LmzooError(f"--adapter {spec!r}: write NAME=DIR")
        if name in (n for n, _ in out):
            raise LmzooError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out.append((name, path))
    return out


def loader(args, adapters):
    """A function that loads the models and builds the engine (run while /health says 503)."""

    def load():
        import copy
        import os

        from ..formats.checkpoint import load as load_model
        from ..formats.peft import SLICED, load_adapter, read_adapter_config
        from ..infer.gguf_quant import keeps_quantized, load_gguf_quantized
        from ..infer.prepare import prepare_for_inference
        from .engine import Engine

        if keeps_quantized(args.source, args.dtype, args.device, args.quantize, adapters or None):
            base, tokenizer = load_gguf_quantized(args.source)
        else:
            base, tokenizer = load_model(args.source, dtype=args.dtype, device=args.device)
        if tokenizer is None:
            raise LmzooError(f"{args.source}: no tokenizer found; the server needs one")
        base_name = args.name or (os.path.basename(os.path.normpath(args.source)) if args.source
                                  else "smollm2-135m-instruct")
        models, virtual = {}, {}
        for name, path in adapters:
            if name == base_name:
                raise LmzooError(f"--adapter {name}={path}: {name!r} is the base model's name")
            kind = read_adapter_config(path).get("peft_type")
            if kind in ("LORA", SLICED):
                lora = copy.deepcopy(base)  # folded into weights of its own: the base stays as it is
                load_adapter(lora, path)
                models[name] = prepare_for_inference(lora, args.quantize, compile=args.compile and "background")
            else:
                load_adapter(base, path)
                virtual[name], base.virtual = (base_name, base.virtual), None
        compile = args.compile and "background"  # the server answers eagerly until a step is compiled
        models = {base_name: prepare_for_inference(base, args.quantize, compile=compile), **models}
        engine = Engine(models, virtual, max_batch=args.max_batch, max_context=args.max_context,
                        max_queue=args.max_queue).start()
        print(f"lmzoo serve: ready; models: {', '.join(engine.names())}", file=sys.stderr, flush=True)
        return engine, tokenizer

    return load


def cmd_serve(args) -> None:
    import os

    try:
        import uvicorn

        from .api import Limits, Server, build_app
    except ImportError as e:
        raise LmzooError(f"serving needs the serve extra: pip install 'lmzoo[serve]' ({e.name} is missing)") from None
    for flag, value in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-context", args.max_context),
                        ("--max-tokens", args.max_tokens), ("--max-queue", args.max_queue),
                        ("--max-body", args.max_body)):
        if value < (0 if flag == "--port" else 1):
            raise LmzooError(f"{flag} {value}: must be at least {0 if flag == '--port' else 1}")
    adapters = _adapters(args.adapter)
    for name, path in adapters:
        if not os.path.isdir(path):
            raise LmzooError(f"--adapter {name}={path}: no such directory")
    try:
        from .metrics import Metrics

        metrics = Metrics()
    except ImportError:
        metrics = None
    server = Server(loader(args, adapters), api_key=args.api_key or os.environ.get("LMZOO_API_KEY") or None,
                    limits=Limits(max_tokens=args.max_tokens, max_body_bytes=args.max_body), metrics=metrics)
    print(f"lmzoo serve: http://{args.host}:{args.port} (loading the model; /health says 503 until ready)",
          file=sys.stderr, flush=True)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
