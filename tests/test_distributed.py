"""torchrun with 2 processes on CPU (gloo): DDP and FSDP2 follow the single-process loss curve
for the same global batch, and FSDP checkpoints save and resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import date_data, tiny_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_dir(root / "model")
    date_data(root / "data.jsonl", 24, seed=3)
    return root


def finetune(setup, out, *extra, procs=1):
    args = ["-m", "lmzoo", "finetune", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"),
            "--out", str(setup / out), "--batch-size", "8", "--lr", "1e-2", "--seed", "1", "--lora-r", "4",
            "--targets", "q,k,v,o,gate,up,down", *extra]
    if procs > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (setup / out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(setup, strategy):
    single = finetune(setup, "single", "--steps", "4")
    multi = finetune(setup, strategy, "--steps", "4", "--strategy", strategy, procs=2)
    assert len(single) == len(multi) == 4 and single[-1] < single[0]
    for a, b in zip(single, multi, strict=True):
        assert abs(a - b) / abs(a) < 1e-4
    from safetensors.torch import load_file
    one = load_file(setup / "single" / "adapter" / "adapter_model.safetensors")
    two = load_file(setup / strategy / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-4, rtol=1e-3)


def test_fsdp_checkpoint_saves_and_resumes(setup):
    whole = finetune(setup, "fsdp-whole", "--steps", "4", "--strategy", "fsdp", procs=2)
    finetune(setup, "fsdp-part", "--steps", "4", "--strategy", "fsdp", "--stop-after", "2", procs=2)
    resumed = finetune(setup, "fsdp-part", "--steps", "4", "--strategy", "fsdp", "--resume", procs=2)
    assert len(resumed) == 4
    for a, b in zip(whole, resumed, strict=True):
        assert abs(a - b) / abs(a) < 1e-6
