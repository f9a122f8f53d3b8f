"""The real command line across processes: `bart-jax data text|pairs`, then `bart-jax pretrain` and `bart-jax
finetune` as two local processes (gloo CPU collectives, 4 simulated devices each) from tokenizer to finished
model directory, compared with the same run as one process over 8 devices; preemption of one process; a
process killed outright, and one that never joins (the others end in one line); and the one-line errors of a job
that cannot form.

Tolerance: the two layouts run the same programs on the same global batches (`data.shards=2` fixes how the data
is split, whatever the number of processes), but their all-reduces add the devices' partial sums in another order,
so fp32 parameters may differ in the last bits (1.2e-7 observed after 12 + 6 steps); 1e-5 absolute leaves room
for that rounding to grow over the steps, while a different batch or a skipped step moves them by > 1e-3.
"""

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from toy_batches import SMALL_MODEL_OVERRIDES
from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 600
PRETRAIN_STEPS, FINETUNE_STEPS = 12, 6
JOB_LOST_EXIT = 75  # EX_TEMPFAIL: not a user error (2), and restarting the job resumes it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}


def _bart_jax(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "bart_jax", *args], env=_env(1), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[0])["path"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text corpus and document/summary pairs, prepared with `bart-jax data text|pairs`."""
    root = tmp_path_factory.mktemp("multihost_data")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + "."

    def lines(name, n, sentences):
        (root / name).write_text("".join(" ".join(sentence() for _ in range(rng.randint(*sentences))) + "\n"
                                         for _ in range(n)))

    lines("train.txt", 120, (1, 4))
    lines("validation.txt", 20, (1, 4))
    for name, n in (("pairs_train.jsonl", 64), ("pairs_validation.jsonl", 16)):
        with open(root / name, "w") as f:
            for _ in range(n):
                document = " ".join(sentence() for _ in range(rng.randint(1, 8)))  # lengths over several buckets
                f.write(json.dumps({"document": document, "summary": document.split(".")[0] + "."}) + "\n")
    text = _bart_jax("data", "text", "--data-dir", str(root / "text"), "--train", str(root / "train.txt"),
                     "--validation", str(root / "validation.txt"))
    pairs = _bart_jax("data", "pairs", "--data-dir", str(root / "pairs"), "--train", str(root / "pairs_train.jsonl"),
                      "--validation", str(root / "pairs_validation.jsonl"))
    return text, pairs


def _args(stage, workdir, data, *extra):
    text, pairs = data
    return [stage, "--config", "tiny", f"workdir={workdir}", f"data.pretrain_source={text}",
            f"data.finetune_source={pairs}", "data.tokenizer_vocab_size=320", "data.shards=2",
            *SMALL_MODEL_OVERRIDES, "model.vocab_size=320",
            f"pretrain.train.steps={PRETRAIN_STEPS}", "pretrain.train.batch_size=8", "pretrain.train.source_length=32",
            f"pretrain.train.eval_every={PRETRAIN_STEPS}", "pretrain.train.checkpoint_every=100",
            "pretrain.schedule.warmup_steps=1",
            f"finetune.train.steps={FINETUNE_STEPS}", "finetune.train.batch_size=8",
            "finetune.train.source_length=128", "finetune.train.target_length=16",
            f"finetune.train.eval_every={FINETUNE_STEPS}", "finetune.train.eval_rouge_examples=4",
            "finetune.train.checkpoint_every=100", "finetune.schedule.warmup_steps=1",
            *(f"{s}.train.{k}" for s in ("pretrain", "finetune")
              for k in ("progress_bar=false", "log_every=1", "eval_batches=1", "peak_flops_per_device=1e9")),
            *extra]


class Job:
    """Processes of one command; `wait()` -> their (exit code, stdout, stderr)."""

    def __init__(self, argvs, env, logs):
        self.logs = logs
        self.files = [(open(f"{log}.out", "w"), open(f"{log}.err", "w")) for log in logs]
        self.procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err)
                      for argv, (out, err) in zip(argvs, self.files)]

    def output(self, i) -> tuple[str, str]:
        return open(f"{self.logs[i]}.out").read(), open(f"{self.logs[i]}.err").read()

    def wait(self, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"a process hung: {[self.output(i)[1][-2000:] for i in range(len(self.procs))]}")
        finally:
            for p, (out, err) in zip(self.procs, self.files):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                out.close()
                err.close()
        return [(p.returncode, *self.output(i)) for i, p in enumerate(self.procs)]


def _launch(args, tmp_path, name, processes=2, port=None, recorded=False):
    port = port or free_port()
    argvs = []
    for i in range(processes):
        head = [sys.executable, os.path.join(HERE, "multihost_cli.py"), str(tmp_path / f"{name}.reads{i}.json")] \
            if recorded else [sys.executable, "-m", "bart_jax"]
        dist = [] if processes == 1 else [
            "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            f"distributed.num_processes={processes}", f"distributed.process_id={i}",
            "distributed.initialization_timeout_s=120"]
        argvs.append(head + args + dist)
    return Job(argvs, _env(8 // processes), [tmp_path / f"{name}.{i}" for i in range(processes)])


def _run(args, tmp_path, name, processes=2, **kw):
    results = _launch(args, tmp_path, name, processes, **kw).wait()
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"{name} process {i}: exit {code}\n{err[-3000:]}"
    return results


def _params(model_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(model_dir, "params.safetensors"))


def _assert_params_close(a_dir, b_dir):
    a, b = _params(a_dir), _params(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


def _wait_for_step(job, step, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not re.search(rf"pretrain step {step}:", job.output(0)[0]):
        if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
            pytest.fail(f"training did not reach step {step}: {job.output(0)[1][-3000:]}")
        time.sleep(0.2)


@pytest.mark.integration
def test_cli_across_two_processes_matches_one_process_and_resumes_after_sigterm_to_one(tmp_path, data):
    one, two = tmp_path / "one", tmp_path / "two"
    # The reference: one process over 8 devices.
    _run(_args("pretrain", one, data), tmp_path, "one_pretrain", processes=1)
    _run(_args("finetune", one, data), tmp_path, "one_finetune", processes=1)

    # Two processes; SIGTERM to process 1 only, once training runs.
    job = _launch(_args("pretrain", two, data), tmp_path, "two_pretrain", recorded=True)
    _wait_for_step(job, 2)
    job.procs[1].send_signal(signal.SIGTERM)
    stopped = job.wait()
    lines = [err.strip().splitlines()[-1] for _, _, err in stopped]
    assert [code for code, _, _ in stopped] == [143, 143], lines
    steps = {re.fullmatch(r"bart-jax pretrain: interrupted at step (\d+) \(pretrain\); checkpoint saved in (\S+); "
                          r"run the same command to resume", line).group(1) for line in lines}
    assert len(steps) == 1, lines  # both processes stopped at the same step
    step = int(steps.pop())
    assert 2 <= step < PRETRAIN_STEPS
    assert sorted(os.listdir(two / "pretrain" / "checkpoints")) == [str(step)]  # one checkpoint, of that step
    resumed = _run(_args("pretrain", two, data), tmp_path, "two_pretrain_resumed", recorded=True)
    assert f"pretrain: resumed from step {step}" in resumed[0][1]
    finetuned = _run(_args("finetune", two, data), tmp_path, "two_finetune", recorded=True)

    # Tokenizer: trained once (by process 0) into the shared workdir, the same as the one-process run's.
    from bart_jax.data import load_tokenizer

    tok_one, tok_two = load_tokenizer(str(one / "tokenizer")), load_tokenizer(str(two / "tokenizer"))
    assert [tok_one.id_to_token(i) for i in range(tok_one.vocab_size)] == \
        [tok_two.id_to_token(i) for i in range(tok_two.vocab_size)]
    # The finished model directories: the same parameters as the one-process run's.
    _assert_params_close(one / "pretrain" / "model", two / "pretrain" / "model")
    _assert_params_close(one / "finetune" / "model", two / "finetune" / "model")
    # Validation ROUGE ran across processes.
    report = json.loads(finetuned[0][1].strip().splitlines()[-1])
    assert {"eval_rouge1", "eval_rougeL"} <= set(report["eval"]) and report["model_dir"]

    # Each process read only its shard of every split (with data.shards=2: example ids of its parity), so the
    # shares are disjoint, and the two shards together are the whole split.
    reads = [{}, {}]
    for name in ("two_pretrain", "two_pretrain_resumed", "two_finetune"):
        for i in range(2):
            for key, ids in json.load(open(tmp_path / f"{name}.reads{i}.json")).items():
                reads[i].setdefault(key, set()).update(ids)
    assert all(k.endswith("/2") for r in reads for k in r)  # every reader (the logits-bias prior's too) shards
    sharded = list(reads[0])
    assert sorted(int(k.split("/")[0]) for k in sharded) == [16, 20, 64, 120]  # every split was read
    for key in sharded:
        assert reads[0][key] and reads[1][key] and not reads[0][key] & reads[1][key], key
        assert all(i % 2 == 0 for i in reads[0][key]) and all(i % 2 == 1 for i in reads[1][key]), key


def _assert_one_clean_line(err, pattern):
    """`err` ends in one line matching `pattern`, with no traceback or C++ fatal message (JAX's) before it."""
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(pattern, line), err[-3000:]
    assert "Traceback" not in err and "stack trace" not in err and not re.search(r"^F\d{4} ", err, re.M), err[-3000:]
    return line


@pytest.mark.integration
def test_a_killed_process_ends_the_others_at_once_in_one_line(tmp_path, data):
    # JAX's heartbeat would end the survivor only after 60 s, and with its own fatal message.
    job = _launch(_args("pretrain", tmp_path / "run", data, "distributed.heartbeat_timeout_s=60",
                        "pretrain.train.checkpoint_every=2"), tmp_path, "killed")
    _wait_for_step(job, 3)
    killed_at = time.monotonic()
    job.procs[1].kill()
    (code, _, err), (killed, _, _) = job.wait(timeout=120)
    elapsed = time.monotonic() - killed_at
    assert killed == -signal.SIGKILL
    assert code == JOB_LOST_EXIT and elapsed < 30, (code, elapsed, err[-3000:])
    line = _assert_one_clean_line(err, (
        r"bart-jax pretrain: error: process 1 of this 2-process job stopped \(killed or crashed: its connection "
        r"closed\), and the others cannot go on without it; restart the job: the same command on every process "
        r"resumes from the last checkpoint \((step \d+ in \S+|none saved yet: the stage starts over)\)"))
    named = re.search(r"\(step (\d+) in (\S+)\)$", line)
    if named:  # the step a restart resumes from
        assert named.group(2) == str(tmp_path / "run" / "pretrain" / "checkpoints")
        assert os.path.isdir(os.path.join(named.group(2), named.group(1)))


@pytest.mark.integration
def test_a_process_that_never_joins_ends_the_job_in_one_line(tmp_path, data):
    started = time.monotonic()
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "bart_jax", *_args("pretrain", tmp_path / "run", data),
                          "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
                          "distributed.num_processes=2", "distributed.process_id=0",
                          "distributed.initialization_timeout_s=3"],
                         cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
    assert out.returncode == JOB_LOST_EXIT, out.stderr[-3000:]
    _assert_one_clean_line(out.stderr, (
        rf"bart-jax pretrain: error: not every process joined the job at the coordinator 127\.0\.0\.1:{port} within "
        r"distributed\.initialization_timeout_s=3 s; start the same command on every process "
        r"\(distributed\.process_id=0 to 1\), or raise distributed\.initialization_timeout_s"))
    assert time.monotonic() - started < 90


@pytest.fixture
def watch(monkeypatch):
    """The watch's protocol in this process: ending the job records the JobLost (and, as the real end never
    returns, stops that thread)."""
    from bart_jax.train import distributed

    ended = queue.Queue()
    monkeypatch.setattr(distributed, "_end_job", lambda e: (ended.put(e), threading.Event().wait()))
    monkeypatch.setattr(distributed, "_peers", [])
    monkeypatch.setattr(distributed, "_RELAY_S", 1.0)
    return distributed, ended


def test_process_0_tells_the_others_which_process_was_lost(watch):
    distributed, ended = watch
    listener = distributed._listening_socket()
    threading.Thread(target=distributed._serve, args=(listener, 1234), daemon=True).start()

    def peer(i, token=1234):
        sock = socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=10)
        sock.sendall(f"{token} {i}\n".encode())
        return sock

    for stranger in (peer(4, token=999), socket.create_connection(("127.0.0.1", listener.getsockname()[1]))):
        stranger.sendall(b"5\n")  # without this job's token, a connection closing is no loss
        stranger.close()
    time.sleep(0.2)
    assert ended.empty()
    finished, lost, other = peer(3), peer(1), peer(2)
    finished.sendall(b"bye\n")  # an orderly exit says so before its connection closes
    finished.close()
    time.sleep(0.2)
    lost.close()  # as a killed process's connection closes (by the kernel)
    assert other.recv(64) == b"lost 1\n"
    other.close()  # (what the others do on that word; process 0 waits for it, then ends)
    assert re.match(r"process 1 of this \d+-process job stopped", str(ended.get(timeout=10)))
    time.sleep(0.2)
    assert ended.empty()  # process 3, which said bye, was no loss


