"""Nothing is lost: a training process killed with SIGKILL resumes from its last checkpoint
and ends with the same weights as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tiny import date_data, tiny_dir


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
        if state.exists() and json.loads(state.read_text())["step"] >= 4:
            break
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
