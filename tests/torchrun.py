"""Launch a two-process gloo job on the CPU with torchrun, for the DDP / FSDP2 / Lightning tests.

One place for what every multi-process test needs: a free port, the loopback interface, the
repository on PYTHONPATH, and one retry when the launcher itself failed to set the group up (the
port picked here can be taken before torchrun binds it; a loaded box can time a rendezvous out).
A failure inside the worker is never retried: it is reported with both ranks' output.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Output that says the launcher, not the code under test, failed.
_SETUP_FAILURES = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousTimeoutError",
                   "RendezvousConnectionError", "Connection reset by peer", "Connection refused")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def load_worker(path: Path, name: str):
    """The worker script as a module, so tests can rebuild its model and batches."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_ranks(source: str, out: Path, name: str, timeout: int = 180):
    """Write ``source`` to ``out/name.py``, run it on two ranks (argument: ``out``), and return it
    loaded as a module. Skips where torch has no gloo."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with gloo")
    worker = out / f"{name}.py"
    worker.write_text(source)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if sys.platform.startswith("linux"):  # containers often resolve the host name to no usable interface
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in range(2):
        cmd = _torchrun() + ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                             f"--master_port={_free_port()}", str(worker), str(out)]
        proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return load_worker(worker, name)
        output = proc.stdout + proc.stderr
        if attempt == 0 and any(sign in output for sign in _SETUP_FAILURES):
            continue
        break
    raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
