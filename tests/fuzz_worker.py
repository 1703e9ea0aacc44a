"""The process in which fuzzed inputs meet lmzoo's parsers (started by test_fuzz.py).

It runs under an address-space limit (RLIMIT_AS), so a runaway allocation is a MemoryError
here rather than the machine swapping; the parent kills it when one case takes too long. It
reads one JSON request per line ({"target", "path"}) and answers one JSON line: the outcome
"ok", "lmzoo" (an LmzooError: its message), or "other" (any other exception: its type and
message, a property violation).
"""

import contextlib
import io
import json
import os
import resource
import sys
import traceback

LIMIT_BYTES = int(os.environ.get("LMZOO_FUZZ_AS_LIMIT", 8 << 30))


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    torch.set_num_threads(1)
    import lmzoo
    from lmzoo.formats import checkpoint, hf, registry
    from lmzoo.formats.gguf_file import read_gguf
    from lmzoo.formats.peft import load_adapter
    from lmzoo.formats.tokenizer import Tokenizer
    from lmzoo.train.data import load_examples

    state = {}

    def tokenizer():
        if "tok" not in state:
            from tiny import smollm_tokenizer

            state["tok"] = smollm_tokenizer()
        return state["tok"]

    def tiny_model():
        from tiny import tiny_model

        return tiny_model()

    def gguf(path):
        f = read_gguf(path)
        for name, t in f.tensors.items():  # what was read is what the header declared, all of it
            assert tuple(t.shape) == f.shapes[name], name
        if "general.architecture" in f.metadata:
            checkpoint.load_gguf(path)

    def template(path):
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        tok = Tokenizer(tokenizer()._backend, tokenizer().special_tokens, chat_template=source)
        tok.encode_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
        try:  # a message spelling a control token: kept plain, or refused where the template rewrites it
            tok.encode_chat([{"role": "user", "content": "hi <|im_end|>"}])
        except lmzoo.LmzooError as e:
            if not str(e).startswith("message 0 contains the control token"):
                raise

    def cli(path):
        with open(path, encoding="utf-8") as fh:
            argv = json.load(fh)
        from lmzoo.cli import main as cli_main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code
        text = err.getvalue()
        if code not in (0, 1, 2, None) or "Traceback" in text:
            raise AssertionError(f"exit {code}: {text[-500:]}")
        if code == 1 and not (text.startswith("lmzoo: error: ") and text.count("\n") == 1):
            raise AssertionError(f"not one line: {text[-500:]}")
        if code == 1:
            raise lmzoo.LmzooError(text.strip())
        if code == 2:  # argparse's usage line and its "error:" line
            if "error: " not in text:
                raise AssertionError(f"exit 2 without an error line: {text[-500:]}")
            raise lmzoo.LmzooError(text.strip().splitlines()[-1])

    targets = {
        "gguf": gguf,
        "safetensors": lambda path: hf.read_safetensors([path]),
        "config": lambda path: registry.config_from_hf(hf.read_config_json(path), os.path.join(path, "config.json")),
        "tokenizer": lambda path: Tokenizer.from_dir(path),
        "adapter": lambda path: load_adapter(tiny_model(), path),
        "jsonl": lambda path: load_examples(path, tokenizer(), 64),
        "template": template,
        "cli": cli,
    }
    for line in sys.stdin:
        request = json.loads(line)
        try:
            targets[request["target"]](request["path"])
            answer = {"outcome": "ok"}
        except lmzoo.LmzooError as e:
            answer = {"outcome": "lmzoo", "message": str(e)}
        except BaseException as e:  # noqa: BLE001  (every other exception is what the fuzzing looks for)
            answer = {"outcome": "other", "message": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
