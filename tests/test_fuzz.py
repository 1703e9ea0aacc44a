"""Every parser of a file a stranger can hand lmzoo, fuzzed with hypothesis.

The property, for every input: a correct object, or one LmzooError whose single line names the
file; never another exception, never a hang (a case gets CASE_SECONDS), never a runaway
allocation (the worker runs under RLIMIT_AS). Inputs are valid seed files mutated (bits
flipped, bytes set, cut short, extended, 8-byte fields set to extreme values) and structured
bad ones. make test runs the fixed-seed bounded profile; make fuzz (LMZOO_FUZZ=long) the long
one, and with LMZOO_FUZZ_REPORT=FILE writes the counts that docs/reliability.md quotes.
"""

import collections
import json
import os
import select
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
LONG = os.environ.get("LMZOO_FUZZ") == "long"
CASE_SECONDS = 60
settings.register_profile("bounded", max_examples=60, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=600, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile("long" if LONG else "bounded")
COUNTS: dict = collections.defaultdict(collections.Counter)


class Worker:
    """A fuzz_worker.py process, restarted after a hang or a crash."""

    def __init__(self):
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fuzz_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def run(self, target: str, path: str) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"target": target, "path": path}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_SECONDS + 60)  # + start-up
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            hung = self.proc.poll() is None
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "hang" if hung else "crash", "message": f"{target} {path}"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()
    report = os.environ.get("LMZOO_FUZZ_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as f:
            json.dump({t: dict(c) for t, c in COUNTS.items()}, f, indent=1)


def check(worker, target, path, *, names=None):
    """Run one case and assert the property."""
    answer = worker.run(target, str(path))
    COUNTS[target][answer["outcome"]] += 1
    if answer["outcome"] not in ("ok", "lmzoo"):
        pytest.fail(f"{target} {path}: {answer['outcome']}: {answer['message']}\n{answer.get('traceback', '')}")
    if answer["outcome"] == "lmzoo":
        message = answer["message"]
        assert "\n" not in message, message
        assert str(names or path) in message, message


# ----------------------------------------------------------------------------- mutations of seed files
EXTREMES = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]
edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.integers(0, 2**20), st.sampled_from(EXTREMES)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.integers(0, 255)),
)


def mutate(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for kind, pos, value in edits:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= 1 << value
        elif kind == "set":
            data[pos] = value
        elif kind == "u64":
            data[pos:pos + 8] = struct.pack("<Q", value)
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = bytes([value]) * 16
    return bytes(data)


def gguf_seed() -> bytes:
    import numpy as np
    from test_gguf_malformed import ARR, STR, U32, gguf, kv, string, tensor_info, u32

    tokens = b"".join(string(t) for t in ("<s>", "a", "b", "ab"))
    kvs = [kv("general.architecture", STR, string("llama")), kv("llama.block_count", U32, u32(1)),
           kv("tokenizer.ggml.tokens", ARR, u32(STR) + struct.pack("<Q", 4) + tokens),
           kv("general.alignment", U32, u32(32))]
    data = np.arange(64, dtype=np.float32).tobytes()
    return gguf(kvs, [tensor_info("token_embd.weight", [8, 4]), tensor_info("output_norm.weight", [8], offset=128)],
                data[:128] + data[:32])


def safetensors_seed() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)})


def safetensors_header(header, body=b"\0" * 64) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