def test_the_others_end_on_process_0_word_or_when_it_is_lost(watch):
    distributed, ended = watch
    for told, lost in ((b"lost 2\n", 2), (b"", 0), (b"bye\n", None)):
        mine, process_0 = socket.socketpair()
        listening = threading.Thread(target=distributed._listen, args=(mine,), daemon=True)
        listening.start()
        process_0.sendall(told)
        process_0.close()
        if lost is None:  # process 0 ended in order: no loss, and the watch stops
            listening.join(timeout=10)
            assert not listening.is_alive() and ended.empty()
        else:
            who = "process 0 (the coordinator)" if lost == 0 else f"process {lost}"
            assert str(ended.get(timeout=10)).startswith(f"{who} of this ")


@pytest.mark.integration
def test_a_job_that_cannot_form_fails_in_one_line(tmp_path, data):
    def last_lines(results):
        return [(code, err.strip().splitlines()[-1]) for code, _, err in results]

    # No coordinator at the address: a one-line error within the timeout (JAX itself would abort).
    started = time.monotonic()
    args = _args("pretrain", tmp_path / "a", data)
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "bart_jax", *args, "distributed.enabled=true",
                          f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                          "distributed.process_id=1", "distributed.initialization_timeout_s=3"],
                         cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.fullmatch(rf"bart-jax pretrain: error: cannot reach the coordinator at 127\.0\.0\.1:{port} "
                        r"\(distributed\.coordinator_address\) within distributed\.initialization_timeout_s=3 s "
                        r"\(.*\); start process 0 there, or correct the address", out.stderr.strip().splitlines()[-1])
    assert time.monotonic() - started < 90

    # num_processes differs between the processes: every process says so.
    port = free_port()
    job = Job([[sys.executable, "-m", "bart_jax", *_args("pretrain", tmp_path / "b", data), "distributed.enabled=true",
                f"distributed.coordinator_address=127.0.0.1:{port}", f"distributed.num_processes={n}",
                f"distributed.process_id={i}"] for i, n in ((0, 2), (1, 3))],
              _env(4), [tmp_path / f"b.{i}" for i in range(2)])
    for code, line in last_lines(job.wait()):
        assert code == 2 and line == (
            f"bart-jax pretrain: error: distributed.num_processes differs from the job the coordinator at "
            f"127.0.0.1:{port} formed (2 processes; each process's setting: [2, 3]); give every process the same "
            "num_processes"), line

    # A mesh the job's 8 devices cannot form.
    for code, line in last_lines(_launch(_args("pretrain", tmp_path / "c", data, "mesh.data=3"), tmp_path, "c").wait()):
        assert code == 2 and re.fullmatch(r"bart-jax pretrain: error: mesh .* needs 3 devices but .*8.*", line), line

    # The main job refuses to run across processes, before any work.
    out = subprocess.run([sys.executable, "-m", "bart_jax", "run", "--workdir", str(tmp_path / "d"),
                          "distributed.enabled=true"], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "bart-jax run: error: the main job runs in one process (distributed.enabled=true given)"), out.stderr
    assert not os.path.exists(tmp_path / "d")
