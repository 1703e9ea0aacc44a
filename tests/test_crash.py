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

from lmzoo.formats import atomic


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    tiny_dir(tmp_path / "model", d_model=64, d_ff=96)
    date_data(tmp_path / "data.jsonl", 32, seed=4)

    def command(out, *extra):
        return [sys.executable, "-m", "lmzoo", "finetune", "--model", str(tmp_path / "model"), "--data",
                str(tmp_path / "data.jsonl"), "--out", str(tmp_path / out), "--steps", "12", "--batch-size", "4",
                "--lr", "5e-3", "--lora-dropout", "0.1", "--save-every", "1", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command("whole"), check=True, capture_output=True, env=env, timeout=600)

    victim = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= 4:
                break
        except FileNotFoundError:  # not written yet
            pass
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 12, "the process was not killed mid-run"

    r = subprocess.run(command("killed", "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


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
