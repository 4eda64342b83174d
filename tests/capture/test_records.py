"""Rows of text from dataset files: file order, row ids, one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnscope.capture.records import is_records, load_records
from attnscope.errors import InputError


def test_jsonl_keeps_file_order_and_line_numbers_as_row_ids(tmp_path) -> None:
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "zeta long one", "t": "a"}\n\n{"text": "a", "t": "b"}\n'
                 '{"text": "mid", "t": "c"}\n\n')  # fmt: skip
    rec = load_records(p, target_field="t")
    assert rec.texts == ["zeta long one", "a", "mid"]  # not sorted by length or text
    assert rec.targets == ["a", "b", "c"]
    np.testing.assert_array_equal(rec.rows, [0, 2, 3])  # the blank line keeps its number


def test_csv_and_parquet_read_named_columns(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "s.csv").write_text('\ufeffid,body\n7,"hello, world"\n8,second\n')  # Excel BOM
    assert load_records(tmp_path / "s.csv", "id").texts == ["7", "8"]
    rec = load_records(tmp_path / "s.csv", "body")
    assert rec.texts == ["hello, world", "second"] and rec.rows.tolist() == [0, 1]
    pq.write_table(pa.table({"body": ["b", "a"], "n": [1, 2]}), tmp_path / "s.parquet")
    assert load_records(tmp_path / "s.parquet", "body").texts == ["b", "a"]


def test_txt_is_one_sentence_per_line_and_takes_no_target(tmp_path) -> None:
    (tmp_path / "s.txt").write_text("one\n\ntwo\n")
    rec = load_records(tmp_path / "s.txt")
    assert rec.texts == ["one", "two"] and rec.rows.tolist() == [0, 2]
    with pytest.raises(InputError, match="--target-field needs"):
        load_records(tmp_path / "s.txt", target_field="x")


def test_a_saved_datasets_folder_is_rows(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["x", "y z"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "d"))
    assert is_records(tmp_path / "d") and not is_records(tmp_path)
    rec = load_records(tmp_path / "d")
    assert rec.texts == ["x", "y z"] and rec.rows.tolist() == [0, 1]
    with pytest.raises(InputError, match="field 'label' holds"):
        load_records(tmp_path / "d", "label")
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"holds the splits \['test', 'train'\]"):
        load_records(tmp_path / "dd")


@pytest.mark.parametrize(
    ("name", "text", "field", "needle"),
    [
        ("e.jsonl", "", None, "holds no rows"),
        ("b.jsonl", '{"text": "a"}\n{"text": "b"\n', None, "row 1 (line 2) is not JSON"),
        ("l.jsonl", '["a"]\n', None, "row 0 (line 1) holds a JSON list"),
        ("n.jsonl", '{"text": 3}\n', None, "field 'text' is '3' (int); expected a string"),
        ("u.jsonl", '{"body": "a"}\n', None, "--text-field 'text' is not a field"),
        ("u.csv", "body\na\n", "text", "its fields are ['body']"),
        ("x.tsv", "a\tb\n", None, "is not a text format"),
    ],
)
def test_bad_rows_are_one_line(tmp_path, name, text, field, needle) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError) as e:
        load_records(tmp_path / name, field)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_parquet_column_must_be_text(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(InputError, match="column 'text' holds int64"):
        load_records(tmp_path / "i.parquet")
    with pytest.raises(InputError, match=r"'body' is not a column of it; its columns are"):
        load_records(tmp_path / "i.parquet", "body")


def test_jsonl_row_ids_survive_json_with_unicode(tmp_path) -> None:
    rows = [{"text": "größer als ≥"}, {"text": "日本語"}]
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_records(tmp_path / "u.jsonl").texts == ["größer als ≥", "日本語"]
