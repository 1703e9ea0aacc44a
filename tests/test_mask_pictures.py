"""`lmzoo masks` draws what the mask builder builds: text in the terminal and a PNG."""

import subprocess
import sys

import numpy as np
import pytest

from lmzoo.show.mask_pictures import as_text, mask_of, save_png

BLUE = np.array([0x2B, 0x6C, 0xB0]) / 255


def cells_from_png(path, seq):
    """Read back the pattern: the blue pixels' bounding box is the mask, sampled at cell centres."""
    import matplotlib.image

    img = matplotlib.image.imread(path)[..., :3]
    blue = np.abs(img - BLUE).sum(-1) < 0.05
    ys, xs = np.nonzero(blue)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = (y1 - y0) / seq, (x1 - x0) / seq
    return np.array([[blue[int(y0 + (i + 0.5) * h), int(x0 + (j + 0.5) * w)] for j in range(seq)]
                     for i in range(seq)])


def test_prefix_png_shows_a_filled_prefix_block_and_a_causal_triangle(tmp_path):
    seq, prefix = 10, 4
    save_png({"prefix LM": mask_of("prefix", seq, prefix=prefix)}, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = cells_from_png(tmp_path / "p.png", seq)
    assert cells[:prefix, :prefix].all()  # the prefix sees itself both ways
    assert not cells[:prefix, prefix:].any()
    for i in range(prefix, seq):  # after it: causal
        assert cells[i, : i + 1].all() and not cells[i, i + 1:].any()


@pytest.mark.parametrize("kind", ["causal", "sliding", "strided", "fixed"])
def test_png_pixels_equal_the_mask(kind, tmp_path):
    mask = mask_of(kind, 12, window=3, stride=3, summary=1)
    save_png({kind: mask}, tmp_path / "m.png")
    assert (cells_from_png(tmp_path / "m.png", 12) == mask.numpy()).all()


def test_text_rendering():
    text = as_text(mask_of("causal", 3), "causal LM")
    assert text.splitlines() == ["causal LM", "    012", "  0 █··", "  1 ██·", "  2 ███"]


def test_cli_all_kinds_and_bad_arguments(tmp_path):
    out = tmp_path / "all.png"
    r = subprocess.run([sys.executable, "-m", "lmzoo", "masks", "--seq", "8", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for title in ("causal LM", "prefix LM", "sliding window", "sparse strided", "sparse fixed"):
        assert title in r.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"
    for args, name in ((["--prefix", "9"], "--prefix"), (["--window", "0"], "--window"),
                       (["--stride", "9"], "--stride")):
        r = subprocess.run([sys.executable, "-m", "lmzoo", "masks", "--seq", "8", *args],
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.startswith(f"lmzoo: error: {name}") and "Traceback" not in r.stderr
