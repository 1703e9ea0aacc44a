"""The fine-tuning pipeline: data encoding, the loop, exact resume, and bad input."""

import json
import math

import pytest
import torch
from tiny import smollm_tokenizer, tiny_model

import lmzoo
from lmzoo.peft import LoraConfig
from lmzoo.train import TrainConfig, finetune
from lmzoo.train.data import IGNORE, encode_record, load_examples, read_jsonl

RECORDS = [
    {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]},
    {"prompt": "Reverse: hello", "response": "olleh"},
    {"messages": [{"role": "user", "content": "Reverse: xyz"}, {"role": "assistant", "content": "zyx"},
                  {"role": "user", "content": "Reverse: 12"}, {"role": "assistant", "content": "21"}]},
    {"prompt": "Reverse: moon", "response": "noom"},
    {"prompt": "Reverse: star", "response": "rats"},
    {"prompt": "Reverse: lmzoo", "response": "oozml"},
]


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_loss_falls_on_assistant_tokens_only(tok):
    ex = encode_record(RECORDS[2], tok)
    labelled = [t for t in ex.labels if t != IGNORE]
    text = tok.decode(labelled)
    assert text == "zyx<|im_end|>\n21<|im_end|>\n"
    assert ex.answer == "21" and ex.ids[:len(ex.prompt)] == ex.prompt
    assert tok.decode(ex.ids[len(ex.prompt):]) == "21<|im_end|>\n"
    plain = encode_record({"text": "hello world"}, tok)
    assert plain.labels == plain.ids


