"""Passwords and TLS against a real redis-server; credentials never shown; trust_remote_code off by default."""

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest
import redis

from tests.conftest import RedisServer, run_cli, write_jsonl
from tests.test_distributed import make_rows, wait_for_end

PASSWORD = "s3cret-Pa55"


def run_small_job(tmp_path, url, tiny_model_dir, start_worker):
    model = str(tiny_model_dir)
    worker = start_worker(model, url)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(8))
    submitted = run_cli("submit", str(data), "--work-dir", str(tmp_path / "work"), "--broker", url, "--model", model,
                        "--shard-size", "4", "--max-new-tokens", "4", "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    status = wait_for_end(run_id, url)
    assert status["state"] == "done" and status["rows_done"] == 8
    collected = run_cli("collect", run_id, "-o", str(tmp_path / "out.parquet"), "--broker", url)
    assert collected.returncode == 0, collected.stderr
    shown = [submitted.stdout, submitted.stderr, json.dumps(status), run_cli("status", run_id, "--broker", url).stdout,
             collected.stdout, collected.stderr, worker.log_path.read_text(errors="replace")]
    metadata = [str(pq.read_schema(p).metadata) for p in (tmp_path / "work" / run_id).glob("*.parquet")]
    return shown + metadata + [str(pq.read_schema(tmp_path / "out.parquet").metadata)]


def test_password_protected_redis_works_and_the_password_is_never_shown(tmp_path, tiny_model_dir, start_worker):
    server = RedisServer(tmp_path / "redis", "--requirepass", PASSWORD).start()
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        for text in run_small_job(tmp_path, url, tiny_model_dir, start_worker):
            assert PASSWORD not in text
        admin = redis.Redis.from_url(url)
        connections_before = admin.info("stats")["total_connections_received"]
        wrong = run_cli("status", "--broker", f"redis://:wrong-one@127.0.0.1:{server.port}/0")
        assert wrong.returncode != 0 and "refused the password" in wrong.stderr and "wrong-one" not in wrong.stderr
        missing = run_cli("status", "--broker", server.url)
        assert missing.returncode != 0 and "needs a password" in missing.stderr and "Traceback" not in missing.stderr
        # a refused password is answered at once, not retried like a lost connection (redis-py would, for 30 s)
        assert admin.info("stats")["total_connections_received"] - connections_before <= 2
    finally:
        start_worker.stop_all()
        server.stop()


@pytest.fixture()
def certificates(tmp_path):
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=shardgen-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt",
            "-days", "2", "-extfile", "san.ext")
    return tmp_path


def test_tls_redis_with_a_private_ca(tmp_path, certificates, tiny_model_dir, start_worker):
    tls = ["--tls-cert-file", str(certificates / "server.crt"), "--tls-key-file", str(certificates / "server.key"),
           "--tls-ca-cert-file", str(certificates / "ca.crt"), "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    server = RedisServer(tmp_path / "redis", *tls, tls=True).start()
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={certificates / 'ca.crt'}"
        for text in run_small_job(tmp_path, url, tiny_model_dir, start_worker):
            assert PASSWORD not in text
        untrusted = run_cli("status", "--broker", f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0")
        assert untrusted.returncode != 0 and "cannot reach Redis" in untrusted.stderr and PASSWORD not in untrusted.stderr
    finally:
        start_worker.stop_all()
        server.stop()


def test_trust_remote_code_is_off_unless_asked(tiny_model_dir, monkeypatch):
    """What from_pretrained receives for the tokenizer and the model, from the real CLI options down."""
    import transformers

    from shardgen.producer.config import build_model_spec
    from shardgen.workers import load_model

    received = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, **kwargs):
            received.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    load_model(build_model_spec({"model": str(tiny_model_dir)}), "cpu")
    assert received == [("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    received.clear()
    load_model(build_model_spec({"model": str(tiny_model_dir), "trust_remote_code": True}), "cpu")
    assert received == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_files_written_through_a_temporary_file_follow_the_umask(tmp_path, umask, mode):
    """A work directory shared with workers of another user (a group) must be able to read what was written."""
    from shardgen.workers.storage import files

    previous = os.umask(umask)
    try:
        files.write_bytes(str(tmp_path / "part.parquet"), b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "part.parquet").stat().st_mode & 0o777 == mode
