"""Bad input through the real `shardgen` command: one clear line, a non-zero exit, no traceback."""

import pytest

from tests.conftest import run_cli, write_jsonl


def assert_one_clear_line(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"question": "hi", "answer": "x"}])


def test_missing_file(tmp_path):
    assert_one_clear_line(run_cli("run", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.parquet")), "does not exist")


def test_unknown_column(tmp_path, data):
    result = run_cli("run", str(data), "-o", str(tmp_path / "o.parquet"), "--prompt-column", "prompt_text")
    assert_one_clear_line(result, "'prompt_text'", "available columns: question, answer")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("question\n")
    assert_one_clear_line(run_cli("run", str(empty), "-o", str(tmp_path / "o.parquet")), "no rows")


@pytest.mark.parametrize("flag, value, fragment", [("--temperature", "-1", "temperature must be >= 0, got -1"),
                                                    ("--top-p", "2", "top_p must be <= 1, got 2")])
def test_invalid_parameter_is_refused_before_anything_runs(tmp_path, data, flag, value, fragment):
    for command in (["run", str(data), "-o", str(tmp_path / "o.parquet")], ["submit", str(data), "--work-dir", str(tmp_path / "w"), "--broker", "redis://127.0.0.1:1/0"]):
        result = run_cli(*command, flag, value)
        assert_one_clear_line(result, fragment, "--help")
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.parquet").exists()


def test_unreachable_broker(tmp_path, data):
    result = run_cli("submit", str(data), "--work-dir", str(tmp_path / "w"), "--broker", "redis://:s3cret@127.0.0.1:1/0")
    assert_one_clear_line(result, "cannot reach Redis at redis://:***@127.0.0.1:1/0", "start redis-server")
    assert "s3cret" not in result.stderr + result.stdout


def test_unknown_run_id(redis_url):
    assert_one_clear_line(run_cli("status", "no-such-run", "--broker", redis_url), "no run no-such-run")
    assert_one_clear_line(run_cli("collect", "no-such-run", "-o", "x.parquet", "--broker", redis_url), "no run no-such-run")
    assert_one_clear_line(run_cli("collect", "../../etc", "-o", "x.parquet", "--broker", redis_url), "invalid run id")


def test_unreachable_hub_fails_fast_and_leaves_nothing(tmp_path, data):
    result = run_cli("run", str(data), "-o", str(tmp_path / "o.parquet"), "--model", "some-org/no-such-model",
                     env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_secret_token"}, timeout=60)
    assert_one_clear_line(result, "cannot reach the Hugging Face hub for model some-org/no-such-model", "--model")
    assert "hf_secret_token" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [data]


def test_unknown_model_and_bad_output_name(tmp_path, data):
    assert_one_clear_line(run_cli("run", str(data), "-o", str(tmp_path / "o.parquet"), "--model", "./no/such/dir"), "no/such/dir")
    assert_one_clear_line(run_cli("run", str(data), "-o", str(tmp_path / "o.txt")), ".parquet or .jsonl")


def test_every_command_has_complete_help():
    for command in ("run", "submit", "worker", "status", "collect"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "Usage: shardgen " + command in result.stdout
    run_help = run_cli("run", "--help").stdout
    for option in ("--prompt-column", "--messages-column", "--system-prompt", "--keep-columns", "--temperature", "--top-p",
                   "--quantize", "--max-prompt-tokens", "--config", "--seed", "--stop", "--num-return-sequences"):
        assert option in run_help


def test_an_existing_output_is_kept_unless_overwrite_and_the_input_never_is(tmp_path, data):
    kept = tmp_path / "o.jsonl"
    kept.write_text("earlier results\n")
    assert_one_clear_line(run_cli("run", str(data), "-o", str(kept)), f"the output {kept} exists already", "--overwrite")
    before = data.read_bytes()
    assert_one_clear_line(run_cli("run", str(data), "-o", str(data), "--overwrite"), "is also the input")
    assert data.read_bytes() == before and kept.read_text() == "earlier results\n"
    from shardgen.schemas.layout import RunLayout
    from shardgen.schemas.run import RunSpec
    from shardgen.workers.storage import write_run_file

    spec = RunSpec(input=str(data), shard_size=4)
    write_run_file(RunLayout(str(tmp_path / "work"), spec.run_id, 4), spec, 1, 1)
    collect = ["collect", spec.run_id, "--work-dir", str(tmp_path / "work"), "--allow-partial"]
    assert_one_clear_line(run_cli(*collect, "-o", str(kept)), "exists already")
    assert_one_clear_line(run_cli(*collect, "-o", str(data), "--overwrite"), "is also the input")
    assert data.read_bytes() == before and kept.read_text() == "earlier results\n"
    replaced = run_cli(*collect, "-o", str(kept), "--overwrite")
    assert replaced.returncode == 0 and "exists already" not in replaced.stderr