def test_bad_lines_empty_data_and_long_examples(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(lmzoo.LmzooError, match=r"bad.jsonl:2: .*--skip-bad-lines"):
        read_jsonl(str(bad))
    from lmzoo.train.data import DataReport
    report = DataReport()
    assert len(read_jsonl(str(bad), skip_bad_lines=True, report=report)) == 1
    assert report.skipped_lines == [2, 3]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(lmzoo.LmzooError, match="empty.jsonl: the dataset is empty"):
        read_jsonl(str(empty))
    long = write(tmp_path / "long.jsonl", [{"text": "word " * 50}])
    with pytest.raises(lmzoo.LmzooError, match="more than the context of 16"):
        load_examples(long, tok, 16, too_long="refuse")
    report = DataReport()
    examples = load_examples(long, tok, 16, report=report)
    assert len(examples[0].ids) == 16 and report.truncated == 1


def run(tok, tmp_path, name, steps, **kw):
    model = tiny_model()
    train = TrainConfig(steps=steps, lr=kw.pop("lr", 5e-3), batch_size=4, grad_accum=2, seed=1, progress=False,
                        save_every=kw.pop("save_every", 0), warmup_steps=2)
    result = finetune(model, tok, write(tmp_path / "d.jsonl", RECORDS), str(tmp_path / name),
                      lora=LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"), dropout=0.1),
                      train=train, **kw)
    return model, result


def test_short_lora_run_lowers_the_loss_and_saves_an_adapter(tok, tmp_path):
    model, result = run(tok, tmp_path, "out", 25, lr=2e-2)
    losses = [m["loss"] for m in result.metrics]
    assert losses[-1] < 0.7 * losses[0]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert 0 < result.trainable_percent < 50


def test_resume_continues_exactly(tok, tmp_path):
    whole_model, whole = run(tok, tmp_path, "whole", 6)
    part_model, _ = run(tok, tmp_path, "part", 6, save_every=3, stop_after=3)
    resumed_model, resumed = run(tok, tmp_path, "part", 6, save_every=3, resume=True)
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics]
    for (n, a), (_, b) in zip(whole_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


class _Payload:
    """Unpickling this creates a file: the sentinel that shows code ran."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_the_trainer_state_is_no_pickle_and_a_pickle_never_runs(tok, tmp_path):
    """The checkpoint's optimizer, scheduler and generator states are JSON + safetensors; a
    trainer.pt payload placed in a checkpoint is refused with one line and never unpickled; a
    truncated state file is named."""
    import pickle

    run(tok, tmp_path, "part", 6, save_every=3, stop_after=3)
    checkpoint = tmp_path / "part" / "checkpoint"
    assert sorted(f.name for f in checkpoint.iterdir()) == ["manifest.json", "state.json", "trainable.safetensors",
                                                             "trainer.json", "trainer.safetensors"]
    sentinel = tmp_path / "code-ran"
    (checkpoint / "trainer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(sentinel)}))
    from lmzoo.formats.manifest import write_manifest

    write_manifest(str(checkpoint))  # as if the file had been there all along
    with pytest.raises(lmzoo.LmzooError, match="trainer.pt, a pickle .* never unpickles"):
        run(tok, tmp_path, "part", 6, save_every=3, resume=True)
    assert not sentinel.exists()
    (checkpoint / "trainer.pt").unlink()
    data = (checkpoint / "trainer.safetensors").read_bytes()
    (checkpoint / "trainer.safetensors").write_bytes(data[:len(data) // 2])
    write_manifest(str(checkpoint))  # the manifest agrees, the file itself is cut short
    with pytest.raises(lmzoo.LmzooError, match="trainer.safetensors: cannot read the training state"):
        run(tok, tmp_path, "part", 6, save_every=3, resume=True)


def test_training_state_round_trips_through_json_and_safetensors(tmp_path):
    from lmzoo.formats.state import read_state, write_state

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": float("inf"), "name": None}],
             "rng": (3, tuple(range(5)), None), "__tensor__": "a key that looks like a tag", "flag": True}
    write_state(state, str(tmp_path / "s"))
    back = read_state(str(tmp_path / "s"))
    assert back.keys() == state.keys() and back["rng"] == state["rng"] and back["flag"] is True
    assert back["param_groups"] == state["param_groups"] and back["__tensor__"] == state["__tensor__"]
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(lmzoo.LmzooError, match="cannot store a set"):
        write_state({"x": {1, 2}}, str(tmp_path / "t"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tok, tmp_path, monkeypatch):
    from lmzoo.nn.model import Decoder

    real = Decoder.loss
    calls = {"n": 0}

    def sometimes_nan(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] > 4 else out  # steps 1-2 fine (2 micro-batches each)

    monkeypatch.setattr(Decoder, "loss", sometimes_nan)
    with pytest.raises(lmzoo.LmzooError, match=r"loss became nan at step 3.*last good checkpoint"):
        run(tok, tmp_path, "nan", 6, save_every=1)
    state = json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and all(math.isfinite(m["loss"]) for m in state["metrics"])


def test_gradient_checkpointing_gives_the_same_gradients():
    from lmzoo.peft import add_lora

    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        add_lora(model, LoraConfig(r=2, targets=("q", "v"), init="gaussian"))
        model.train()
        model.gradient_checkpointing = checkpointing
        model.loss(torch.arange(24).view(2, 12)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_tracks_the_fp32_loss_curve(tok, tmp_path):
    _, fp32 = run(tok, tmp_path, "fp32", 8, lr=2e-2)
    model = tiny_model()
    bf16 = finetune(model, tok, str(tmp_path / "d.jsonl"), str(tmp_path / "bf16"),
                    lora=LoraConfig(r=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"), dropout=0.1),
                    train=TrainConfig(steps=8, lr=2e-2, batch_size=4, grad_accum=2, seed=1, progress=False,
                                      warmup_steps=2, bf16=True))
    for a, b in zip(fp32.metrics, bf16.metrics, strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.05 * a["loss"]
    assert bf16.metrics[-1]["loss"] < 0.8 * bf16.metrics[0]["loss"]


def test_packing_fills_rows_and_never_predicts_across_examples(tok):
    from lmzoo.train.data import pack

    examples = [encode_record(r, tok) for r in RECORDS]
    rows = pack(examples, 200)
    assert sum(len(r.ids) for r in rows) == sum(len(e.ids) for e in examples)
    assert all(len(r.ids) <= 200 for r in rows) and len(rows) < len(examples)
    first, n = rows[0], len(examples[0].ids)
    assert first.ids[:n] == examples[0].ids and first.ids[n:n + len(examples[1].ids)] == examples[1].ids
    assert first.labels[n] == IGNORE  # the next example's first token is not a target of this one


def test_a_run_without_matplotlib_saves_everything_and_exits_0(tmp_path):
    """matplotlib is optional: without it `lmzoo finetune` trains, saves the adapter and the
    metrics, notes in one line that the loss curve was skipped, and exits 0."""
    import os
    import subprocess
    import sys

    from tiny import date_data, tiny_dir

    blocker = tmp_path / "no-matplotlib"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('matplotlib is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "lmzoo", "finetune", "--model", tiny_dir(tmp_path / "model"),
                        "--data", date_data(tmp_path / "d.jsonl", 8, seed=1), "--out", str(tmp_path / "out"),
                        "--steps", "2", "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lmzoo: note: no " in r.stderr and "needs matplotlib" in r.stderr
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 2
    assert not (tmp_path / "out" / "loss.png").exists()


DATA_CASES = {  # file bytes -> what the one-line error says (None: it loads)
    "a bad line names its number": (b'{"text": "ok"}\n{"text": \n', ":2: Expecting value"),
    "NaN is no JSON number": (b'{"prompt": "1", "response": NaN}\n', ":1: NaN is not a JSON number"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000 + b"\n", ":1: JSON nested too deeply"),
    "a BOM first is fine": (b'\xef\xbb\xbf{"text": "a BOM first"}\n', None),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', ":2: not UTF-8 text (byte 10)"),
    "a record that is no object": (b'42\n', ":1: expected a JSON object per line"),
    "an empty file": (b"", ": the dataset is empty"),
    "only blank lines": (b"\n\n  \n", ": the dataset is empty"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_files_are_one_line_naming_the_line(tok, tmp_path, case):
    content, message = DATA_CASES[case]
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    if message is None:
        assert load_examples(str(path), tok, 64)
        return
    with pytest.raises(lmzoo.LmzooError) as e:
        load_examples(str(path), tok, 64)
    assert str(e.value).startswith(str(path) + message) and "\n" not in str(e.value), str(e.value)
