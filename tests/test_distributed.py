"""The distributed path with real parts: our own redis-server, two `shardgen worker` processes, the CLI."""

import json

import pyarrow.parquet as pq

from shardgen.schemas.results import decode_metadata
from tests.conftest import run_cli, run_status_now, wait_until, write_jsonl

TOPICS = ["rivers", "stars", "bread", "trains", "music", "chess"]


def make_rows(count):
    return [
        {"uid": f"id-{i:04d}", "topic": TOPICS[i % 6], "question": f"Tell me {'more ' * (i % 7)}about {TOPICS[i % 6]} number {i}."}
        for i in range(count)
    ]


def wait_for_end(run_id, broker, timeout=420):
    """Poll the run until it ends; its final status comes from the real `status --json` command."""
    wait_until(lambda: run_status_now(run_id, broker)["finished_at"] is not None, timeout=timeout, what=f"run {run_id} to end")
    result = run_cli("status", run_id, "--json", "--broker", broker)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_two_workers_every_row_exactly_once_and_same_text_as_embedded(tmp_path, redis_url, tiny_model_dir, start_worker):
    data = write_jsonl(tmp_path / "questions.jsonl", make_rows(240))
    model = str(tiny_model_dir)
    common = ["--model", model, "--shard-size", "12", "--max-new-tokens", "8", "--id-column", "uid", "--keep-columns", "topic"]
    workers = [start_worker(model, redis_url), start_worker(model, redis_url)]
    for worker in workers:
        worker.wait_ready()

    submitted = run_cli("submit", str(data), "--work-dir", str(tmp_path / "work"), "--broker", redis_url, "--json", *common)
    assert submitted.returncode == 0, submitted.stderr
    record = json.loads(submitted.stdout)
    run_id = record["run_id"]
    assert record["rows_total"] == 240 and record["shards_total"] == 20 and record["state"] in ("queued", "running")

    status = wait_for_end(run_id, redis_url)
    assert status["state"] == "done"
    assert (status["rows_total"], status["rows_done"], status["rows_failed"]) == (240, 240, 0)
    assert (status["shards_total"], status["shards_done"]) == (20, 20)

    table_view = run_cli("status", run_id, "--broker", redis_url)
    assert table_view.returncode == 0 and "20 done" in table_view.stdout

    out = tmp_path / "collected.parquet"
    collected = run_cli("collect", run_id, "-o", str(out), "--broker", redis_url)
    assert collected.returncode == 0, collected.stderr
    result = pq.read_table(out).to_pylist()
    assert [r["row_index"] for r in result] == list(range(240))
    assert [r["id"] for r in result] == [f"id-{i:04d}" for i in range(240)]
    assert all(r["error"] is None and r["generation"] for r in result)
    assert [r["topic"] for r in result] == [TOPICS[i % 6] for i in range(240)]
    assert status["generated_tokens"] == sum(r["generated_tokens"] for r in result) > 0

    parts = sorted((tmp_path / "work" / run_id).glob("part-*.parquet"))
    assert len(parts) == 20
    metas = [decode_metadata(pq.read_schema(p).metadata) for p in parts]
    assert {m["run_id"] for m in metas} == {run_id}
    assert sorted(int(m["shard_index"]) for m in metas) == list(range(20))
    assert {m["model"] for m in metas} == {model} and {m["device"] for m in metas} == {"cpu"}
    assert len({m["worker"] for m in metas}) == 2, "both workers should have taken shards"

    embedded_out = tmp_path / "embedded.jsonl"
    embedded = run_cli("run", str(data), "-o", str(embedded_out), *common)
    assert embedded.returncode == 0, embedded.stderr
    embedded_rows = [json.loads(line) for line in embedded_out.read_text().splitlines()]
    assert [r["generation"] for r in embedded_rows] == [r["generation"] for r in result]


def test_a_run_reaches_only_workers_of_its_model(tmp_path, redis_url, tiny_model_dir, start_worker):
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(6))
    worker = start_worker(str(tiny_model_dir), redis_url)
    worker.wait_ready()
    submitted = run_cli("submit", str(data), "--work-dir", str(tmp_path / "w"), "--broker", redis_url,
                        "--model", str(tiny_model_dir), "--quantize", "int8", "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    # A run for the worker's own model, submitted after: once it is done, the worker had every chance to take
    # the int8 run's shards, and must not have.
    own = run_cli("submit", str(data), "--work-dir", str(tmp_path / "w"), "--broker", redis_url, "--model", str(tiny_model_dir),
                  "--max-new-tokens", "2", "--json")
    assert own.returncode == 0, own.stderr
    assert wait_for_end(json.loads(own.stdout)["run_id"], redis_url)["state"] == "done"
    status = json.loads(run_cli("status", run_id, "--json", "--broker", redis_url).stdout)
    assert status["state"] == "queued" and status["shards_done"] == 0 and status["queue"].endswith("@int8")
    assert status["queue_depth"] == {"waiting": 1, "backoff": 0}
