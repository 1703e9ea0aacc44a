"""The embedded SmolLM2-135M-Instruct GGUF: lmzoo's loader vs transformers loading the same file."""

import os
import subprocess
import sys

import pytest
import torch

import lmzoo

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea,",
    "机器学习是",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    path = lmzoo.default_model_path()
    ours, tok = lmzoo.load()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    return ours, tok, ref


def test_config_is_read_from_the_gguf(models):
    ours, tok, _ = models
    c = ours.config
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_base == 100000.0
    assert ours.num_parameters() == 134_515_008


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(models, prompt):
    ours, tok, ref = models
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_greedy_continuations_are_identical_for_32_tokens(models):
    ours, tok, ref = models
    for prompt in PROMPTS[:3]:
        ids = torch.tensor([tok.encode(prompt)])
        mine = ours.generate(ids, 32)
        theirs = ids
        with torch.no_grad():  # transformers' greedy choice, step by step, never stopping at EOS
            for _ in range(32):
                theirs = torch.cat([theirs, ref(theirs).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert mine.tolist() == theirs.tolist()


def test_chat_answer_and_batched_generation(models):
    ours, tok, _ = models
    chats = ["What is the capital of France?", "Name a primary colour."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
               for q in chats]
    batched = ours.generate(prompts, max_new_tokens=24, stop_tokens=tok.stop_ids)
    for p, out in zip(prompts, batched, strict=True):
        alone = ours.generate([p], max_new_tokens=24, stop_tokens=tok.stop_ids)[0]
        assert out == alone
    answer = tok.decode(batched[0][len(prompts[0]):], skip_special_tokens=True)
    assert "Paris" in answer


def test_saved_directory_loads_in_transformers_with_identical_logits(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, tok, ref = models
    lmzoo.save_hf_dir(ours, tmp_path / "smol", tok)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    ids = torch.tensor([hf_tok.encode(PROMPTS[0])])
    with torch.no_grad():
        # the same weights in the same engine: transformers reading our directory computes what it
        # computes from the GGUF (lmzoo's own logits differ by its matmul library's rounding)
        assert (again(ids).logits - ref(ids).logits).abs().max().item() < 1e-5
    reloaded, tok2 = lmzoo.load(tmp_path / "smol")
    assert reloaded.config == ours.config.replace(family="llama")
    assert tok2.encode("Hello 12 世界") == tok.encode("Hello 12 世界")


def test_cli_generate_answers(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmzoo", "generate", "What is the capital of France?",
                        "--max-new-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_cli_chat_is_multi_turn_and_streams():
    r = subprocess.run([sys.executable, "-m", "lmzoo", "chat", "--max-new-tokens", "24"],
                       input="What is the capital of France?\nAnd of Italy?\n/exit\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.splitlines() if "assistant>" in line]
    assert len(replies) == 2 and "Paris" in replies[0] and "Rome" in replies[1]
