"""The main job's pieces: the embedded task, and compare-peft end to end on a tiny model."""

import json

from tiny import date_data, tiny_dir

from lmzoo.train.tasks import dates


def test_the_date_task_is_deterministic_disjoint_and_exact():
    train, test = dates.make(n_train=300, n_test=50, seed=1)
    again_train, again_test = dates.make(n_train=300, n_test=50, seed=1)
    assert train == again_train and test == again_test
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(test)
    for r in test:
        answer = r["messages"][1]["content"]
        year, month, day = map(int, answer.split("-"))
        assert len(answer) == 10 and 1 <= month <= 12 and 1 <= day <= 31
        assert str(year) in r["messages"][0]["content"]


def test_compare_peft_measures_every_method(tmp_path, capsys):
    from lmzoo.train.compare_peft import run

    tiny_dir(tmp_path / "model")
    date_data(tmp_path / "d.jsonl", 16, seed=2)
    rows = run(str(tmp_path / "out"), data=str(tmp_path / "d.jsonl"), steps=2, batch_size=4, with_full=True,
               model=str(tmp_path / "model"))
    assert [r["method"] for r in rows] == ["lora", "ptuning-v2", "prompt-tuning", "full"]
    by = {r["method"]: r for r in rows}
    assert by["full"]["trainable_percent"] == 100.0
    assert by["prompt-tuning"]["trainable"] == 20 * 32  # 20 virtual tokens x d_model
    assert by["ptuning-v2"]["trainable"] == 32 * 2 * 2 * 2 * 8  # P x layers x (k, v) x kv heads x head_dim
    assert by["lora"]["saved_bytes"] < by["full"]["saved_bytes"]
    for r in rows:
        assert r["peak_rss_bytes"] > 0 and r["tokens_per_s"] > 0 and r["val_loss"] > 0
        assert 0 <= r["exact_match"] <= 1
    out = capsys.readouterr().out
    assert "| method | trainable |" in out and "| prompt-tuning |" in out
    assert (tmp_path / "out" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"] == rows
