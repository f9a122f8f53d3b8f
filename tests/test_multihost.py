"""Two real processes on 127.0.0.1 (4 simulated CPU devices each, gloo collectives) train like one
process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_processes_match_single_process(tmp_path):
    port = free_port()
    out = tmp_path / "result.json"
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    log_paths = [tmp_path / f"worker{i}.log" for i in range(2)]
    log_files = [open(path, "w") for path in log_paths]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port),
                               str(out), str(tmp_path / "ckpt")],
                              env=env, stdout=log_files[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        # The same recipe in this (single) process over its 8 devices, while the workers run.
        sys.path.insert(0, HERE)
        try:
            import multihost_worker
        finally:
            sys.path.remove(HERE)
        reference, _, _ = multihost_worker.train()
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("multi-process training hung (timeout); a collective never completed")
    finally:
        for p, f in zip(procs, log_files):
            if p.poll() is None:
                p.kill()
            f.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{log_paths[i].read_text()[-4000:]}"
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and result["local_devices"] == 4
    assert result["restored_ok"] is True  # multi-process checkpoint save + restore round trip
    # Each process restored its own iterator position (grain's per-process files), not process 0's.
    assert result["data_positions"] == [3, 103]
    saved = sorted(n for n in os.listdir(tmp_path / "ckpt" / "3" / "data") if n.startswith("process"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]

    np.testing.assert_allclose(result["losses"], reference, rtol=1e-5, atol=1e-5)
    assert result["losses"][0] != result["losses"][-1]
