"""Nothing is lost: a training process killed with SIGKILL resumes from its last checkpoint
and ends with the same weights as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import date_data, tiny_dir

import lmzoo
from lmzoo.formats import atomic

# make test kills a run 4 times; make fuzz (LMZOO_FUZZ=long) 20 times.
KILLS = 20 if os.environ.get("LMZOO_FUZZ") == "long" else 4


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """SIGKILL lands at random moments of a run that checkpoints every step: while it starts,
    trains, or writes a checkpoint. Each time the run is resumed; in the end the adapter equals
    that of a run never interrupted, and metrics.jsonl has each step once."""
    import random

    tiny_dir(tmp_path / "model", d_model=64, d_ff=96)
    date_data(tmp_path / "data.jsonl", 32, seed=4)

    steps = 4 * KILLS  # enough that every kill lands before the end

    def command(out, *extra):
        return [sys.executable, "-m", "lmzoo", "finetune", "--model", str(tmp_path / "model"), "--data",
                str(tmp_path / "data.jsonl"), "--out", str(tmp_path / out), "--steps", str(steps), "--batch-size",
                "4", "--lr", "5e-3", "--lora-dropout", "0.1", "--save-every", "1", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command("whole"), check=True, capture_output=True, env=env, timeout=600)

    state = tmp_path / "killed" / "checkpoint" / "state.json"

    def step():
        try:
            return json.loads(state.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet; or read mid-exchange
            return 0

    rng = random.Random(KILLS)
    steps_at_kill = []
    for kill in range(KILLS):
        resume = ("--resume",) if state.exists() else ()
        victim = subprocess.Popen(command("killed", *resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env)
        if kill % 4 == 3:  # now and then while it starts up: imports, loading, the data
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # else once it has made a step, a random moment later: training or writing a checkpoint
            reached, deadline = step(), time.time() + 120
            while step() <= reached and victim.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        steps_at_kill.append(step())
    assert 0 < steps_at_kill[-1] < steps, steps_at_kill

    r = subprocess.run(command("killed", "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), (k, steps_at_kill)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.startswith(".lmzoo-tmp-")]
    print(f"checkpoint step at each kill: {steps_at_kill}")


def write_dir(path, text):
    with atomic.atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            f.write(text)


def test_a_directory_is_replaced_in_one_step(tmp_path, monkeypatch):
    """On Linux the new directory takes the old one's place in one rename (RENAME_EXCHANGE): no
    moment without a checkpoint, and nothing left beside it. (An earlier two-rename version let
    the SIGKILL test above find the checkpoint missing, once.)"""
    target = tmp_path / "checkpoint"
    write_dir(target, "1")
    real_replace, two_step = os.replace, []
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: two_step.append(dst) or real_replace(src, dst))
    write_dir(target, "2")
    assert (target / "state.json").read_text() == "2"
    assert os.listdir(tmp_path) == ["checkpoint"]
    if sys.platform.startswith("linux"):
        assert not two_step


def test_a_crash_between_two_renames_loses_nothing(tmp_path, monkeypatch):
    """Where one-step exchange is unavailable, replacing takes two renames. Killed between them,
    the previous directory waits as checkpoint.old-*, and restore_interrupted (which --resume
    runs) puts it back."""
    target = tmp_path / "checkpoint"
    write_dir(target, "previous")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def dies_before_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", dies_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        write_dir(target, "next")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not target.exists()
    atomic.restore_interrupted(target)
    assert (target / "state.json").read_text() == "previous"


# ----------------------------------------------------------------------------- damaged checkpoints, full disks
def _trained(tmp_path, steps_done):
    """A LoRA run stopped after `steps_done` steps of 6, a checkpoint at every step."""
    from tiny import smollm_tokenizer, tiny_model

    from lmzoo.peft import LoraConfig
    from lmzoo.train import TrainConfig, finetune

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the data, some words"}) + "\n" for i in range(16)))
    train = TrainConfig(steps=6, lr=5e-3, batch_size=4, seed=1, progress=False, save_every=1, warmup_steps=1)

    def run(**kw):
        model = tiny_model()
        return model, finetune(model, smollm_tokenizer(), str(data), str(tmp_path / "out"),
                               lora=LoraConfig(r=4, targets=("q", "v")), train=train, **kw)

    run(stop_after=steps_done)
    return run


def _step_of(path):
    return json.loads((path / "state.json").read_text())["step"]


@pytest.mark.parametrize("damage", ["flip a bit", "truncate", "delete"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    """Every checkpoint carries a manifest of sizes and SHA-256. --resume checks it; a flipped bit,
    a cut-short or a missing file sends it to the generation before, with a note naming the file,
    and the run still ends with the weights of an uninterrupted one."""
    whole = _trained(tmp_path / "whole", 6)
    run = _trained(tmp_path, 3)
    latest, previous = tmp_path / "out" / "checkpoint", tmp_path / "out" / "checkpoint.previous"
    assert (_step_of(latest), _step_of(previous)) == (3, 2)
    victim = latest / "trainer.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "flip a bit":
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-7]))
    else:
        victim.unlink()
    capsys.readouterr()
    model, result = run(resume=True)
    err = capsys.readouterr().err
    assert "lmzoo: note: " in err and "trainer.safetensors" in err and "resuming from" in err, err
    assert err.rstrip().endswith("checkpoint.previous instead"), err
    reference, _ = whole(resume=True)  # already at step 6: loads and finishes
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4, 5, 6]


def test_with_no_intact_checkpoint_resume_names_what_is_wrong(tmp_path):
    run = _trained(tmp_path, 3)
    for name in ("checkpoint", "checkpoint.previous"):
        (tmp_path / "out" / name / "state.json").write_text("{}")
    with pytest.raises(lmzoo.LmzooError, match="no intact checkpoint: .*/checkpoint/state.json: 2 bytes, the "
                                               "manifest says .*; .*/checkpoint.previous/state.json: 2 bytes"):
        run(resume=True)


@pytest.mark.parametrize("nth", [1, 2, 3, 4, 5])
def test_a_full_disk_at_the_nth_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, nth):
    """ENOSPC injected at the nth file a checkpoint writes (2 safetensors, 3 JSON): one clear error,
    the checkpoint before it unchanged, no temporary directory left behind."""
    import builtins
    import errno

    import safetensors.torch

    run = _trained(tmp_path, 2)
    latest = tmp_path / "out" / "checkpoint"
    before = {f.name: f.read_bytes() for f in latest.iterdir()}
    writes = {"n": 0}

    def count():
        writes["n"] += 1
        if writes["n"] == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    save_file, real_open = safetensors.torch.save_file, builtins.open

    def failing_save_file(*a, **k):
        count()
        return save_file(*a, **k)

    def failing_open(file, mode="r", *a, **k):
        if ".lmzoo-tmp-" in os.fspath(file) and any(c in mode for c in "wax"):  # a checkpoint's file
            count()
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(lmzoo.LmzooError, match=r"out/checkpoint: cannot write: No space left on device; the "
                                               r"previous version, if any, is unchanged"):
        run(resume=True)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in latest.iterdir()} == before
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".lmzoo-tmp-")]


def test_a_killed_runs_temporary_directories_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now
    stale = tmp_path / f".lmzoo-tmp-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".lmzoo-tmp-{os.getpid()}-live0000"  # a write in progress: left alone
    live.mkdir()
    write_dir(tmp_path / "out", "{}")
    assert not stale.exists() and live.exists()