SAFETENSORS_CASES = {
    "a huge header length": struct.pack("<Q", 2**63) + b"{}",
    "a header length past the end": struct.pack("<Q", 10**6) + b"{}",
    "a header that is not an object": safetensors_header([1, 2]),
    "duplicate keys": safetensors_header(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                         b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'),
    "inverted offsets": safetensors_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
    "overlapping offsets": safetensors_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
    "short offsets": safetensors_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}),
    "dtype x shape != bytes": safetensors_header({"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}),
    "trailing bytes": safetensors_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}),
    "a truncated shard": safetensors_header({"a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_cases(worker, tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_CASES[case])
    answer = worker.run("safetensors", str(path))
    COUNTS["safetensors"][answer["outcome"]] += 1
    assert answer["outcome"] == "lmzoo", answer  # each of these is malformed: never "ok"
    assert str(path) in answer["message"] and "\n" not in answer["message"]


BINARY_SEEDS = {"gguf": (gguf_seed, "f.gguf"), "safetensors": (safetensors_seed, "model.safetensors")}


@pytest.mark.parametrize("target", BINARY_SEEDS)
@settings(PROFILE)
@given(edits=st.lists(edit, min_size=1, max_size=4))
def test_binary_files_mutated(worker, tmp_path_factory, target, edits):
    """The GGUF reader (header, tensors, then the model) and the safetensors reader."""
    seed, name = BINARY_SEEDS[target]
    path = tmp_path_factory.mktemp(target) / name
    path.write_bytes(mutate(seed(), edits))
    check(worker, target, path)


# ----------------------------------------------------------------------------- JSON files
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)

TINY_CONFIG = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


@settings(PROFILE)
@given(changes=st.dictionaries(st.sampled_from(sorted(TINY_CONFIG) + ["rope_scaling", "sliding_window", "auto_map",
                                                                       "tie_word_embeddings", "head_dim"]),
                               json_values, min_size=1, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=64)))
@example(changes={"model_type": ["llama"]}, raw=None)  # found: an unhashable model_type was a TypeError
@example(changes={"rope_scaling": [1]}, raw=None)
@example(changes={"hidden_size": -64}, raw=None)
@example(changes={"num_attention_heads": 0}, raw=None)
@example(changes={}, raw=b"[" * 100000)
@example(changes={}, raw=b"\xff\xfe{}")
@example(changes={}, raw=b"[1, 2]")
def test_config_json(worker, tmp_path_factory, changes, raw):
    d = tmp_path_factory.mktemp("config")
    text = raw if raw is not None else json.dumps({**TINY_CONFIG, **changes}).encode()
    (d / "config.json").write_bytes(text)
    check(worker, "config", d)


@settings(PROFILE)
@given(tokenizer_edits=st.lists(edit, max_size=3), config=st.one_of(st.none(), json_values, st.binary(max_size=40)))
@example(tokenizer_edits=[], config=b"\xff")
@example(tokenizer_edits=[], config={"bos_token": {"content": 5}})  # found: a TypeError in the backend
@example(tokenizer_edits=[], config={"eos_token": 7})
def test_tokenizer_files(worker, tmp_path_factory, tokenizer_edits, config):
    from tiny import smollm_tokenizer

    d = tmp_path_factory.mktemp("tok")
    seed = tmp_path_factory.getbasetemp() / "tokenizer-seed.json"
    if not seed.exists():
        smollm_tokenizer()._backend.save(str(seed))
    (d / "tokenizer.json").write_bytes(mutate(seed.read_bytes(), tokenizer_edits) if tokenizer_edits
                                       else seed.read_bytes())
    if config is not None:
        (d / "tokenizer_config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    check(worker, "tokenizer", d)


@settings(PROFILE)
@given(config=st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "num_virtual_tokens",
                                               "use_dora", "num_layers", "token_dim", "lora_dropout"]),
                              json_values, max_size=4),
       kind=st.sampled_from(["LORA", "PREFIX_TUNING", "PROMPT_TUNING", "LMZOO_SLICED_LORA"]),
       tensor_edits=st.lists(edit, max_size=3))
@example(config={"r": -1}, kind="LORA", tensor_edits=[])
@example(config={"num_virtual_tokens": 10**12}, kind="PROMPT_TUNING", tensor_edits=[])  # found: a 128 TB allocation
def test_adapter_files(worker, tmp_path_factory, config, kind, tensor_edits):
    d = tmp_path_factory.mktemp("adapter")
    seeds = tmp_path_factory.getbasetemp() / "adapter-seeds"
    if not seeds.exists():
        from tiny import tiny_model

        from lmzoo.formats.peft import save_adapter
        from lmzoo.peft import LoraConfig, PromptConfig, add_lora, add_virtual

        model = tiny_model()
        add_lora(model, LoraConfig(r=4, targets=("q", "v")))
        save_adapter(model, str(seeds / "LORA"))
        model = tiny_model()
        add_virtual(model, PromptConfig(n_virtual=4, init="random"))
        save_adapter(model, str(seeds / "PROMPT_TUNING"))
    seed = seeds / ("PROMPT_TUNING" if "PROMPT" in kind or "PREFIX" in kind else "LORA")
    base = json.loads((seed / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**base, "peft_type": kind, **config}))
    (d / "adapter_model.safetensors").write_bytes(mutate((seed / "adapter_model.safetensors").read_bytes(),
                                                         tensor_edits))
    check(worker, "adapter", d)


