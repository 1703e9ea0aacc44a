"""LoRA on the one decoder: PEFT parity both ways, merging, freezing, fused slices, bad input."""

import json

import pytest
import torch
from hf_oracle import ids, save, tiny_hf_model

import lmzoo
from lmzoo.formats.peft import load_adapter, save_adapter
from lmzoo.peft import LoraConfig, add_lora, lora_modules, merge_lora, strip_lora, unmerge_lora

# model_type, oracle overrides, PEFT target_modules, the same targets in lmzoo's names
FAMILIES = {
    "llama": ("llama", dict(num_key_value_heads=2), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], ("q", "k", "v", "o", "gate", "up", "down")),
    "qwen2": ("qwen2", dict(num_key_value_heads=2), ["q_proj", "v_proj"], ("q", "v")),
    "mistral": ("mistral", dict(num_key_value_heads=1, sliding_window=8), ["q_proj", "v_proj", "down_proj"],
                ("q", "v", "down")),
    # GPT-2's Conv1D layers: PEFT sets fan_in_fan_out; c_proj names both attention and MLP outputs
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64), ["c_attn", "c_proj", "c_fc"],
             ("qkv", "o", "up", "down")),
    # GLM: fused gate|up as one matrix
    "glm": ("glm", dict(num_key_value_heads=2, head_dim=16, pad_token_id=0), ["q_proj", "v_proj", "gate_up_proj"],
            ("q", "v", "gate_up")),
}


def randomise_b(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in m.lora_B.values():
                p.normal_(std=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_lmzoo_adapter_loads_in_peft_with_the_same_logits(family, tmp_path):
    import peft

    model_type, overrides, targets, our_targets = FAMILIES[family]
    oracle = tiny_hf_model(model_type, **overrides)
    base_dir = save(oracle, tmp_path / "base")
    x = ids(length=20)
    with torch.no_grad():
        plain = oracle(x).logits
    ours, _ = lmzoo.load(base_dir)
    add_lora(ours, LoraConfig(r=4, alpha=8, targets=our_targets))
    randomise_b(ours)
    save_adapter(ours, tmp_path / "adapter", base_name=base_dir)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    theirs = peft.PeftModel.from_pretrained(oracle, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_lmzoo_with_the_same_logits(family, tmp_path):
    import peft

    model_type, overrides, targets, _ = FAMILIES[family]
    oracle = tiny_hf_model(model_type, **overrides)
    base_dir = save(oracle, tmp_path / "base")
    plain = oracle(ids(length=20)).logits.detach()
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(oracle, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                             init_lora_weights=False,
                                                             fan_in_fan_out=model_type == "gpt2")).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours, _ = lmzoo.load(base_dir, adapter=tmp_path / "adapter")
    x = ids(length=20)
    with torch.no_grad():
        expected = peft_model(x).logits
        got = ours(x)
    assert (expected - plain).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def tiny(config_name="classic", **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=61, n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=64, max_seq_len=64)
    return lmzoo.from_config(lmzoo.preset(config_name).replace(**{**base, **kw})).eval()


def test_fresh_adapter_changes_nothing_and_gradients_reach_only_lora():
    model = tiny()
    x = torch.randint(0, 61, (2, 12))
    before = model(x).detach()
    add_lora(model, LoraConfig(r=4, targets=("q", "k", "v", "o", "gate", "up", "down")))
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    model.train()
    model.loss(x).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad
            if "lora_A" not in name:  # B starts at zero, so A's gradient is zero at first; B's is not
                assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None


def test_merge_equals_unmerged_and_is_idempotent_and_reversible():
    model = tiny()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
    randomise_b(model)
    x = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        unmerged = model(x)
        w0 = model.blocks[0].attn.q.weight.clone()
        merge_lora(model)
        merged = model(x)
        merge_lora(model)  # twice: harmless
        twice = model(x)
        unmerge_lora(model)
        back = model.blocks[0].attn.q.weight.clone()
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(twice, merged, atol=0, rtol=0)
    torch.testing.assert_close(back, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [2, 1])  # GQA and MQA: where other projects had bugs
def test_per_slice_lora_on_fused_qkv_equals_separate_projections(n_kv_heads):
    separate = tiny(n_kv_heads=n_kv_heads)
    fused = tiny(n_kv_heads=n_kv_heads, fused_qkv=True)
    state = {}
    for k, v in separate.state_dict().items():
        if ".attn.q." in k:
            i = k.split(".")[1]
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([separate.state_dict()[f"blocks.{i}.attn.{p}.weight"]
                                                              for p in "qkv"])
        elif ".attn.k." not in k and ".attn.v." not in k:
            state[k] = v
    fused.load_state_dict(state)
    add_lora(separate, LoraConfig(r=3, targets=("q", "k", "v")))
    add_lora(fused, LoraConfig(r=3, targets=("q", "k", "v")))
    randomise_b(separate)
    with torch.no_grad():
        for i, block in enumerate(separate.blocks):
            target = fused.blocks[i].attn.qkv
            for p in "qkv":
                target.lora_A[p].copy_(getattr(block.attn, p).lora_A["all"])
                target.lora_B[p].copy_(getattr(block.attn, p).lora_B["all"])
    x = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), separate(x), atol=1e-5, rtol=0)
        merge_lora(fused)
        torch.testing.assert_close(fused(x), separate(x), atol=1e-5, rtol=0)


