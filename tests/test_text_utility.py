"""bench/text_utility.py: the configs it runs are what a user writes, its data is hash-checked, and its
targets say "not met" and "at or below majority" when the numbers say so."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from bench import text_utility as tu
from common.config import RECIPES, parse_config


def test_a_minilm_row_is_a_text_config_naming_no_model_or_recipe(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngreat film,fresh\ndull film,rotten\n", encoding="utf-8")
    raw = tu.run_config(data, tu.dataset_schema("reviews"), nodes=3, split="dir0.5", epsilon=8, seed=1,
                        method="minilm-lora")  # fmt: skip
    assert not {"model", "train", "server", "rounds"} & set(raw)
    assert raw["simulation"] == {"num_clients": 3, "data_path": str(data), "partitioner": "dirichlet", "alpha": 0.5}
    cfg = parse_config(raw, "test")
    assert cfg.model.name == "minilm-lora"  # the pretrained extra is installed by `make install`
    assert cfg.train.learning_rate == RECIPES["text"]["train"]["learning_rate"]
    assert cfg.rounds == RECIPES["text"]["run"]["rounds"]
    scratch = parse_config(
        tu.run_config(
            data, tu.dataset_schema("reviews"), nodes=5, split="iid", epsilon=3, seed=2, method="text-transformer"
        ),  # fmt: skip
        "test",
    )
    assert scratch.model.name == "text-transformer" and scratch.simulation.partitioner == "iid"


def _fake_wheel(tmp_path: Path, member: str, payload: bytes) -> tuple[Path, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, payload)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return wheel, hashlib.sha256(buf.getvalue()).hexdigest()


def test_data_is_read_from_the_pinned_wheel_only_when_its_hash_matches(tmp_path: Path) -> None:
    wheel, digest = _fake_wheel(tmp_path, "pkg/data.csv", b"text,label\n")
    src = tu.Source("pkg", "1.0", wheel.name, digest, "pkg/data.csv", ("a", "b"), "test")
    assert tu.wheel_member(src, tmp_path) == b"text,label\n"
    tampered = tu.Source("pkg", "1.0", wheel.name, "0" * 64, "pkg/data.csv", ("a", "b"), "test")
    with pytest.raises(SystemExit, match="expected 0000"):
        tu.wheel_member(tampered, tmp_path)


def test_a_folder_of_articles_becomes_one_row_each_with_its_folder_as_topic(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/data/tech/1.txt", "Chips get faster\n\nA new chip doubles speed.\n")
        z.writestr("pkg/data/sports/2.txt", "Cup final\n\nThe team won \xa31m.\n".encode("latin-1"))
        z.writestr("pkg/data/README", "not an article")
        z.writestr("pkg/other/3.txt", "outside the folder")
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    src = tu.Source("pkg", "1.0", wheel.name, hashlib.sha256(buf.getvalue()).hexdigest(), "pkg/data/", ("a",), "t")
    files = tu.wheel_folder(src, tmp_path)
    assert sorted(files) == ["README", "sports/2.txt", "tech/1.txt"]
    assert tu._article(files["tech/1.txt"]) == "Chips get faster A new chip doubles speed."
    assert tu._article(files["sports/2.txt"]) == "Cup final The team won \xa31m."  # Latin-1 read as such
    assert tu.dataset_schema("news")["classes"] == ["business", "entertainment", "politics", "sport", "tech"]


def test_imdb_reviews_are_the_imdb_rows_with_named_classes_and_no_html_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    csv = (
        b"text,label,source\n"
        b'"A long film.<br /><br />Too long &amp; dull.",0,imdb\n'
        b'"Loved it.<br />Twice.",1,imdb\n'
        b'"a snippet",1,rotten_tomatoes\n'
    )
    monkeypatch.setattr(tu, "wheel_member", lambda src: csv)
    df = tu.dataset_frame("imdb")
    assert df.to_dict("records") == [
        {"text": "A long film. Too long & dull.", "label": "negative"},
        {"text": "Loved it. Twice.", "label": "positive"},
    ]
    assert tu.dataset_schema("imdb")["classes"] == ["negative", "positive"]
    assert tu.SOURCES["imdb"].rows == 3_000 and tu.SOURCES["reviews"].rows == tu.DEFAULT_ROWS


def _result(acc: dict[str, float], tfidf: dict[str, float], majority: dict[str, float], split: str) -> dict:
    runs = {
        f"reviews/n3/{split}/eps8/seed{s}/minilm-lora": {
            "dataset": "reviews", "nodes": 3, "split": split, "epsilon": 8.0, "seed": int(s), "method": "minilm-lora",
            "accuracy": a, "macro_f1": a, "seconds_per_round": 100.0, "bytes_per_round": 2e6,
        }
        for s, a in acc.items()
    }  # fmt: skip
    refs = {
        f"reviews/seed{s}/references": {
            "dataset": "reviews", "seed": int(s),
            "tfidf": {"accuracy": tfidf[s]}, "majority": {"accuracy": majority[s]},
        }
        for s in tfidf
    }  # fmt: skip
    return {"runs": runs, "references": refs}


def test_targets_follow_the_issue_goals_per_split() -> None:
    # 0.75 / 0.776 = 0.966: short of 0.97 on IID, past 0.95 on Dirichlet 0.5
    for split, met in (("iid", False), ("dir0.5", True)):
        s = tu.summarize(_result({"1": 0.75}, {"1": 0.776}, {"1": 0.58}, split))
        t = s["targets"][f"reviews/n3/{split}/eps8/minilm-lora"]
        assert t["to_tfidf"] == pytest.approx(0.75 / 0.776) and t["met"] is met
        assert t["at_or_below_majority"] == []


def test_a_seed_on_the_majority_class_is_named_even_when_the_mean_looks_fine() -> None:
    s = tu.summarize(_result({"1": 0.80, "2": 0.58}, {"1": 0.78, "2": 0.78}, {"1": 0.58, "2": 0.58}, "iid"))
    t = s["targets"]["reviews/n3/iid/eps8/minilm-lora"]
    assert t["at_or_below_majority"] == ["2"]
    table = tu.markdown_table({"summary": s})
    assert "| reviews | 3 | iid | 8 | minilm-lora | 0.690 (0.690) [2] |" in table and "| 2 |" in table


def test_a_cell_with_a_run_at_an_earlier_input_length_is_marked() -> None:
    """README's ‡: a run recorded without what it read was run when MiniLM read 64 pieces of 256 bytes;
    §: one that read each text's first 126 pieces (the default before head+tail)."""
    res = _result({"1": 0.80, "2": 0.79}, {"1": 0.78, "2": 0.78}, {"1": 0.58, "2": 0.58}, "iid")
    today = {"reads": tu.reads("minilm-lora", {})}
    assert today["reads"] == {"max_len": 768, "max_tokens": 128, "read": "head+tail"}
    assert tu.reads(*tu.METHOD_MODELS["minilm-lora-head"]) == {"max_len": 768, "max_tokens": 128}
    for run in res["runs"].values():
        run["recipe"] = today
    res["summary"] = tu.summarize(res)
    assert "‡" not in tu.readme_table(res) and "§" not in tu.readme_table(res)
    res["runs"]["reviews/n3/iid/eps8/seed1/minilm-lora"]["recipe"] = {"reads": {"max_len": 768, "max_tokens": 128}}
    res["summary"] = tu.summarize(res)
    assert "0.795 (0.795) [1, 2] §" in tu.readme_table(res)  # one run that read heads marks its cell
    del res["runs"]["reviews/n3/iid/eps8/seed2/minilm-lora"]["recipe"]  # one earlier run marks its cell
    res["summary"] = tu.summarize(res)
    assert "0.795 (0.795) [1, 2] ‡" in tu.readme_table(res)
    assert "(64 pieces of 256 bytes)" in tu.per_seed_table({**res, "runs": {
        k: {**r, "curve": [], "partitions": [], "sigmas": [], "epsilon_max": 8.0} for k, r in res["runs"].items()
    }})  # fmt: skip


