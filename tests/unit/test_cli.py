"""The `amserve` command line: every command is listed and reachable; keys are minted hashed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from service.api.auth import load_keys
from service.cli import OPENMP_WAIT


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


PAGE_FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from service.cli import tune_process
    tune_process()

def engine_call():  # several megabyte temporaries alive at once, then all freed, as a batch's are
    return [np.ones(160_000) for _ in range(8)]

for _ in range(3):  # the heap grows to its working size once
    engine_call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    engine_call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def python(code: str, *args: str, env: dict | None = None) -> str:
    """`code`'s standard output, run in a fresh interpreter whose environment has none of the variables
    `tune_process` sets (plus `env`)."""
    env = {**{name: value for name, value in os.environ.items()
              if name not in ("GLIBC_TUNABLES", *OPENMP_WAIT)}, **(env or {})}
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env,
                         check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_amserve_keeps_freed_megabyte_blocks_for_reuse():
    """An engine call's temporaries (megabytes) reuse freed heap rather than page-faulting fresh memory in
    each time; the processes amserve starts are told the same (GLIBC_TUNABLES)."""
    faults = {mode: int(python(PAGE_FAULTS_OF_REPEATED_ALLOCATIONS, mode)) for mode in ("plain", "tuned")}
    assert faults["plain"] > 20 * 1000 and faults["tuned"] < 200, faults
    shown = python("import os\nfrom service.cli import tune_process\n"
                   "tune_process()\nprint(os.environ['GLIBC_TUNABLES'])")
    assert "glibc.malloc.mmap_threshold=67108864" in shown


def test_amserve_lets_openmp_workers_spin_briefly_unless_told_otherwise():
    """A short spin between an engine call's parallel regions, then sleep (see OPENMP_WAIT); torch's
    libgomp reads the variables when it loads, and the processes amserve starts inherit them."""
    show = ("import os\nfrom service.cli import tune_process\ntune_process()\n"
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    assert python(show).split() == ["ACTIVE", "3000"]
    assert python(show, env={"OMP_WAIT_POLICY": "PASSIVE"}).split() == ["PASSIVE", "3000"]
