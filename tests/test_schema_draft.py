"""`fedguard schema draft`: a reviewable schema drafted from the owner's own file, that nodes accept."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config
from common.data import load_encoded
from common.errors import ConfigError, DataError
from common.schema import DataSchema, Feature, load_schema
from fedguard.schema_cli import add_parser
from fedguard.schema_draft import draft_schema, outward_range, render
from tests.helpers import make_tabular


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedguard")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def clinic(tmp_path: Path) -> Path:
    df = make_tabular(300, seed=1)
    df["age"] = [17 + (i * 7) % 74 for i in range(len(df))]  # 17..90
    df["site"] = ["north", "south", "east"] * 100
    df["patient"] = [f"P{i:04d}" for i in range(len(df))]
    path = tmp_path / "clinic.csv"
    df.to_csv(path, index=False)
    return path


def test_tabular_draft_columns_ranges_categories(tmp_path: Path) -> None:
    draft = draft_schema(clinic(tmp_path), "y", sensitive=["group"])
    s = draft.schema
    by_name = {f.name: f for f in s.features}
    assert list(by_name) == ["a", "b", "c", "age", "site"]  # file order; label, sensitive and the id left out
    assert s.task == "tabular" and s.label == "y" and s.classes == ["0", "1"] and s.sensitive == ["group"]
    assert by_name["age"].type == "numeric" and by_name["age"].range == (10.0, 90.0)  # 17..90 rounded outward
    assert by_name["a"].range is not None and by_name["a"].range[0] < -2 and by_name["a"].range[1] > 2
    assert by_name["c"].categories == ["x", "y", "z"]
    assert by_name["site"].categories == ["east", "north", "south"]
    assert "group" not in by_name and "y" not in by_name
    assert draft.skipped == ["patient"]
    assert "300 distinct text values" in draft.notes["patient"][0]


def test_draft_loads_as_node_schema_and_in_a_run_config(tmp_path: Path) -> None:
    data = clinic(tmp_path)
    out = tmp_path / "schema.toml"
    assert cli(["schema", "draft", "--data", str(data), "--label", "y", "--sensitive", "group", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "on the owner's machine" in text and "nothing leaves the node" in text and "Review it" in text
    schema = load_schema(out)  # a node's --schema file
    assert schema == draft_schema(data, "y", sensitive=["group"]).schema
    enc = load_encoded(data, schema)  # the node's own data checks accept its drafted schema
    assert len(enc) == 300 and set(enc.groups) == {"group"}
    run = tmp_path / "run.toml"
    run.write_text(
        f'name = "drafted"\nrounds = 1\n[model]\nname = "ft-transformer"\n[simulation]\ndata_path = "clinic.csv"\n'
        f"[data]\nvalidation_fraction = 0.2\n[data.schema]\n{text}",
        encoding="utf-8",
    )
    cfg = load_config(run)
    assert cfg.data.schema_ == schema
    assert '[data] schema = "<this file>"' in text  # or by name, as the header says
    run.write_text(
        'name = "drafted"\nrounds = 1\n[simulation]\ndata_path = "clinic.csv"\n[data]\nschema = "schema.toml"\n',
        encoding="utf-8",
    )
    assert load_config(run).data.schema_ == schema
    with pytest.raises(ConfigError, match="already exists"):
        cli(["schema", "draft", "--data", str(data), "--label", "y", "--out", str(out)])
    assert cli(["schema", "draft", "--data", str(data), "--label", "y", "--out", str(out), "--force"]) == 0
    assert load_schema(out).sensitive == []


def test_text_draft_from_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"review": t, "stars": s, "lang": lang} for t, s, lang in [
        ("这个产品很好", "pos", "zh"), ("bad", "neg", "en"), ("NA", "neg", "en"), ("great stuff", "pos", "en"),
    ]]  # fmt: skip
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    argv = ["schema", "draft", "--data", str(path), "--label", "stars", "--text", "review", "--sensitive", "lang"]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    raw = tomllib.loads(text)
    assert raw == {
        "task": "text", "text_column": "review", "label": "stars", "classes": ["neg", "pos"], "sensitive": ["lang"],
    }  # fmt: skip
    schema = draft_schema(path, "stars", text="review", sensitive=["lang"]).schema
    assert len(load_encoded(path, schema, max_len=16)) == 4


def test_single_class_file_needs_declared_classes(tmp_path: Path) -> None:
    """A clinic that sees only negatives cannot know the other classes: the draft asks, then works."""
    df = make_tabular(50).assign(y=0)
    path = tmp_path / "negatives.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as exc:
        draft_schema(path, "y")
    assert "holds '0' only" in str(exc.value) and "--classes" in (exc.value.fix or "")
    schema = draft_schema(path, "y", classes=["0", "1"]).schema
    assert schema.classes == ["0", "1"]
    assert load_encoded(path, schema).y.unique().tolist() == [0]
    with pytest.raises(DataError, match=r"label value\(s\) \['0'\] in the file are not among --classes"):
        draft_schema(path, "y", classes=["yes", "no"])


def test_notes_for_values_nodes_would_refuse(tmp_path: Path) -> None:
    df = make_tabular(40)
    df.loc[[3, 7], "b"] = None
    df["const"] = 5
    df.loc[1, "y"] = None
    path = tmp_path / "gaps.csv"
    df.to_csv(path, index=False)
    draft = draft_schema(path, "y", exclude=["group"])
    assert '2 missing value(s): drafted with missing = "token"' in draft.notes["b"][0]
    labelled = tmp_path / "labelled.csv"
    df.dropna(subset=["y"]).to_csv(labelled, index=False)
    b = next(f for f in draft.schema.features if f.name == "b")
    assert b.missing == "token" and load_encoded(labelled, draft.schema).x.isnan().sum() == 2  # the node encodes them
    refusing = [f.model_copy(update={"missing": "refuse"}) for f in draft.schema.features]
    with pytest.raises(DataError, match="'b' has 2 missing"):  # "refuse": the file, not the rows
        load_encoded(labelled, draft.schema.model_copy(update={"features": refusing}))
    assert "1 row(s) without a label" in draft.notes["y"][0]
    assert "one value only" in draft.notes["const"][0]
    assert "group" not in {f.name for f in draft.schema.features}
    text = render(draft)
    assert "# b: 2 missing value(s)" in text and "# y: 1 row(s) without a label" in text
    assert tomllib.loads(text)["features"][3] == {"name": "const", "type": "numeric", "range": [4.0, 6.0]}
    assert tomllib.loads(text)["features"][1]["missing"] == "token"  # b, as written for the owner to review


def test_clear_errors_for_missing_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        draft_schema(tmp_path / "nope.csv", "y")
    path = tmp_path / "d.csv"
    make_tabular(20).to_csv(path, index=False)
    with pytest.raises(DataError) as exc:
        draft_schema(path, "Y")
    assert "missing required column(s) 'Y'" in str(exc.value) and "'Y' -> 'y'" in (exc.value.fix or "")
    with pytest.raises(DataError, match="'sex'"):
        draft_schema(path, "y", sensitive=["sex"])
    with pytest.raises(DataError, match="'ID'"):
        draft_schema(path, "y", exclude=["ID"])
    with pytest.raises(DataError, match="no feature columns are left"):
        draft_schema(path, "y", sensitive=["group"], exclude=["a", "b", "c"])


def test_outward_range_is_round_and_covers_the_data() -> None:
    assert outward_range(17, 90) == (10.0, 90.0)
    assert outward_range(0.1, 0.35) == (0.1, 0.4)
    assert outward_range(-3.2, 2.9) == (-4.0, 3.0)
    assert outward_range(0, 0) == (-1.0, 1.0)
    assert outward_range(5, 5) == (4.0, 6.0)


def test_outward_range_covers_large_magnitudes_and_the_float_edge() -> None:
    # 3.3e16 with a span of 20: the quotient rounds in float64 and used to land one step inside the data.
    for lo, hi in [(-3.304794379866853e16, -3.3047943798668508e16), (130541413418223.62, 130541413418224.52)]:
        a, b = outward_range(lo, hi)
        assert a <= lo and b >= hi and a < b
    assert outward_range(-1.7e308, 1.7e308) == (-1.7e308, 1.7e308)  # no overflow: the data's own bounds


def test_identifier_like_columns_are_left_out_with_a_note(tmp_path: Path) -> None:
    df = make_tabular(60, seed=2)
    df.insert(0, "record", range(1000, 1060))  # distinct integers: a row number under another name
    df["PatientID"] = [i % 7 for i in range(60)]  # an id by its name, even with repeats
    df["visits"] = [i % 5 for i in range(60)]  # a real count: integers that repeat
    path = tmp_path / "ids.csv"
    df.to_csv(path, index=False)
    draft = draft_schema(path, "y", sensitive=["group"])
    assert [f.name for f in draft.schema.features] == ["a", "b", "c", "visits"]
    assert draft.skipped == ["record", "PatientID"]
    assert "record identifier (all 60 values are distinct integers)" in draft.notes["record"][0]
    assert "its name ('PatientID') marks an identifier" in draft.notes["PatientID"][0]
    text = render(draft)
    assert "# record: left out: looks like a record identifier" in text and "add it by hand" in text.lower()


def test_numbers_and_dates_written_as_text_get_a_specific_fix(tmp_path: Path) -> None:
    """Spreadsheet exports write 1,549.34, 62%, $12 and dates: a node reads them as text, so the draft
    says what they are and what to do (never quoting the file's values), and so does the node's error."""
    df = make_tabular(80)
    rng = np.random.default_rng(0)
    df["amount"] = [f"{v:,.2f}" for v in rng.uniform(500, 5_000, len(df))]
    df["share"] = [f"{v}%" for v in rng.integers(0, 100, len(df))]
    df["fee"] = [f"${v}" for v in rng.integers(0, 5, len(df))]  # few values: drafted as categories
    df["visit"] = [str(np.datetime64("2024-01-01") + d) for d in rng.permutation(len(df))]
    df["word"] = [f"w{i}" for i in range(len(df))]  # plain free text: the general note
    path = tmp_path / "export.csv"
    df.to_csv(path, index=False)
    draft = draft_schema(path, "y", exclude=["group"])
    names = {f.name for f in draft.schema.features}
    assert "thousands separators" in draft.notes["amount"][0] and "amount" not in names
    assert "percentages" in draft.notes["share"][0] and "share" not in names
    assert "dates" in draft.notes["visit"][0] and "derive a number" in draft.notes["visit"][0] and "visit" not in names
    assert "currency sign" in draft.notes["fee"][0] and "losing their order" in draft.notes["fee"][0]
    assert "fee" in names
    assert "distinct text values" in draft.notes["word"][0] and "dates" not in draft.notes["word"][0]
    assert df["amount"][0] not in render(draft) and df["visit"][0] not in render(draft)
    schema = DataSchema(task="tabular", label="y", classes=["0", "1"], features=[{"name": "amount"}])
    with pytest.raises(DataError) as err:
        load_encoded(path, schema)
    assert "write them without separators" in (err.value.fix or "")


def test_a_european_excel_export_is_drafted_and_read_as_written(tmp_path: Path) -> None:
    """';' between fields, ',' as the decimal mark, cp1252 text with accents, CRLF lines: the draft says how the file
    is written, and a node reading it with that schema gets the same numbers and categories as the owner's pandas."""
    df = make_tabular(60, seed=3)
    df["région"] = ["Île-de-France", "Bretagne", "Provence"] * 20
    path = tmp_path / "export.csv"
    df.to_csv(path, index=False, sep=";", decimal=",", encoding="cp1252", lineterminator="\r\n")
    with pytest.raises(DataError, match="not valid utf-8"):  # told how to say the encoding
        draft_schema(path, "y", sensitive=["group"])
    assert cli(["schema", "draft", "--data", str(path), "--label", "y", "--sensitive", "group",
                "--encoding", "cp1252", "--out", str(out := tmp_path / "schema.toml")]) == 0  # fmt: skip
    drafted = tomllib.loads(out.read_text(encoding="utf-8"))
    assert (drafted["encoding"], drafted["delimiter"], drafted["decimal"]) == ("cp1252", ";", ",")
    schema = load_schema(str(out))
    assert [(f.name, f.type) for f in schema.features] == [
        ("a", "numeric"), ("b", "numeric"), ("c", "categorical"), ("région", "categorical")
    ]  # fmt: skip
    encoded = load_encoded(path, schema)
    assert len(encoded) == 60 and encoded.x.shape[1] == 4
    assert sorted(schema.features[3].categories or []) == sorted({"Île-de-France", "Bretagne", "Provence"})
    # What the node's features hold: the file's numbers, not 3 and 5 from "3,5".
    assert schema.features[0].range is not None and schema.features[0].range[0] < df["a"].min()
    # A node whose schema says ',' (the default) is told which delimiter the file uses and how to say so.
    with pytest.raises(DataError) as exc:
        load_encoded(path, schema.model_copy(update={"delimiter": ",", "decimal": "."}))
    assert 'set delimiter = ";" (and decimal = "," if its numbers are written 3,5)' in (exc.value.fix or "")
    tsv = tmp_path / "export.tsv"  # a tab-separated export is CSV with another delimiter
    df.to_csv(tsv, index=False, sep="\t")
    assert draft_schema(tsv, "y", sensitive=["group"]).schema.delimiter == "\t"
    with pytest.raises(ValueError, match="also the decimal mark"):
        DataSchema.model_validate({**schema.model_dump(), "delimiter": ",", "decimal": ","})


def test_a_uci_style_file_reads_without_the_spaces_after_its_commas(tmp_path: Path) -> None:
    """UCI's files write "39, State-gov, 77516, Male": names, categories and labels carry no leading space, and a file
    without a header line is told so instead of 'no column income'."""
    rows = [f"{20 + i % 50}, {['Private', 'State-gov', '?'][i % 3]}, {10 + i % 60}, {['Male', 'Female'][i % 2]}, "
            f"{['<=50K', '>50K'][(i // 3) % 2]}" for i in range(90)]  # fmt: skip
    path = tmp_path / "adult.csv"
    path.write_text("age, workclass, hours, sex, income\n" + "\n".join(rows) + "\n", encoding="utf-8")
    draft = draft_schema(path, "income", sensitive=["sex"])
    assert draft.schema.classes == ["<=50K", ">50K"]
    assert [(f.name, f.categories) for f in draft.schema.features] == [
        ("age", None), ("workclass", ["?", "Private", "State-gov"]), ("hours", None)
    ]  # fmt: skip
    encoded = load_encoded(path, draft.schema)
    assert len(encoded) == 90 and encoded.y.tolist()[:6] == [0, 0, 0, 1, 1, 1]
    headless = tmp_path / "adult-data.csv"
    headless.write_text("\n".join(rows) + "\n", encoding="utf-8")
    for schema in (None, draft.schema):  # drafting it, and a node reading it
        with pytest.raises(DataError) as exc:
            draft_schema(headless, "income") if schema is None else load_encoded(headless, schema)
        assert "first line looks like a data row (it holds '20')" in (exc.value.fix or "")


def test_a_parquet_files_own_types_draft_and_a_timestamp_is_never_a_number(tmp_path: Path) -> None:
    """Nullable integers, booleans and categoricals draft as features; a timestamp column is left out with what to
    do, and a node whose schema declares one numeric refuses it instead of feeding the model nanoseconds."""
    import pandas as pd

    n = 120
    df = pd.DataFrame({
        "age": pd.array([18 + i % 70 for i in range(n)], dtype="Int64"),
        "smoker": pd.array([i % 3 == 0 for i in range(n)], dtype="boolean"),
        "region": pd.Categorical([["n", "s", "e"][i % 3] for i in range(n)]),
        "visit": pd.Timestamp("2024-01-01") + pd.to_timedelta([(i // 4) * 7 for i in range(n)], unit="D"),
        "y": pd.Categorical([["no", "yes"][(i // 2) % 2] for i in range(n)]),
    })  # fmt: skip
    df.to_parquet(path := tmp_path / "visits.parquet")
    draft = draft_schema(path, "y")
    assert [(f.name, f.type) for f in draft.schema.features] == [
        ("age", "numeric"), ("smoker", "numeric"), ("region", "categorical")
    ]  # fmt: skip
    assert draft.skipped == ["visit"] and "a date or time column" in draft.notes["visit"][0]
    assert len(load_encoded(path, draft.schema)) == n
    dated = draft.schema.model_copy(
        update={"features": [*draft.schema.features, Feature(name="visit", type="numeric")]}
    )
    with pytest.raises(DataError, match="'visit' holds dates or times, not numbers") as exc:
        load_encoded(path, dated)
    assert "days since a public date" in (exc.value.fix or "")


def test_nested_json_lines_read_as_dotted_columns_and_a_list_is_not_one_value(tmp_path: Path) -> None:
    """{"review": {"text": ...}} is the column 'review.text' (a node read the dict's repr as the text, silently);
    a list where one value belongs is refused with the row, not tokenized as "['good', 'film']"."""
    rows = [{"id": i, "review": {"text": ["bad film", "good film"][i % 2]}, "stars": i % 2} for i in range(40)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        draft_schema(path, "stars", text="review")
    assert "'review' -> 'review.text'" in (exc.value.fix or "")
    draft = draft_schema(path, "stars", text="review.text")
    assert draft.schema.classes == ["0", "1"]
    encoded = load_encoded(path, draft.schema)
    flat = tmp_path / "flat.jsonl"  # the same reviews as a plain text field: the node sees the same tokens
    flat.write_text("".join(json.dumps({"t": r["review"]["text"], "stars": r["stars"]}) + "\n" for r in rows))
    same = load_encoded(flat, draft.schema.model_copy(update={"text_column": "t"}))
    assert len(encoded) == 40 and encoded.x.equal(same.x)
    rows[7]["review"]["text"] = ["good", "film"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="column 'review.text' holds a list at row 8, not one value"):
        load_encoded(path, draft.schema)
    import pandas as pd  # a Parquet list column, likewise

    pd.DataFrame({"t": [["good", "film"]] * len(rows), "stars": [r["stars"] for r in rows]}).to_parquet(
        pq := tmp_path / "lists.parquet"
    )
    with pytest.raises(DataError, match="column 't' holds a list at rows 1"):
        load_encoded(pq, draft.schema.model_copy(update={"text_column": "t"}))
