"""The preload server: a job run in a fork of it writes what the same job writes on its own,
keeps its exit status and streams, and no worker outlives its command or server its run."""

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from events import wait_for
from test_train import TASK, spec

from opdgeo import handover, preload

THREADS = "1"


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    log = tmp_path_factory.mktemp("preload") / "preload.log"
    preload.start_server(log, int(THREADS))
    yield log
    preload.stop_server()


@pytest.fixture(scope="module")
def server(server_log):
    return preload._server


@pytest.fixture
def job_environment(monkeypatch):
    """The thread variables Snakemake gives a job of the server's thread count."""
    for name in preload.THREAD_VARIABLES:
        monkeypatch.setenv(name, THREADS)


def direct(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`opdgeo argv` in its own process, as a job without the server runs it."""
    environment = {k: v for k, v in os.environ.items() if k != handover.SOCKET_VARIABLE}
    return subprocess.run([sys.executable, "-m", "opdgeo.cli", *argv], cwd=cwd,
                          env=environment, capture_output=True, text=True)


def files(out: Path) -> dict[str, bytes]:
    """The bytes of a job's output: a file, or every file in a folder."""
    if out.is_file():
        return {out.name: out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def comparable(written: dict[str, bytes]) -> dict[str, bytes]:
    """Without the timings (training log, analysis seconds): the one thing a rerun changes."""
    written = {name: data for name, data in written.items() if name != "train_log.csv"}
    if "summary.json" in written:
        summary = json.loads(written["summary.json"])
        summary.pop("seconds")
        written["summary.json"] = json.dumps(summary).encode()
    return written


@pytest.mark.train  # a train-run job, in the server and on its own
def test_jobs_run_in_the_server_write_the_bytes_of_direct_runs(server, job_environment,
                                                               tiny_pair, tmp_path):
    student, teacher = tiny_pair
    run = dataclasses.asdict(spec("opd", lr=1e-2, steps=3))
    run.pop("task", None)
    task = json.dumps({**TASK, "kind": "addition"})
    trained = tmp_path / "forked" / "train" / "final"  # the train job's (compared below)
    jobs = {
        "train": ["train-run", "--run-spec", json.dumps(run), "--source", str(student),
                  "--teacher", str(teacher), "--task", task, "--device", "cpu", "--out"],
        "evaluate": ["evaluate", "--run", "r", "--checkpoint", str(teacher), "--task", task,
                     "--evaluation", json.dumps({"k": 2, "temperature": 1.0, "batch_size": 8}),
                     "--device", "cpu", "--out"],
        "analyze": ["analyze", "--source", str(student), "--trained", str(trained),
                    "--device", "cpu", "--out"],
        "mask": ["make-mask", "--source", str(student), "--trained", str(trained),
                 "--mask-spec", json.dumps({"method": "random_like", "atol": 1e-5, "seed": 0}),
                 "--densities", str(tmp_path / "densities.csv"), "--out"],
    }
    for name, argv in jobs.items():
        forked, alone = tmp_path / "forked" / name, tmp_path / "alone" / name
        assert handover.run_in_server(["opdgeo", *argv, str(forked)]) == 0, name
        assert direct([*argv, str(alone)], tmp_path).returncode == 0, name
        written, expected = comparable(files(forked)), comparable(files(alone))
        assert written.keys() == expected.keys() and written, name
        for file in written:
            assert written[file] == expected[file], f"{name}: {file} differs"


def test_exit_status_and_error_reach_the_command(server, job_environment, tmp_path, capfd):
    status = handover.run_in_server(["opdgeo", "analyze", "--source", str(tmp_path / "none"),
                                    "--trained", str(tmp_path / "none"), "--out", "x"])
    assert status == 1
    assert "opdgeo analyze: error" in capfd.readouterr().err


def test_each_job_logs_its_own_cpu_time_and_memory(server, server_log, job_environment,
                                                   tmp_path):
    command = ["analyze", "--source", str(tmp_path / "none"), "--trained",
               str(tmp_path / "none"), "--out", "x"]
    started = time.perf_counter()
    assert handover.run_in_server(["opdgeo", *command]) == 1
    elapsed = time.perf_counter() - started
    rows = [row for row in preload.job_usage(server_log)
            if row["command"] == shlex.join(command)]
    assert len(rows) == 1 and rows[0]["status"] == 1
    # the worker's own: not the seconds the server spent importing before it forked
    assert 0 < rows[0]["cpu"] <= elapsed * int(THREADS) + 0.1
    assert 0 < rows[0]["wall"] <= elapsed and rows[0]["rss"] > 0


def test_other_thread_settings_run_in_process(server, job_environment, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert handover.run_in_server(["opdgeo", "runs", "--help"]) is None


def test_without_a_server_the_command_runs_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv(handover.SOCKET_VARIABLE, str(tmp_path / "gone"))
    assert handover.run_in_server(["opdgeo", "runs", "--help"]) is None


def test_a_killed_command_takes_its_worker_along(server, job_environment, tmp_path):
    fifo = tmp_path / "never-written.csv"
    os.mkfifo(fifo)  # reading it blocks: the job waits until it is killed
    command = subprocess.Popen(
        [sys.executable, "-c", "import sys; from opdgeo.cli import command; command()",
         "collect", "csv", str(fifo), "--out", str(tmp_path / "out.csv")])
    workers = psutil.Process(server.pid).children
    wait_for(lambda: len(workers()) == 1)
    command.send_signal(signal.SIGTERM)
    command.wait()
    wait_for(lambda: not workers(), seconds=10)


def test_the_server_ends_with_the_run_that_started_it(tmp_path):
    # a run that starts a server and dies without stopping it (killed, no onerror hook)
    socket_path = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; from pathlib import Path; from opdgeo import handover, preload;"
         f"preload.start_server(Path({str(tmp_path / 'log')!r}), 1);"
         "print(os.environ[handover.SOCKET_VARIABLE]); sys.stdout.flush(); os._exit(0)"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert Path(socket_path).exists()
    wait_for(lambda: not Path(socket_path).parent.exists())


def test_a_command_that_dies_mid_send_leaves_no_worker(server, job_environment):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(os.environ[handover.SOCKET_VARIABLE])
        socket.send_fds(connection, [handover.NUMBER.pack(1000)], [0, 1, 2])
        connection.sendall(b'{"argv": ')  # and no more: the command died
    # The server takes requests in order: once the next command ran, the first was forked.
    assert handover.run_in_server(["opdgeo", "runs", "--help"]) == 0
    wait_for(lambda: not psutil.Process(server.pid).children(), seconds=10)


def test_other_hugging_face_settings_run_in_process(server, job_environment, monkeypatch,
                                                    tmp_path):
    # read when transformers is imported: the server's import would not see this cache
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert handover.run_in_server(["opdgeo", "runs", "--help"]) is None


def test_the_server_preloads_what_every_figure_job_draws_with():
    """opdgeo.figures names its drawing functions without importing them (the workflow reads
    it at every start), so the server imports their modules by name."""
    from opdgeo.figures import FIGURES

    modules = preload.preloaded_modules()
    assert {reference.split(":")[0] for reference, _ in FIGURES.values()} <= set(modules)
    assert {"opdgeo.figures", "opdgeo.paper_tables", "opdgeo.findings"} <= set(modules)


def test_no_server_for_jobs_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv(handover.SOCKET_VARIABLE, raising=False)
    before = preload._server
    preload.start_server(tmp_path / "preload.log", 1, device="cuda")
    assert preload._server is before and handover.SOCKET_VARIABLE not in os.environ
    assert "GPU" in (tmp_path / "preload.log").read_text()


def test_the_server_does_not_fork_beside_a_thread_or_cuda(monkeypatch):
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert "Python threads" in preload.fork_hazard()
    finally:
        release.set()
        thread.join()
    monkeypatch.setattr(threading, "active_count", lambda: 1)  # whatever else pytest runs
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "CUDA" in preload.fork_hazard()


# A Snakemake run in small: it starts the server and one job through it, the job blocking on
# a FIFO nobody writes, and prints the job's pid once the server has forked its worker.
RUN_WITH_A_JOB = """
import os, subprocess, sys, threading
from pathlib import Path
from opdgeo import preload

fifo, log = sys.argv[1], Path(sys.argv[2])
preload.start_server(log, 1)
job = subprocess.Popen(
    [sys.executable, "-c", "from opdgeo.cli import command; command()", "collect", "csv", fifo,
     "--out", fifo + ".csv"],
    env=dict(os.environ, **{name: "1" for name in preload.THREAD_VARIABLES}))
print(preload._server.pid, job.pid, flush=True)
threading.Event().wait()
"""


def test_killing_the_run_ends_the_workers_it_started(tmp_path):
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    run = subprocess.Popen([sys.executable, "-c", RUN_WITH_A_JOB, str(fifo), str(tmp_path / "log")],
                           stdout=subprocess.PIPE, text=True)
    server_pid, job_pid = map(int, run.stdout.readline().split())
    server, job = psutil.Process(server_pid), psutil.Process(job_pid)
    wait_for(lambda: len(server.children()) == 1)  # the job runs in a worker
    worker = server.children()[0]
    run.send_signal(signal.SIGKILL)  # as `kill -9` on Snakemake: no onerror hook runs
    run.wait()
    for process in (server, worker, job):
        wait_for(lambda p=process: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE,
                 seconds=30)
