"""`lmzoo diagram`: a valid picture for every preset, and the highlighted boxes are exactly those
showing a field that `lmzoo diff` names."""

import json
import xml.etree.ElementTree as ET

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

import lmzoo
from lmzoo import cli
from lmzoo.config import field_names
from lmzoo.show.compare import architecture_fields, differing_fields
from lmzoo.show.diagram import HIGHLIGHT, draw

ORANGE = np.array(matplotlib.colors.to_rgb(HIGHLIGHT[0]))


def check_highlights(picture, differing):
    """The drawn boxes that depict a differing field are the highlighted ones, in their colour."""
    assert picture.differing == differing
    assert picture.highlighted == {b for b, fields in picture.boxes.items() if fields & set(differing)}
    assert set(differing) <= set().union(*picture.boxes.values())  # every difference is on the picture
    for box, patch in picture.patches.items():
        assert (tuple(patch.get_facecolor()[:3]) == tuple(ORANGE)) == (box in picture.highlighted), box


@pytest.mark.parametrize("name", lmzoo.PRESETS)
def test_every_preset_draws_a_valid_svg(name, tmp_path):
    config = lmzoo.preset(name)
    picture = draw(config, label=name)
    picture.save(tmp_path / "d.svg")
    root = ET.parse(tmp_path / "d.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.get("width").removesuffix("pt")) > 100
    check_highlights(picture, architecture_fields(config))
    # each box depicts fields that exist, and together they show every field of the config
    shown = set().union(*picture.boxes.values())
    assert shown <= set(field_names()) and shown >= set(field_names()) - {"family"}, set(field_names()) - shown


def test_highlights_follow_the_diff(capsys):
    """`--vs`: the boxes of the fields `lmzoo diff` prints, and no others."""
    assert cli.main(["diff", "llama2-7b", "mistral-7b", "--format", "json"]) == 0
    named = [f["name"] for f in json.loads(capsys.readouterr().out)["fields"]]
    picture = draw(lmzoo.preset("mistral-7b"), lmzoo.preset("llama2-7b"))
    check_highlights(picture, named)
    assert picture.highlighted == {"qkv", "positions", "attention", "mlp"}
    for other in ("gpt2", "chatglm-6b", "mixtral-8x7b"):  # both ways: boxes one model lacks
        a, b = lmzoo.preset(other), lmzoo.preset("glm4-9b-0414")
        check_highlights(draw(b, a), differing_fields([a, b]))
        check_highlights(draw(a, b), differing_fields([b, a]))


def test_what_the_classic_decoder_comparison_highlights():
    assert draw(lmzoo.preset("llama2-7b")).highlighted == set()  # Llama is the classic decoder
    assert draw(lmzoo.preset("chatglm2-6b")).highlighted == {"qkv", "positions", "mlp"}
    assert draw(lmzoo.preset("llama2-70b")).highlighted == {"qkv"}  # GQA: 8 kv heads for 64
    assert draw(lmzoo.preset("gpt1")).highlighted >= {"attn_add", "mlp_add", "final_norm", "positions"}


def orange_pixels(path) -> int:
    img = matplotlib.image.imread(path)[..., :3]
    return int((np.abs(img - ORANGE).sum(-1) < 0.02).sum())


def test_png_through_the_cli(tmp_path, capsys):
    assert cli.main(["diagram", "chatglm2-6b", "--out", str(tmp_path / "glm.png")]) == 0
    out = capsys.readouterr().out
    assert "qkv            n_kv_heads, qkv_bias, fused_qkv" in out and "mlp            fused_gate_up" in out
    assert cli.main(["diagram", "llama2-7b", "--out", str(tmp_path / "llama.png")]) == 0
    assert "(nothing)" in capsys.readouterr().out
    for name in ("glm.png", "llama.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # three highlighted boxes against the legend's swatch alone
    assert orange_pixels(tmp_path / "glm.png") > 20 * orange_pixels(tmp_path / "llama.png") > 0


def test_bad_diagram_arguments(tmp_path, capsys):
    assert cli.main(["diagram", "llama2-7b", "--out", str(tmp_path / "d.pdf")]) == 1
    assert "must end in .svg or .png" in capsys.readouterr().err
    assert cli.main(["diagram", "llama2-7b", "--vs", "mistral"]) == 1
    assert "Did you mean mistral-7b" in capsys.readouterr().err
    assert cli.main(["diagram", "llama2-7b", "--out", str(tmp_path / "no" / "d.svg")]) == 1
    assert "does not exist" in capsys.readouterr().err
