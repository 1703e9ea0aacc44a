"""GGUF both ways against the real llama.cpp (`make test-interop`; tests/interop/setup.sh).

- llama.cpp's own converter (convert_hf_to_gguf.py) writes a tiny random HF checkpoint of each
  family; lmzoo reads the file and matches transformers on the source checkpoint.
- lmzoo writes each family; llama.cpp (the llama-cpp-python bindings) reads the file and matches
  lmzoo's logits and greedy tokens; transformers' GGUF loader reads it too, where it has the arch.
Every tiny model has the real SmolLM2 vocabulary, so tokenizers are exercised too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.formats.gguf_file import read_gguf
from lmzoo.formats.gguf_write import save_gguf

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from hf_oracle import tiny_hf_model  # noqa: E402
from tiny import smollm_tokenizer  # noqa: E402

pytestmark = pytest.mark.interop

VOCAB = 49152
# name -> (config overrides, the llama.cpp architecture it is written as); the name is the model_type
# up to a dot
FAMILIES = {
    "llama": ({"num_key_value_heads": 2}, "llama"),
    # Llama 3.1's rotary scaling, which llama.cpp keeps as a rope_freqs tensor of per-frequency factors
    "llama.3": ({"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, "llama"),
    "mistral": ({"num_key_value_heads": 2}, "llama"),
    "mixtral": ({"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}, "llama"),
    "qwen2": ({"num_key_value_heads": 2}, "qwen2"),
    # n_positions as GPT-2's own: transformers' GGUF loader does not read context_length for gpt2
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "max_position_embeddings": 1024}, "gpt2"),
    # llama.cpp's converter writes transformers' glm as its chatglm arch, but with an epsilon of 1e-5 and a
    # rotary base of 10000 whatever config.json says (and context_length = hidden_size): the tiny model uses
    # those values, so that the comparison tests the layout rather than the converter's known slips.
    "glm": ({"num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "pad_token_id": None}, "chatglm"),
    "glm4": ({"num_key_value_heads": 2, "head_dim": 16, "pad_token_id": None}, "glm4"),
}
# Families without a transformers class (remote code): lmzoo's own tiny configs, written by lmzoo only.
LMZOO_ONLY = {"qwen": ("qwen-7b", "qwen"), "chatglm3": ("chatglm3-6b", "chatglm"),
              # ChatGLM2-6B-32K: rope_ratio interpolates positions, llama.cpp's linear rope scaling
              "chatglm2-32k": ("chatglm2-6b", "chatglm", {"rope_scaling": "linear", "rope_factor": 16.0})}
# what transformers' GGUF loader reads (it ignores rope_freqs, so not Llama 3.1's scaling)
TRANSFORMERS_GGUF = ("llama", "mistral", "qwen2", "gpt2")
TINY = dict(n_layers=2, d_model=64, n_heads=4, d_ff=96, vocab_size=VOCAB, max_seq_len=128)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:  # never skipped: `make test-interop` installs it
        pytest.fail("llama_cpp is not installed; run `make test-interop` (tests/interop/setup.sh builds it)")
    return llama_cpp


@pytest.fixture(scope="session")
def converter_dir():
    src = os.environ.get("LMZOO_LLAMA_CPP_SRC")
    if not src or not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        pytest.fail("LMZOO_LLAMA_CPP_SRC must name llama.cpp's extracted sources; run `make test-interop`")
    return src


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """model_type -> a tiny random transformers checkpoint with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = smollm_tokenizer()
    out = {}
    for model_type, (overrides, _) in FAMILIES.items():
        # GLM's converters look up "<|user|>" (their end-of-turn token): the GLM models get it as an added
        # token past SmolLM2's ids, and a vocabulary padded past it, as GLM's own is.
        glm = model_type.startswith("glm")
        model = tiny_hf_model(model_type.split(".")[0], **{"vocab_size": VOCAB + 64 if glm else VOCAB, **overrides})
        if model_type == "mixtral":  # a decisive router: Q8_0's noise must not flip the experts chosen
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("mlp.gate.weight"):
                        p.mul_(10)
        path = root / model_type
        model.save_pretrained(path)
        tokenizer.save(path)
        if glm:
            import json

            spec = json.loads((path / "tokenizer.json").read_text())
            spec["added_tokens"].append({"id": VOCAB, "content": "<|user|>", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True})
            (path / "tokenizer.json").write_text(json.dumps(spec))
        if model_type == "gpt2":  # the converter reads n_ctx, which transformers 5 no longer saves
            import json

            config = json.loads((path / "config.json").read_text())
            config["n_ctx"] = config["n_positions"]
            (path / "config.json").write_text(json.dumps(config))
        out[model_type] = (model, str(path))
    return out


