"""Object storage end to end against a real S3 API (moto's server on 127.0.0.1): input, work directory and
output on S3, real workers (one SIGKILLed mid-shard), the real CLI; and each storage failure as one line."""

from __future__ import annotations

import json
import signal
import uuid

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, S3Server, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_cli_errors import assert_one_clear_line
from tests.test_distributed import make_rows, wait_for_end


def bucket(fs, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name


def no_local_folder_named_like_a_url():
    return not any(p.name.startswith(("s3:", "gs:")) for p in REPO.iterdir())


def test_the_distributed_path_through_s3_survives_a_killed_worker(tmp_path, s3, redis_url, tiny_model_dir, start_worker, monkeypatch):
    monkeypatch.setenv("SHARDGEN_LEASE_SECONDS", "4")
    fs = s3.filesystem()
    inputs, work, results = bucket(fs, "in"), bucket(fs, "work"), bucket(fs, "out")
    fs.put(str(write_jsonl(tmp_path / "q.jsonl", make_rows(96))), f"{inputs}/q.jsonl")
    model = str(tiny_model_dir)
    submitted = run_cli("submit", f"s3://{inputs}/q.jsonl", "--work-dir", f"s3://{work}/runs", "--broker", redis_url,
                        "--model", model, "--shard-size", "8", "--max-new-tokens", "24", "--id-column", "uid", "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    assert fs.exists(f"{work}/runs/{run_id}/run.json") and fs.ls(f"{work}/runs/{run_id}/input")

    victim = start_worker(model, redis_url)
    start_worker(model, redis_url)
    wait_until(lambda: any(w["pid"] == victim.process.pid and w["shard_index"] is not None
                           for w in run_status_now(run_id, redis_url)["workers"]), timeout=120, what="the victim mid-shard")
    victim.kill(signal.SIGKILL)
    start_worker(model, redis_url)
    status = wait_for_end(run_id, redis_url, timeout=300)
    assert status["state"] == "done" and status["rows_done"] == 96 and status["reassigned"] >= 1

    collected = run_cli("collect", run_id, "-o", f"s3://{results}/answers.parquet", "--broker", redis_url)
    assert collected.returncode == 0, collected.stderr
    with fs.open(f"{results}/answers.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert [r["row_index"] for r in rows] == list(range(96))
    assert [r["id"] for r in rows] == [f"id-{i:04d}" for i in range(96)]
    assert all(r["error"] is None and r["generated_tokens"] > 0 for r in rows)
    parts = [p for p in fs.ls(f"{work}/runs/{run_id}") if p.rsplit("/", 1)[-1].startswith("part-")]
    assert len(parts) == 12
    offline = run_cli("collect", run_id, "-o", str(tmp_path / "offline.jsonl"), "--work-dir", f"s3://{work}/runs")
    assert offline.returncode == 0, offline.stderr  # run.json and the parts are enough, without Redis
    assert len((tmp_path / "offline.jsonl").read_text().splitlines()) == 96
    assert no_local_folder_named_like_a_url()


def test_embedded_run_writes_its_output_to_s3_and_nothing_locally(tmp_path, s3, tiny_model_dir):
    fs = s3.filesystem()
    results = bucket(fs, "out")
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(10))
    result = run_cli("run", str(data), "-o", f"s3://{results}/answers.jsonl", "--model", str(tiny_model_dir),
                     "--shard-size", "4", "--max-new-tokens", "3", "--show", "2")
    assert result.returncode == 0, result.stderr
    lines = fs.cat(f"{results}/answers.jsonl").decode().splitlines()
    assert [json.loads(line)["row_index"] for line in lines] == list(range(10))
    assert fs.ls(results) == [f"{results}/answers.jsonl"]  # the parts are gone once the output is whole
    assert no_local_folder_named_like_a_url()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


def test_storage_options_reach_fsspec_and_are_never_shown_or_stored(tmp_path, s3, redis_url, tiny_model_dir, monkeypatch):
    fs = s3.filesystem()
    work = bucket(fs, "work")
    secret = "Sup3r-S3cret-Key"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = json.dumps({"key": "testing", "secret": secret})
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(4))
    submitted = run_cli("submit", str(data), "--work-dir", f"s3://{work}/runs", "--broker", redis_url, "--model",
                        str(tiny_model_dir), "--storage-options", options, "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    import redis

    stored = [redis.Redis.from_url(redis_url).hgetall(f"sg:run:{run_id}"), fs.cat(f"{work}/runs/{run_id}/run.json"),
              submitted.stdout, submitted.stderr]
    assert all(secret not in str(item) for item in stored)
    assert json.loads(fs.cat(f"{work}/runs/{run_id}/run.json"))["spec"]["input"] == str(data)


@pytest.mark.parametrize("case", ["wrong bucket", "missing credentials", "local read-only"])
def test_storage_failures_are_one_line_and_leave_nothing(tmp_path, s3, tiny_model_dir, monkeypatch, case):
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(2))
    output, fragment = {
        "wrong bucket": ("s3://no-such-bucket-here/answers.jsonl", "its bucket does not exist"),
        "missing credentials": (f"s3://{bucket(s3.filesystem(), 'out')}/answers.jsonl", "no credentials to write to s3://"),
        "local read-only": ("/proc/answers.jsonl", "cannot write to /proc"),
    }[case]
    if case == "missing credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    result = run_cli("run", str(data), "-o", output, "--model", str(tiny_model_dir), "--max-new-tokens", "2")
    assert_one_clear_line(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]
    assert no_local_folder_named_like_a_url()


def test_submit_to_a_missing_bucket_is_one_line(tmp_path, s3, redis_url, tiny_model_dir):
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(2))
    result = run_cli("submit", str(data), "--work-dir", "s3://no-such-bucket-here/runs", "--broker", redis_url,
                     "--model", str(tiny_model_dir))
    assert_one_clear_line(result, "s3://no-such-bucket-here/runs", "bucket does not exist")
    import redis

    assert redis.Redis.from_url(redis_url).zcard("sg:runs") == 0  # nothing recorded


def test_a_denied_write_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """A user whose credentials may read but not write the bucket (moto enforcing IAM policies)."""
    import boto3
    import requests

    server = S3Server(tmp_path)
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket="sealed")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        assert requests.post(f"{server.endpoint}/moto-api/reset-auth", data=b"0", timeout=5).ok  # enforce from now on
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        data = write_jsonl(tmp_path / "q.jsonl", make_rows(2))
        result = run_cli("run", str(data), "-o", "s3://sealed/answers.jsonl", "--model", str(tiny_model_dir))
        assert_one_clear_line(result, "permission denied to write to s3://sealed")
        assert key["SecretAccessKey"] not in result.stderr + result.stdout
    finally:
        server.stop()