def test_sliced_adapter_saves_and_loads_in_lmzoo_format(tmp_path):
    model = tiny(fused_qkv=True, fused_gate_up=True)
    add_lora(model, LoraConfig(r=2, targets=("q", "v", "up")))
    randomise_b(model)
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LMZOO_SLICED_LORA"
    again = tiny(fused_qkv=True, fused_gate_up=True)
    load_adapter(again, tmp_path / "a")
    x = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_merged_model_saves_as_a_standalone_hf_directory(tmp_path):
    import transformers

    model = tiny()
    add_lora(model, LoraConfig(r=4, targets=("q", "v")))
    randomise_b(model)
    with pytest.raises(lmzoo.LmzooError, match="unmerged LoRA"):
        lmzoo.save_hf_dir(model, tmp_path / "m")
    x = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        expected = model(x)
    strip_lora(model)
    lmzoo.save_hf_dir(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=0)


def test_rslora_scale():
    assert LoraConfig(r=16, alpha=8).scale == 0.5
    assert LoraConfig(r=16, alpha=8, rslora=True).scale == 2.0


def test_unknown_target_lists_available_names():
    with pytest.raises(lmzoo.LmzooError, match=r"\['c_attn'\] match no layer.*available: .*down.*gate.*q"):
        add_lora(tiny(), LoraConfig(targets=("c_attn",)))


def test_adapter_for_another_base_is_refused(tmp_path):
    model = tiny()
    add_lora(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(lmzoo.LmzooError, match="another base model.*d_model: adapter 48 vs model 96"):
        load_adapter(tiny(d_model=96, n_heads=6), tmp_path / "a")
    from safetensors.torch import load_file, save_file
    f = tmp_path / "a" / "adapter_model.safetensors"
    save_file(load_file(f), f)  # a PEFT-made adapter has no signature: the shapes still decide
    with pytest.raises(lmzoo.LmzooError, match="another base model"):
        load_adapter(tiny(d_model=96, n_heads=6), tmp_path / "a")


def test_an_adapter_naming_a_module_the_model_lacks_names_the_directory(tmp_path):
    """Found by the fuzzing: one byte changed in a tensor name ("model." -> "lodel.") gave an
    error that named the module but not the adapter's directory."""
    from safetensors.torch import load_file, save_file

    model = tiny()
    add_lora(model, LoraConfig(r=2, targets=("q",)))
    save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k.replace(".model.layers.1.", ".lodel.layers.1."): v for k, v in load_file(f).items()}, f)
    with pytest.raises(lmzoo.LmzooError, match=f"^{tmp_path / 'a'}: adapter module lodel.layers.1.self_attn.q_proj "
                                               "does not exist in this llama model"):
        load_adapter(tiny(), tmp_path / "a")


def test_merge_cli_writes_a_standalone_directory(tmp_path):
    import subprocess
    import sys

    import transformers

    oracle = tiny_hf_model("qwen2", num_key_value_heads=2)
    base = save(oracle, tmp_path / "base")
    ours, _ = lmzoo.load(base)
    add_lora(ours, LoraConfig(r=4, targets=("q", "v", "up")))
    randomise_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    r = subprocess.run([sys.executable, "-m", "lmzoo", "merge", base, str(tmp_path / "adapter"), str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = ids(length=12)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ours(x), atol=1e-5, rtol=0)
