"""What a cold start pays for, kept out of it (speed itself is measured in bench/, not here)."""

import subprocess
import sys

import pytest
import torch

from lmzoo.nn.init import no_random_init


def test_loading_the_embedded_model_does_not_import_dynamo():
    """Random init on the meta device imports torch._dynamo (~0.9 s); a loaded model's weights
    all come from its file, so lmzoo.load() builds it without init, and a plain generate neither
    needs dynamo."""
    code = ("import sys, lmzoo; m, t = lmzoo.load(); lmzoo.prepare_for_inference(m); "
            "m.generate([t.encode_chat([{'role': 'user', 'content': 'hi'}])], 2); "
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_no_random_init_leaves_tensors_alone_and_restores_torch():
    normal = torch.nn.init.normal_
    with no_random_init():
        layer = torch.nn.Linear(4, 3)
        t = torch.zeros(5)
        assert torch.nn.init.normal_(t) is t and not t.any()
    assert torch.nn.init.normal_ is normal
    with pytest.raises(RuntimeError), no_random_init():
        raise RuntimeError("a failure inside")
    assert torch.nn.init.normal_ is normal
    assert layer.weight.shape == (3, 4)