def test_a_failed_run_is_reported_and_the_others_still_count(capsys: pytest.CaptureFixture[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bench.utility import finished

    def run(i: int) -> dict:
        if i == 1:
            raise RuntimeError("node crashed")
        return {"i": i}

    with ThreadPoolExecutor(1) as pool:
        futures = {pool.submit(run, i): f"run-{i}" for i in range(3)}
        got = sorted((name, r["i"]) for _tag, name, r in finished(futures))
    assert got == [("run-0", 0), ("run-2", 2)]
    assert "run-1: FAILED RuntimeError: node crashed" in capsys.readouterr().out


def test_a_second_run_in_the_same_folder_stops_before_touching_the_first(tmp_path: Path) -> None:
    """A leftover worker of a stopped bench still running a federation: a new one in its folder must not
    delete its run store or share its nodes' ledgers."""
    from bench.utility import _only_run_in, simulate_fresh
    from common.errors import FedGuardError

    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngreat film,fresh\ndull film,rotten\n", encoding="utf-8")
    raw = tu.run_config(
        data, tu.dataset_schema("reviews"), nodes=3, split="iid", epsilon=8, seed=1, method="minilm-lora"
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "runs.db").write_bytes(b"the first run's store")
    with _only_run_in(workdir), pytest.raises(FedGuardError, match="another run is using"):
        simulate_fresh(raw, workdir, None, "test")
    assert (workdir / "runs.db").read_bytes() == b"the first run's store"


def test_probe_features_come_back_in_the_rows_order_whatever_order_they_were_scored_in() -> None:
    """``--probe`` scores the shortest texts first; each row's features must still be its own."""
    import numpy as np
    import torch
    from torch import nn

    class Lengths(nn.Module):  # the head's input is each row's length, so a row's features name it
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((x != 0).sum(1, keepdim=True).float())

    lengths = [5, 1, 70, 3, 3, 100, 2] * 20  # 140 rows: three batches of 64, out of order
    x = torch.zeros(len(lengths), 101, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = 7
    feats = tu._embeddings(Lengths(), x)
    assert feats.shape == (140, 1)
    assert np.array_equal(feats[:, 0], np.array(lengths, dtype=np.float32))
