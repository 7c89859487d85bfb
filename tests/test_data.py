"""Reading, encoding and caching data files: shapes, values, and every user-facing data error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common.data as data
from common.data import Encoded, encode, file_sha256, load_encoded, read_table, split_indices
from common.errors import ConfigError, DataError
from common.schema import DataSchema, Feature
from common.tokenizer import BYTE_OFFSET, CLS_ID, PAD_ID, VOCAB_SIZE, encode_texts

TAB = DataSchema(
    task="tabular",
    features=[
        Feature(name="age", range=(0, 100)),
        Feature(name="income"),
        Feature(name="color", type="categorical", categories=["red", "green", "01"]),
    ],
    label="y",
    classes=["0", "1"],
    sensitive=["sex"],
)
TEXT = DataSchema(task="text", text_column="text", label="label", classes=["neg", "pos"], sensitive=["lang"])


def tab_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [50, 150, 0, 25],
            "income": [0.0, 100.0, -100.0, 1.0],
            "color": ["red", "green", "01", "red"],
            "y": [0, 1, 1, 0],
            "sex": ["f", "m", None, "f"],
            "unused": [1, 2, 3, 4],
        }
    )


def text_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": ["这个产品很好", "bad", "NA", "great stuff"],
            "label": ["pos", "neg", "neg", "pos"],
            "lang": ["zh", "en", "en", "en"],
        }
    )


def write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict("records")))
    return path


def err(exc: pytest.ExceptionInfo[DataError]) -> str:
    return str(exc.value)


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_constants_and_shape() -> None:
    assert (PAD_ID, CLS_ID, BYTE_OFFSET, VOCAB_SIZE) == (0, 1, 3, 259)
    ids = encode_texts(["ab", "这个产品很好", ""], max_len=8)
    assert ids.dtype == torch.long and ids.shape == (3, 8)
    assert ids[0].tolist() == [CLS_ID, ord("a") + 3, ord("b") + 3, 0, 0, 0, 0, 0]
    zh = [b + BYTE_OFFSET for b in "这个产品很好".encode()]
    assert ids[1].tolist() == [CLS_ID, *zh[:7]]  # 18 bytes truncated to 7
    assert ids[2].tolist() == [CLS_ID] + [PAD_ID] * 7
    assert int(ids.max()) < VOCAB_SIZE
    assert encode_texts([], max_len=4).shape == (0, 4)
    with pytest.raises(ConfigError):
        encode_texts(["a"], max_len=0)


# ------------------------------------------------------------------------------ reading + encoding


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_tabular_encoding_same_for_every_format(tmp_path: Path, suffix: str) -> None:
    path = write(tab_frame(), tmp_path / f"d{suffix}")
    enc = encode(read_table(path, TAB), TAB, source=str(path))
    assert isinstance(enc, Encoded) and len(enc) == 4
    assert enc.x.dtype == torch.float32 and enc.x.shape == (4, 3)
    assert enc.y.dtype == torch.long and enc.y.tolist() == [0, 1, 1, 0]
    # age: clipped to [0, 100] and scaled to [-1, 1]
    assert enc.x[:, 0].tolist() == pytest.approx([0.0, 1.0, -1.0, -0.5])
    # income: sign(x) * log1p(|x|)
    assert enc.x[:, 1].tolist() == pytest.approx([0.0, np.log1p(100), -np.log1p(100), np.log1p(1)], rel=1e-6)
    # color: index into declared categories ("01" stays "01", not 1)
    assert enc.x[:, 2].tolist() == [0.0, 1.0, 2.0, 0.0]
    assert enc.groups["sex"].tolist() == ["f", "m", "missing", "f"]
    assert enc.groups["sex"].dtype.kind == "U"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_text_encoding_with_chinese(tmp_path: Path, suffix: str) -> None:
    path = write(text_frame(), tmp_path / f"t{suffix}")
    enc = load_encoded(path, TEXT, max_len=16, cache_dir=None)
    assert enc.x.dtype == torch.long and enc.x.shape == (4, 16)
    assert enc.x[0, 1:].tolist() == [b + BYTE_OFFSET for b in "这个产品很好".encode()[:15]]
    # A text reading "NA" is text, not a missing value.
    assert enc.x[2, :3].tolist() == [CLS_ID, ord("N") + 3, ord("A") + 3]
    assert enc.y.tolist() == [1, 0, 0, 1]
    assert enc.groups["lang"].tolist() == ["zh", "en", "en", "en"]


def test_label_and_category_values_normalised() -> None:
    schema = DataSchema(
        task="tabular",
        features=[Feature(name="k", type="categorical", categories=["1", "2"])],
        label="y",
        classes=["0", "1"],
        sensitive=["g"],
    )
    df = pd.DataFrame({"k": [1.0, 2.0, "2", 1], "y": [1.0, 0.0, "1.0", "0"], "g": [1.0, 2.0, np.nan, 2]})
    enc = encode(df, schema)
    assert enc.x[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert enc.y.tolist() == [1, 0, 1, 0]
    assert enc.groups["g"].tolist() == ["1", "2", "missing", "2"]


def test_classes_and_categories_written_as_toml_numbers_are_the_same_values(tmp_path: Path) -> None:
    """``classes = [0, 1]`` is what a data owner writes for a 0/1 label; it was refused ("Input should be a
    valid string"). Numbers read as the text the data is compared with; booleans are still refused."""
    import tomllib

    text = (
        'task = "tabular"\nlabel = "y"\nclasses = [0, 1]\n'
        'features = [{name = "k", type = "categorical", categories = [1, 2.0, 2.5]}]\n'
    )
    schema = DataSchema.model_validate(tomllib.loads(text))
    assert schema.classes == ["0", "1"] and schema.features[0].categories == ["1", "2", "2.5"]
    enc = encode(pd.DataFrame({"k": [2, 1, 2.5], "y": [1, 0, 1]}), schema)
    assert enc.x[:, 0].tolist() == [1.0, 0.0, 2.0] and enc.y.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="valid string"):
        DataSchema(task="tabular", label="y", classes=[True, False])  # type: ignore[list-item]


