"""The `amserve` command line: every command is listed and reachable; keys are minted hashed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from service.api.auth import load_keys


def amserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = amserve("--help")
    assert out.returncode == 0
    for command in ("serve", "export", "triton", "train", "keys"):
        assert command in out.stdout
    assert "energy-transformer" in amserve("train", "--help").stdout
    for command in (["serve"], ["export"], ["triton"], ["train", "energy-transformer"], ["keys", "create"]):
        result = amserve(*command, "--help")
        assert result.returncode == 0 and "usage: amserve" in result.stdout, (command, result.stderr)


def test_keys_create_prints_a_key_and_stores_only_its_hash(tmp_path):
    keys_file = tmp_path / "keys.json"
    out = amserve("keys", "create", "--tenant", "acme", "--file", str(keys_file))
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    stored = json.loads(keys_file.read_text())["keys"]
    assert stored == [{"tenant": "acme", "sha256": hashlib.sha256(key.encode()).hexdigest()}]
    assert key not in keys_file.read_text()
    assert load_keys(keys_file, env="").tenant(f"Bearer {key}") == "acme"
    assert amserve("keys", "create", "--tenant", "Bad Tenant", "--file", str(keys_file)).returncode != 0


def test_a_malformed_store_is_a_clear_start_up_error(tmp_path):
    for args in (["--store", "postgresql://amserve@127.0.0.1:notaport/db"],
                 ["--store", "mysql://127.0.0.1/db"],
                 ["--backend", "triton", "--triton-url", "127.0.0.1:1,127.0.0.1:2"]):  # replicas need a shared store
        out = amserve("serve", "--backend", "embedded", "--data-dir", str(tmp_path), "--model", "none",
                      "--rest-port", "0", "--grpc-port", "0", *args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and ("store" in out.stderr.split("error:")[-1]), out.stderr[-2000:]