# transformers 5's AutoTokenizer picks a tokenizer class by model_type (Qwen2Tokenizer for qwen2), and
# that class rebuilds the pre-tokenizer for its own family's regex over our SmolLM2 vocabulary; the
# converter then hashes its output and finds no known pre-tokenizer. Run the converter with the
# tokenizer.json taken as it is, as it would be for a real checkpoint of that family.
_RUN_CONVERTER = """
import os, runpy, sys, transformers
from transformers.tokenization_utils_tokenizers import TokenizersBackend
transformers.AutoTokenizer.from_pretrained = lambda path, **kw: TokenizersBackend.from_pretrained(path, **kw)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _convert(converter_dir, hf_dir, out, outtype):
    run = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, os.path.join(converter_dir, "convert_hf_to_gguf.py"),
                          hf_dir, "--outfile", str(out), "--outtype", outtype], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out)


def _ids(n=24, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy(step, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, where step(ids) gives the logits of the last position."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(step(ids))))
    return ids[len(prompt):]


def _lmzoo_last(model):
    def step(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -1].numpy()
    return step


# ----------------------------------------------------------------------------- llama.cpp writes, lmzoo reads
@pytest.mark.parametrize("model_type", FAMILIES)
def test_lmzoo_reads_what_llama_cpp_converter_writes(model_type, hf_dirs, converter_dir, tmp_path):
    hf_model, hf_dir = hf_dirs[model_type]
    ids = _ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
    path = _convert(converter_dir, hf_dir, tmp_path / "f32.gguf", "f32")
    assert read_gguf(path, load_tensors=False).metadata["general.architecture"] == FAMILIES[model_type][1]
    ours, tokenizer = lmzoo.load(path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
    assert tokenizer.encode("Hello world, 12345!") == smollm_tokenizer().encode("Hello world, 12345!")


    # Q8_0: the reference must run the same quantized weights, since a 49k-token random model has
    # top-1 margins (~0.006) below Q8_0's effect on its logits (~0.1). transformers' own GGUF loader
    # dequantizes the file independently where it knows the arch: then logits and greedy tokens agree.
    q8_path = _convert(converter_dir, hf_dir, tmp_path / "q8.gguf", "q8_0")
    assert read_gguf(q8_path, load_tensors=False).tensor_types["token_embd.weight"] == "Q8_0"
    q8, _ = lmzoo.load(q8_path)
    prompt = ids[0, :8].tolist()
    if model_type in TRANSFORMERS_GGUF:
        import transformers

        reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q8.gguf")
        with torch.no_grad():
            torch.testing.assert_close(q8(ids), reference(ids).logits, atol=1e-4, rtol=0)

        def reference_step(x):
            with torch.no_grad():
                return reference(torch.tensor([x])).logits[0, -1].numpy()
        assert _greedy(_lmzoo_last(q8), prompt, 8) == _greedy(reference_step, prompt, 8)
    else:
        # Elsewhere: lmzoo's error from the fp32 original is no larger than llama.cpp's own on that file
        # (a layout slip would be ~10x larger), and a small fraction of the logits' spread.
        with torch.no_grad():
            ours = (q8(ids) - expected).abs().max().item()
        theirs = np.abs(_llama_cpp_logits(q8_path, ids[0].tolist()) - expected[0].numpy()).max()
        assert ours <= theirs and ours < 0.4 * expected.std().item(), (ours, theirs)


# ----------------------------------------------------------------------------- lmzoo writes, llama.cpp reads
def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = _llama_cpp()
    # F32 keys and values: llama.cpp's default F16 cache alone moves logits by ~1e-2
    llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0, seed=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _llama_cpp_greedy(path, prompt: list[int], n: int) -> list[int]:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def _lmzoo_model(name, hf_dirs):
    if name in FAMILIES:
        return lmzoo.load(hf_dirs[name][1])
    torch.manual_seed(0)
    preset, _, *extra = LMZOO_ONLY[name]
    model = lmzoo.from_config(lmzoo.preset(preset).replace(**TINY, **(extra[0] if extra else {})))
    with torch.no_grad():  # norms and biases away from 1 and 0, so their layout is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), smollm_tokenizer()


@pytest.mark.parametrize("name", [*FAMILIES, *LMZOO_ONLY])
def test_llama_cpp_reads_what_lmzoo_writes(name, hf_dirs, tmp_path):
    model, tokenizer = _lmzoo_model(name, hf_dirs)
    path, dropped = save_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32")
    arch = FAMILIES[name][1] if name in FAMILIES else LMZOO_ONLY[name][1]
    assert read_gguf(path, load_tensors=False).metadata["general.architecture"] == arch
    ids = _ids()[0].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = _llama_cpp_logits(path, ids)
    # ggml computes GELU from a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), ~1e-3 off in GPT-2's logits
    np.testing.assert_allclose(theirs, ours, atol=2e-3 if arch == "gpt2" else 1e-3, rtol=0)
    assert _llama_cpp_greedy(path, ids[:8], 8) == _greedy(_lmzoo_last(model), ids[:8], 8)
    # and lmzoo reads its own file back as the same model
    back, _ = lmzoo.load(path)
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor([ids]))[0].numpy(), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt2"])
def test_transformers_reads_what_lmzoo_writes(model_type, hf_dirs, tmp_path):
    import transformers

    model, tokenizer = lmzoo.load(hf_dirs[model_type][1])
    path, _ = save_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_llama_cpp_tokenizes_as_lmzoo(tmp_path):
    """The vocabulary lmzoo writes (from tokenizer.json) splits text as llama.cpp reads it."""
    model, tokenizer = _lmzoo_model("qwen", {})
    from lmzoo.formats.tokenizer import Tokenizer

    tokenizer.save(tmp_path / "tok")
    rebuilt = Tokenizer.from_dir(tmp_path / "tok")  # no GGUF metadata kept: built from tokenizer.json
    path, _ = save_gguf(model, tmp_path / "m.gguf", rebuilt, type="f32")
    llm = _llama_cpp().Llama(path, n_ctx=64, verbose=False, vocab_only=True)
    for text in ["Hello world", "  two  spaces\n\nand 1234567 digits", "héllo wörld ✓ 你好", "<|im_start|>user\nhi"]:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == rebuilt.encode(text, add_special_tokens=False)


def test_embedded_model_round_trip_runs_in_llama_cpp(tmp_path):
    """lmzoo -> GGUF (each tensor in the type it was read) -> llama.cpp: the same tokens as the original file."""
    model, tokenizer = lmzoo.load()
    path, _ = save_gguf(model, tmp_path / "smollm2.gguf", tokenizer)
    prompt = tokenizer.encode("The capital of France is")
    assert _llama_cpp_greedy(path, prompt, 12) == _llama_cpp_greedy(lmzoo.default_model_path(), prompt, 12)


# ----------------------------------------------------------------------------- LoRA, merged and not
@pytest.mark.parametrize("name, targets", [("llama", ("q", "k", "v", "o", "down")), ("chatglm3", ("q", "v", "down"))])
def test_lora_gguf_and_merged_gguf_match_lmzoo_in_llama_cpp(name, targets, hf_dirs, tmp_path):
    """llama.cpp applies lmzoo's LoRA GGUF to the base unmerged (--lora), and runs the merged GGUF
    `lmzoo merge` writes: both as lmzoo with the adapter. chatglm3's q|k|v is one matrix, so its q
    and v adapters are slices of it (one stacked A, a block-diagonal B); llama's q and k rows are
    permuted for llama.cpp's rotary, in B as in the weight."""
    from lmzoo.formats.gguf_write import save_lora_gguf
    from lmzoo.peft import LoraConfig, add_lora, strip_lora

    model, tokenizer = _lmzoo_model(name, hf_dirs)
    base, _ = save_gguf(model, tmp_path / "base.gguf", tokenizer, type="f32")
    add_lora(model, LoraConfig(r=4, alpha=8, targets=targets, rslora=name == "chatglm3"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    lora = save_lora_gguf(model, tmp_path / "lora.gguf")
    meta = read_gguf(lora, load_tensors=False).metadata
    assert (meta["general.type"], meta["adapter.type"]) == ("adapter", "lora")
    ids = _ids()[0].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    llm = _llama_cpp().Llama(base, lora_path=lora, n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    np.testing.assert_allclose(np.array(llm.scores[: len(ids)]), ours, atol=1e-3, rtol=0)
    with torch.no_grad():
        base_logits = lmzoo.load(base)[0](torch.tensor([ids]))[0].numpy()
    assert np.abs(base_logits - ours).max() > 0.1  # the adapter changes the model: the match above means something

    want = _greedy(_lmzoo_last(model), ids[:8], 8)
    strip_lora(model)
    merged, _ = save_gguf(model, tmp_path / "merged.gguf", tokenizer, type="f32")
    assert _llama_cpp_greedy(merged, ids[:8], 8) == want


def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_lmzoo(tmp_path):
    """A SentencePiece vocabulary (tokenizer.ggml.model = llama), from a SentencePiece BPE model trained
    with Llama's settings: llama.cpp's tokenizer and lmzoo's give the same ids, BOS included."""
    from test_tokenizer_spm import TEXTS, corpus, gguf_vocabulary, train_sentencepiece

    from lmzoo.formats.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(gguf_vocabulary(train_sentencepiece(tmp_path)), "spm")
    torch.manual_seed(0)
    model = lmzoo.from_config(lmzoo.preset("llama2-7b").replace(**{**TINY, "vocab_size": 600}))
    path, _ = save_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32")
    llm = _llama_cpp().Llama(path, n_ctx=64, verbose=False, vocab_only=True)
    for text in [t for t in TEXTS if t] + corpus(20, seed=2).split("\n"):
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer.encode(text), text