def test_subset() -> None:
    enc = encode(tab_frame(), TAB)
    sub = enc.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [0, 1]
    assert torch.equal(sub.x, enc.x[[3, 1]])
    assert sub.groups["sex"].tolist() == ["f", "m"]
    assert len(enc.subset(np.array([True, False, True, False]))) == 2


# ------------------------------------------------------------------------------ read errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        read_table(tmp_path / "nope.csv", TAB)
    assert "not found" in err(exc) and "nope.csv" in err(exc)
    with pytest.raises(DataError, match="nope.csv"):
        load_encoded(tmp_path / "nope.csv", TAB, max_len=8, cache_dir=tmp_path / "cache")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError) as exc:
        read_table(path, TAB)
    assert "'.txt'" in err(exc) and "data.txt" in err(exc) and "format" in exc.value.fix


def test_a_workbook_is_told_to_be_exported_not_renamed(tmp_path: Path) -> None:
    path = tmp_path / "clinic.xlsx"
    path.write_bytes(b"PK\x03\x04 not a csv")
    with pytest.raises(DataError) as exc:
        read_table(path, TAB)
    assert "save the sheet as CSV (UTF-8) or Parquet" in exc.value.fix and "rename" not in exc.value.fix


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """pandas reads a repeated name as 'age.1', so the second column silently became another feature."""
    path = tmp_path / "dup.csv"
    path.write_text("age,income,color,age,y,sex\n1,2,red,3,0,f\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_table(path, TAB)
    assert "the header names column 'age' 2 times (columns 1, 4)" in err(exc) and "dup.csv:line 1" in err(exc)
    path.write_text('age,income,color,"age ",y,sex,,\n1,2,red,3,0,f,,\n', encoding="utf-8")  # other names
    assert list(read_table(path, TAB).columns)[:6] == ["age", "income", "color", "age ", "y", "sex"]


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = write(tab_frame(), tmp_path / "data.csv").rename(tmp_path / "data.txt")
    assert len(read_table(path, TAB.model_copy(update={"format": "csv"}))) == 4


def test_wrong_encoding_names_encoding_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes("text,label,lang\nok,pos,en\n这个产品很好,pos,zh\n".encode("gbk"))
    with pytest.raises(DataError) as exc:
        read_table(path, TEXT)
    msg = err(exc)
    assert "gbk.csv:line 3" in msg and "utf-8" in msg and "encoding" in exc.value.fix
    gbk = read_table(path, TEXT.model_copy(update={"encoding": "gbk"}))
    assert gbk["text"].tolist()[1] == "这个产品很好"


def test_unknown_encoding_name(tmp_path: Path) -> None:
    path = write(text_frame(), tmp_path / "t.jsonl")
    with pytest.raises(DataError, match="unknown text encoding 'utf9'"):
        read_table(path, TEXT.model_copy(update={"encoding": "utf9"}))


def test_utf8_bom_is_not_part_of_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "text,label,lang\n好,pos,zh\nx,neg,en\n".encode())
    assert list(read_table(path, TEXT).columns) == ["text", "label", "lang"]


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "pos", "lang": "en"}\n\n{"text": "b", "label": \n')
    with pytest.raises(DataError) as exc:
        read_table(path, TEXT)
    assert "line 3" in err(exc) and "t.jsonl" in err(exc) and "not valid JSON" in err(exc)
    path.write_text('{"text": "a", "label": "pos", "lang": "en"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not an object"):
        read_table(path, TEXT)


def test_malformed_csv_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label,lang\nfine,pos,en\nhello, world,neg,en\n")
    with pytest.raises(DataError) as exc:
        read_table(path, TEXT)
    assert "t.csv:line 3" in err(exc) and "4 fields" in err(exc) and "quote" in exc.value.fix


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="t.parquet: the file cannot be read as Parquet"):
        read_table(path, TEXT)


def test_missing_columns_listed_with_available(tmp_path: Path) -> None:
    path = write(text_frame().rename(columns={"label": "Label"}).drop(columns="lang"), tmp_path / "t.csv")
    with pytest.raises(DataError) as exc:
        read_table(path, TEXT)
    msg = err(exc)
    assert "'label'" in msg and "'lang'" in msg and "the file has: 'text', 'Label'" in msg
    assert "'label' -> 'Label'" in exc.value.fix


@pytest.mark.parametrize("content", ["", "text,label,lang\n"])
def test_empty_data(tmp_path: Path, content: str) -> None:
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        read_table(path, TEXT)
    assert "e.csv" in err(exc) and ("empty" in err(exc) or "no data rows" in err(exc))


# ------------------------------------------------------------------------------ encode errors


def test_missing_feature_value_names_column_and_rows(tmp_path: Path) -> None:
    df = tab_frame()
    df.loc[[1, 3], "income"] = np.nan
    path = write(df, tmp_path / "m.csv")
    with pytest.raises(DataError) as exc:
        load_encoded(path, TAB, max_len=8, cache_dir=None)
    msg = err(exc)
    assert msg.startswith(f"{path}:income:row 2:") and "rows 2, 4" in msg and "'income'" in msg


def test_missing_token_features_encode_missing_values_and_still_refuse_bad_ones(tmp_path: Path) -> None:
    """Titanic's 263 missing ages: a node refused the file; with missing = "token" the value encodes as NaN
    (numeric; the model's missing vector) or one code past the categories; a wrong value is still refused."""
    df = tab_frame().astype({"income": object, "color": object})
    df.loc[[1, 3], "income"] = [np.nan, " "]  # NaN in a numeric column and a blank cell in a text-typed one
    df.loc[2, "color"] = None
    with pytest.raises(DataError) as exc:  # the default still refuses, and says how to allow it
        encode(df, TAB, source="m.csv")
    assert 'missing = "token"' in (exc.value.fix or "")
    token = TAB.model_copy(
        update={"features": [f.model_copy(update={"missing": "token"}) if f.name != "age" else f for f in TAB.features]}
    )
    enc = encode(df, token, source="m.csv")
    income, color = enc.x[:, 1].numpy(), enc.x[:, 2].numpy()
    assert np.isnan(income[[1, 3]]).all() and np.isfinite(income[[0, 2]]).all()
    assert color.tolist() == [0.0, 1.0, 3.0, 0.0]  # missing: code 3, after red, green, 01
    df.loc[0, "income"] = "12k"  # not a number and not missing: refused as before
    with pytest.raises(DataError, match=r"m\.csv:income:row 1: numeric feature 'income' has a non-numeric"):
        encode(df, token, source="m.csv")
    with pytest.raises(ValueError, match="missing"):
        Feature(name="a", missing="zero")  # type: ignore[arg-type]


def test_missing_label_and_text(tmp_path: Path) -> None:
    df = text_frame()
    df.loc[2, "label"] = None
    with pytest.raises(DataError, match=r"f\.csv:label:row 3: label column 'label' has 1 missing"):
        encode(df, TEXT, source="f.csv")
    df = text_frame()
    df.loc[0, "text"] = "   "
    with pytest.raises(DataError, match=r"f\.csv:text:row 1: text column 'text'"):
        encode(df, TEXT, source="f.csv")


def test_non_numeric_value(tmp_path: Path) -> None:
    df = tab_frame().astype({"income": object})
    df.loc[2, "income"] = "12k"
    path = write(df, tmp_path / "n.csv")
    with pytest.raises(DataError) as exc:
        load_encoded(path, TAB, max_len=8, cache_dir=None)
    msg = err(exc)
    assert "n.csv:income:row 3" in msg and "'12k'" in msg and "categorical" in exc.value.fix


def test_many_bad_rows_are_summarised() -> None:
    df = pd.concat([tab_frame()] * 3, ignore_index=True).astype({"age": object})
    df["age"] = "x"
    with pytest.raises(DataError, match=r"rows 1, 2, 3, 4, 5 and 7 more"):
        encode(df, TAB)


def test_undeclared_category(tmp_path: Path) -> None:
    df = tab_frame()
    df.loc[3, "color"] = "blue"
    path = write(df, tmp_path / "c.parquet")
    with pytest.raises(DataError) as exc:
        load_encoded(path, TAB, max_len=8, cache_dir=None)
    msg = err(exc)
    assert "c.parquet:color:row 4" in msg and "'blue'" in msg and "'red', 'green', '01'" in msg
    assert "categories" in exc.value.fix


def test_label_not_in_classes() -> None:
    df = text_frame()
    df.loc[1, "label"] = "neutral"
    with pytest.raises(DataError) as exc:
        encode(df, TEXT, source="r.jsonl")
    msg = err(exc)
    assert "r.jsonl:label:row 2" in msg and "'neutral'" in msg and "'neg', 'pos'" in msg
    assert "classes" in exc.value.fix


def test_label_not_in_classes_tabular_file(tmp_path: Path) -> None:
    df = tab_frame()
    df["y"] = df["y"].astype(object)
    df.loc[2, "y"] = 7
    path = write(df, tmp_path / "clinic.csv")
    with pytest.raises(DataError) as exc:
        load_encoded(path, TAB, max_len=8)
    msg = err(exc)
    assert f"{path}:y:row 3" in msg and "'7'" in msg and "'0', '1'" in msg
    assert exc.value.code == "data-invalid"


@pytest.mark.parametrize("task", ["tabular", "text"])
def test_single_class_node_encodes(tmp_path: Path, task: str) -> None:
    """A node that sees one label only (a clinic with only negatives) is a normal federated node."""
    if task == "tabular":
        schema, df, only = TAB, tab_frame().assign(y=1), "1"
    else:
        schema, df, only = TEXT, text_frame().assign(label="pos"), "pos"
    path = write(df, tmp_path / "one.csv")
    enc = load_encoded(path, schema, max_len=8, cache_dir=tmp_path / "cache")
    assert len(enc) == 4
    assert enc.y.tolist() == [schema.classes.index(only)] * 4
    train_idx, val_idx = split_indices(len(enc), 0.25, seed=0)
    assert len(train_idx) == 3 and len(val_idx) == 1


# ------------------------------------------------------------------------------ split


def test_split_indices_deterministic() -> None:
    tr, va = split_indices(100, 0.2, seed=7)
    tr2, va2 = split_indices(100, 0.2, seed=7)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 20 and len(tr) == 80
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert not np.array_equal(va, split_indices(100, 0.2, seed=8)[1])
    tr, va = split_indices(1, 0.9, seed=0)
    assert len(tr) == 1 and len(va) == 0
    assert len(split_indices(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(ConfigError, match="validation_fraction"):
        split_indices(10, 0.95, seed=0)


# ------------------------------------------------------------------------------ cache


def test_cache_hit_skips_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(text_frame(), tmp_path / "t.csv")
    cache = tmp_path / "cache"
    first = load_encoded(path, TEXT, max_len=16, cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and (files[0].stat().st_mode & 0o077) == 0
    assert not list(cache.glob("*.tmp"))

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("data file re-read on a cache hit")

    monkeypatch.setattr(data, "read_table", boom)
    monkeypatch.setattr(data, "encode_texts", boom)
    second = load_encoded(path, TEXT, max_len=16, cache_dir=cache)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert second.groups["lang"].tolist() == first.groups["lang"].tolist()

    # a different max_len or changed file content is a different key
    with pytest.raises(AssertionError):
        load_encoded(path, TEXT, max_len=8, cache_dir=cache)
    path.write_text(path.read_text() + "more,neg,en\n")
    with pytest.raises(AssertionError):
        load_encoded(path, TEXT, max_len=16, cache_dir=cache)


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    path = write(tab_frame(), tmp_path / "d.parquet")
    cache = tmp_path / "cache"
    first = load_encoded(path, TAB, max_len=8, cache_dir=cache)
    (cached,) = cache.glob("*.pt")
    cached.write_bytes(b"garbage")
    again = load_encoded(path, TAB, max_len=8, cache_dir=cache)
    assert torch.equal(first.x, again.x) and again.groups["sex"].tolist() == ["f", "m", "missing", "f"]
    assert cached.stat().st_size > 100  # rewritten with a valid file
    assert torch.equal(load_encoded(path, TAB, max_len=8, cache_dir=cache).x, first.x)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
