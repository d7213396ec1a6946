import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardgen.producer.dataset import iter_shards, read_input
from shardgen.workers.storage import load_dataset_table
from shardgen.schemas.errors import InputError
from shardgen.schemas.run import ColumnMapping, RunSpec
from tests.conftest import write_jsonl

ROWS = [{"question": f"q{i}", "answer": f"a{i}", "topic": "t", "uid": f"u{i}"} for i in range(7)]


def shards_of(source, **columns):
    spec = RunSpec(input=str(source), columns=ColumnMapping(**columns), shard_size=3)
    return list(iter_shards(spec, read_input(spec)))


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "disk"])
def test_every_format_yields_the_same_rows_in_order(tmp_path, fmt):
    table = pa.Table.from_pylist(ROWS)
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "csv":
        source = tmp_path / "d.csv"
        source.write_text("question,answer,topic,uid\n" + "".join(f"q{i},a{i},t,u{i}\n" for i in range(7)))
    elif fmt == "parquet":
        source = tmp_path / "d.parquet"
        pq.write_table(table, source)
    else:
        import datasets

        source = tmp_path / "saved"
        datasets.Dataset(table).save_to_disk(str(source))
    shards = shards_of(source, id_column="uid", keep_columns=("topic",), ground_truth_column="answer")
    assert [len(s.rows) for s in shards] == [3, 3, 1]
    rows = [r for s in shards for r in s.rows]
    assert [r.index for r in rows] == list(range(7))
    assert [r.prompt for r in rows] == [f"q{i}" for i in range(7)]
    assert rows[4].id == "u4" and rows[4].keep == {"topic": "t"} and rows[4].ground_truth == "a4"


def test_limit_and_default_ids(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = RunSpec(input=str(source), limit=4, shard_size=10)
    rows = list(iter_shards(spec, read_input(spec)))[0].rows
    assert [r.id for r in rows] == ["0", "1", "2", "3"]


def test_bad_rows_are_recorded_on_the_row_not_raised(tmp_path):
    source = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "fine"}, {"prompt": None}, {"prompt": "   "}],
    )
    rows = shards_of(source)[0].rows
    assert rows[0].error is None and rows[0].prompt == "fine"
    assert "null" in rows[1].error and "empty" in rows[2].error
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 42}])
    assert shards_of(numbers)[0].rows[0].prompt == "42"


def test_messages_column_is_validated_per_row(tmp_path):
    good = [{"role": "user", "content": "hello"}]
    source = write_jsonl(tmp_path / "d.jsonl", [{"chat": good}, {"chat": []}, {"chat": [{"role": "user"}]}])
    rows = shards_of(source, messages_column="chat")[0].rows
    assert rows[0].messages == good and rows[0].error is None
    assert rows[1].error and rows[2].error


def test_errors_for_missing_unknown_empty_and_unsupported(tmp_path):
    with pytest.raises(InputError, match="input file missing.jsonl does not exist"):
        load_dataset_table("missing.jsonl")
    source = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(InputError, match=r"column 'prompt_text' \(--prompt-column\) is not in the input.*available columns: question"):
        shards_of(source, prompt_column="prompt_text")
    with pytest.raises(InputError, match=r"'nope' \(--keep-columns\)"):
        shards_of(source, keep_columns=("nope",))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no rows|cannot read"):
        load_dataset_table(str(empty))
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(InputError, match="unsupported input format .xlsx"):
        load_dataset_table(str(odd))
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match="cannot read dataset"):
        load_dataset_table(str(corrupt))
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"a": 1}])
    with pytest.raises(InputError, match="no prompt column found"):
        shards_of(no_prompt)


def test_non_utf8_text_fails_only_its_row(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n' + json.dumps({"prompt": "caf"}).encode()[:-2] + b'\xe9"}\n')
    rows = shards_of(path)[0].rows
    assert rows[0].prompt == "ok" and rows[0].error is None
    assert "not valid UTF-8" in rows[1].error


def test_hub_datasets_take_a_subset_and_a_revision_from_flags_and_toml(tmp_path, monkeypatch):
    """`--subset main --revision v1` (or subset/revision in TOML) reach datasets.load_dataset as the config name
    and revision; the hub is not reachable here, so the call is recorded instead of made."""
    import datasets

    from shardgen.producer.config import build_run_spec, load_config, merge

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs.get("split"), kwargs.get("revision")))
        return datasets.Dataset.from_list([{"question": "What is 2 + 2?", "answer": "4"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    toml = tmp_path / "run.toml"
    toml.write_text('input = "openai/gsm8k"\nsubset = "main"\nrevision = "v1"\nsplit = "test"\n[model]\nrevision = "abc123"\n')
    spec = build_run_spec(merge(load_config(toml), {}))
    assert (spec.subset, spec.revision, spec.model.revision) == ("main", "v1", "abc123")
    rows = list(iter_shards(spec, read_input(spec)))[0].rows
    assert calls == [("openai/gsm8k", "main", "test", "v1")] and rows[0].prompt == "What is 2 + 2?"
    flags = build_run_spec(merge({}, {"input": "openai/gsm8k", "subset": "socratic", "revision": "v2"}))
    assert spec.difference(flags).startswith("dataset selection")