# ----------------------------------------------------------------------------- JSONL data
record = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=40)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "response": st.text(max_size=20)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": st.text(max_size=20)}),
        max_size=4)}),
    json_values,
)
line = st.one_of(record.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30),
                 st.just(b"[" * 50000 + b"]" * 50000), st.just(b'{"text": NaN}'),
                 st.just(b'\xef\xbb\xbf{"text": "a"}'), st.just(b'{"text": "\xff\xfe"}'))


@settings(PROFILE)
@given(lines=st.lists(line, max_size=6))
@example(lines=[])
@example(lines=[b"[" * 100000])
@example(lines=[b"\xef\xbb\xbf" + json.dumps({"text": "a BOM first"}).encode()])
@example(lines=[b'{"text": "ok"}', b"\xff\xfe not UTF-8"])  # found: a UnicodeDecodeError
@example(lines=[b'{"prompt": "1", "response": NaN}'])
@example(lines=[b'{"messages": [{"role": "assistant", "content": ""}]}'])  # found: an error naming no file
@example(lines=[b"42", b'"a string"', b"null"])
def test_jsonl_data(worker, tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    check(worker, "jsonl", path)


# ----------------------------------------------------------------------------- chat templates
template_piece = st.sampled_from([
    "{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{ m.role }}", "{% if add_generation_prompt %}",
    "{% endif %}", "<|im_start|>", "<|im_end|>", "{{ bos_token }}", "{{ raise_exception('no') }}", "{{ 'A' * 10**9 }}",
    "{{ cycler.__init__.__globals__ }}", "{{ ''.__class__.__mro__ }}", "{% set x = namespace(a=1) %}",
    "{{ messages[5] }}", "{{ m['content'] | trim }}", "{% for i in range(10**5) %}{% for j in range(10**5) %}",
    "{% endfor %}{% endfor %}", "{{ 1 / 0 }}", "{{ tools | tojson }}", "{%", "}}", "{{ x.y.z() }}", "\n",
])


@settings(PROFILE)
@given(pieces=st.lists(template_piece | st.text(max_size=8), max_size=8))
@example(pieces=["{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"])
def test_chat_templates(worker, tmp_path_factory, pieces):
    path = tmp_path_factory.mktemp("template") / "t.jinja"
    path.write_text("".join(pieces), encoding="utf-8")
    answer = worker.run("template", str(path))
    COUNTS["template"][answer["outcome"]] += 1
    assert answer["outcome"] in ("ok", "lmzoo"), answer
    if answer["outcome"] == "lmzoo":
        expected = ("chat template: ", "message ", "this model has no chat template")
        assert answer["message"].startswith(expected) and "\n" not in answer["message"]


# ----------------------------------------------------------------------------- the command line
# convert and merge are left out: with a valid source they write a whole model, which is not parsing.
arg = st.sampled_from(["info", "diff", "families", "masks", "diagram", "generate", "chat", "finetune", "--format",
                       "markdown", "json", "--kind", "all", "--seq", "-3", "0", "100000000000", "--out", "x.bmp",
                       "--vs", "llama2-7b", "gpt2", "nonexistent/path", "model.gguf", "--context", "nan", "--model",
                       "--dtype", "fp8", "--quantize", "int3", "--temperature", "-1", "--help"]) | st.text(max_size=10)


@settings(PROFILE)
@given(argv=st.lists(arg, max_size=6))
def test_cli_arguments(worker, tmp_path_factory, argv):
    d = tmp_path_factory.mktemp("cli")
    argv = [a.replace("x.bmp", str(d / "x.bmp")) for a in argv]
    if argv[:1] in (["generate"], ["chat"], ["finetune"]) and "--model" not in argv:
        argv += ["--model", str(d / "missing")]  # never load the embedded model for minutes of generation
    path = d / "argv.json"
    path.write_text(json.dumps(argv))
    answer = worker.run("cli", str(path))
    COUNTS["cli"][answer["outcome"]] += 1
    assert answer["outcome"] in ("ok", "lmzoo"), (argv, answer)
