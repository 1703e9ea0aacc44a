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


def test_each_method_learns_the_date_task_beyond_the_base_model(tmp_path):
    """On the embedded model and the demo's task, with a fixed seed and a short budget (12 steps
    of 8), every adapter method ends with a held-out exact match above the base model's (here:
    base 5%, LoRA 95%, P-tuning v2 70%, prompt tuning 20% of 20 questions)."""
    import copy

    import torch

    import lmzoo
    from lmzoo.peft import LoraConfig, PrefixConfig, PromptConfig
    from lmzoo.train import TrainConfig, exact_match, finetune
    from lmzoo.train.compare_peft import LEARNING_RATES, METHODS
    from lmzoo.train.data import load_examples

    train_path, test_path = dates.write(str(tmp_path / "data"), n_train=400, n_test=20, seed=0)
    base, tok = lmzoo.load()
    held_out = load_examples(test_path, tok, base.config.max_seq_len)
    base_em, _ = exact_match(base, tok, held_out, max_new_tokens=12, batch_size=20)
    learned = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        finetune(model, tok, train_path, str(tmp_path / method), method=method,
                 lora=LoraConfig(r=8, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down")),
                 prefix=PrefixConfig(n_virtual=32), prompt=PromptConfig(n_virtual=20),
                 train=TrainConfig(steps=12, lr=LEARNING_RATES[method], batch_size=8, warmup_steps=1, seed=0,
                                   progress=False))
        learned[method], _ = exact_match(model, tok, held_out, max_new_tokens=12, batch_size=20)
    assert all(em > base_em for em in learned.values()), (base_em, learned)
