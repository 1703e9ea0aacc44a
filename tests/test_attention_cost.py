"""`lmzoo attention-cost` measures each pattern on small lengths, fits exponents, and draws them."""

import json
import subprocess
import sys

import matplotlib.image
import pytest

from lmzoo.show.attention_cost import fit_exponent

SMALL = ["--seq", "128,256,512", "--width", "16", "--summary", "2", "--heads", "2", "--head-size", "8",
         "--repeats", "1"]


def lmzoo_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmzoo", "attention-cost", *args], capture_output=True, text=True)


def test_table_json_and_the_png_read_back(tmp_path):
    out = tmp_path / "cost.png"
    r = lmzoo_cli(*SMALL, "--patterns", "dense,banded,strided,fixed,masked-banded", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "fitted exponents" in r.stdout and f"wrote {out}" in r.stdout
    for kind in ("dense", "banded", "strided", "fixed", "masked-banded"):
        assert sum(line.split()[0] == kind for line in r.stdout.splitlines() if line.strip()) == 4  # 3 rows + fit
    image = matplotlib.image.imread(out)  # a real PNG, two panels of lines: not blank
    assert image.shape[0] > 300 and image.shape[1] > 700 and image[..., :3].std() > 0.05

    r = lmzoo_cli(*SMALL, "--patterns", "dense,window", "--format", "json", "--out", "-")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [(row["pattern"], row["n"]) for row in result["rows"]] == [
        (p, n) for p in ("dense", "window") for n in (128, 256, 512)]
    assert all(row["forward_s"] > 0 and row["train_s"] > 0 for row in result["rows"])
    assert set(result["exponents"]) == {"dense", "window"}
    assert not (tmp_path / "attention-cost.png").exists()


def test_fit_exponent_recovers_a_power_law():
    assert fit_exponent([1024, 2048, 4096], [3 * n ** 1.5 for n in (1024, 2048, 4096)]) == pytest.approx(1.5)
    assert fit_exponent([1024], [1.0]) is None


@pytest.mark.parametrize("args,flag", [(["--patterns", "dense,diagonal"], "--patterns"),
                                       (["--patterns", "masked-dense"], "--patterns"),
                                       (["--seq", "12,x"], "--seq"), (["--seq", "1"], "--seq"),
                                       (["--width", "0"], "--width"), (["--out", "cost.svg"], "--out"),
                                       (["--format", "yaml"], "--format")])
def test_bad_arguments_get_one_line(args, flag):
    r = lmzoo_cli(*args)
    assert r.returncode == 1 and r.stderr.startswith(f"lmzoo: error: {flag}") and "Traceback" not in r.stderr
