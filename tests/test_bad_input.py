"""Each bad input gets one clear LmzooError naming the file, tensor or field; never a wrong model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_oracle import save, tiny_hf_model
from safetensors.torch import load_file, save_file

import lmzoo


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save(tiny_hf_model("llama", num_key_value_heads=2), tmp_path_factory.mktemp("good") / "m")


def copy_dir(src, dst, edit_config=None, edit_tensors=None):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    if edit_config:
        edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_path():
    with pytest.raises(lmzoo.LmzooError, match="/no/such/dir: no such file or directory"):
        lmzoo.load("/no/such/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(lmzoo.LmzooError, match="no config.json"):
        lmzoo.load(tmp_path)


def test_unsupported_model_type_names_the_supported_ones(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m", edit_config=lambda c: c.update(model_type="mamba"))
    with pytest.raises(lmzoo.LmzooError, match=r"model_type 'mamba' is not supported.*llama.*qwen2"):
        lmzoo.load(d)


def test_unimplemented_rope_type_is_an_error(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m",
                 edit_config=lambda c: c.update(
                     rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}))
    with pytest.raises(lmzoo.LmzooError, match="rope_type 'yarn' is not implemented"):
        lmzoo.load(d)


def test_missing_tensor(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(lmzoo.LmzooError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        lmzoo.load(d)


def test_unexpected_tensor(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m",
                 edit_tensors=lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(lmzoo.LmzooError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        lmzoo.load(d)


def test_layer_beyond_the_config_is_unexpected(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m", edit_config=lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(lmzoo.LmzooError, match=r"unexpected tensors: model\.layers\.1\."):
        lmzoo.load(d)


def test_wrong_shape(good_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    d = copy_dir(good_dir, tmp_path / "m", edit_tensors=shrink)
    with pytest.raises(lmzoo.LmzooError,
                       match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[8, 64\], expected \[32, 64\]"):
        lmzoo.load(d)


def test_truncated_safetensors(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(lmzoo.LmzooError, match=r"model\.safetensors: cannot read safetensors file"):
        lmzoo.load(d)


def test_truncated_gguf(tmp_path):
    src = lmzoo.default_model_path()
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as s:
        f.write_bytes(s.read(5_000_000))
    with pytest.raises(lmzoo.LmzooError, match="cut.gguf"):
        lmzoo.load(f)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(lmzoo.LmzooError,
                       match="GGUF architecture .mamba. is not supported; supported: llama, qwen2, gpt2, qwen"):
        lmzoo.load(tmp_path / "m.gguf")


def test_other_file_kind(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(lmzoo.LmzooError, match="expected a Hugging Face model directory or a .gguf file"):
        lmzoo.load(tmp_path / "weights.bin")


def test_unknown_preset_suggests_names():
    with pytest.raises(lmzoo.LmzooError, match="Did you mean llama2-7b"):
        lmzoo.load("llama2-7")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmzoo", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == f"lmzoo: error: {tmp_path}: not a Hugging Face model directory (no config.json in it)"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("model_type", ["llama", "my_custom_model"])
def test_remote_code_in_config_json_never_runs(good_dir, tmp_path, model_type):
    """config.json's auto_map points at Python files in the directory (transformers runs them with
    trust_remote_code). lmzoo never imports them: a known model_type loads, an unknown one is
    refused by name, and the file's import-time payload never runs."""
    sentinel = tmp_path / "code-ran"
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    d = copy_dir(good_dir, tmp_path / "m", edit_config=lambda c: c.update(model_type=model_type, auto_map=auto_map))
    payload = f"open({str(sentinel)!r}, 'w').close()\n"
    for name in ("configuration_x.py", "modeling_x.py", "__init__.py"):
        (tmp_path / "m" / name).write_text(payload)
    if model_type == "llama":
        model, _ = lmzoo.load(d)
        assert model.config.family == "llama"
    else:
        with pytest.raises(lmzoo.LmzooError, match="model_type 'my_custom_model' is not supported"):
            lmzoo.load(d)
    assert not sentinel.exists()


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):  # unpickling this creates the sentinel file
        return (open, (self.sentinel, "w"))


def test_pickled_weights_are_refused_and_never_unpickled(good_dir, tmp_path):
    """.bin weights are pickles: a Hugging Face directory or an adapter that has only those is
    refused by name, and the payload in them never runs."""
    import pickle
    import shutil

    sentinel = tmp_path / "code-ran"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(os.path.join(good_dir, "config.json"), model_dir / "config.json")
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(sentinel)}))
    with pytest.raises(lmzoo.LmzooError, match="no model.safetensors .*only safetensors checkpoints"):
        lmzoo.load(model_dir)
    adapter = tmp_path / "a"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Payload(sentinel)}))
    with pytest.raises(lmzoo.LmzooError, match="no adapter_model.safetensors"):
        lmzoo.load(good_dir, adapter=adapter)
    assert not sentinel.exists()


def test_a_preset_too_large_for_memory_is_refused_in_one_line(monkeypatch):
    """A random preset is built in fp32: one that would not fit in the memory available now is an
    LmzooError naming its size, not an out-of-memory kill (llama2-7b needs ~25 GiB)."""
    from lmzoo.formats import checkpoint

    monkeypatch.setattr(checkpoint, "available_memory_bytes", lambda: 2**30)  # 1 GiB free
    with pytest.raises(lmzoo.LmzooError, match=r"random llama model of 6\.74B parameters needs 25\.1 GiB in fp32, "
                                               r"more than the 1\.0 GiB available"):
        lmzoo.load("llama2-7b")
    assert lmzoo.load("gpt2")[0].num_parameters() > 0  # 124M: 0.46 GiB fits
