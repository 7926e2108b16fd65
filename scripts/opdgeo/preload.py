"""Preloaded start-up for local runs: import torch, transformers and TRL once, then run each
`opdgeo` command in a fork of that process.

On a laptop most of the DAG's time is start-up: importing the stack costs 3-8 s per job while
the work itself is often under a second. For a local run, the Snakefile's `onstart` starts
`serve`, which binds a Unix socket, imports the package's heavy modules and waits. The
`opdgeo` command, when OPDGEO_PRELOAD_SOCKET names that socket, hands its arguments, working
directory, environment and standard streams to the server (opdgeo.handover, the command's
side); a forked child runs the command and reports its exit status, which the command exits
with. Output, log, exit status and
written bytes are those of a direct run (tests/test_preload.py compares them).

Without the variable, when the server is gone, or when the command's Python (a per-rule
environment), thread settings (--set-threads) or Hugging Face settings are not the server's,
`opdgeo` runs in process as usual. Cluster jobs never see the variable: the server is started
for local execution on the CPU only (a GPU job gains little from it, and CUDA does not survive
a fork). It never forks while it runs a second thread or has initialised CUDA, and its
workers end with the run that started it (also when that run is killed). A job's benchmark file then
measures the command's own process, not the forked worker: its wall time is right, its CPU
and memory columns are not. The worker's own figures go to the server's log instead, one
`job` line each (`job_usage` reads them back).
"""

import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from opdgeo.handover import ACCEPTED, DECLINED, NUMBER, SOCKET_VARIABLE, read_exactly

# Everything a subcommand imports lazily (see opdgeo.cli), so that no job imports it again;
# and the figures' drawing modules, which opdgeo.figures names but does not import
# (preloaded_modules).
PRELOADED_MODULES = (
    "opdgeo.train", "opdgeo.evaluate", "opdgeo.masks", "opdgeo.delta.analyze",
    "opdgeo.delta.overlap", "opdgeo.collect", "opdgeo.figures", "opdgeo.findings",
    "opdgeo.paper_tables",
)
# What Snakemake sets for a job's `threads` (snakemake.shell), read by the math libraries.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# Read by huggingface_hub, transformers and datasets when they are imported (caches, offline
# mode, verbosity): a job whose values differ from the server's imports them itself.
IMPORT_TIME_PREFIXES = ("HF_", "TRANSFORMERS_")
# A worker's line in the server's log: wall s, CPU s (user + system, its own and its
# children's), peak RSS MB (the forked process's own, pages shared with the server included),
# exit status, the command.
USAGE_LINE = "job\t{wall:.3f}\t{cpu:.3f}\t{rss:.0f}\t{status}\t{command}\n"


# ---------------------------------------------------------------- the server's side


def preloaded_modules() -> tuple[str, ...]:
    from opdgeo.figures import drawing_modules

    return (*PRELOADED_MODULES, *drawing_modules())


def serve(path: str, owner: int, device: str = "cpu"):
    """Listen on `path`, import the heavy modules, then fork one worker per request, until the
    process `owner` (the Snakemake run) is no longer this server's parent; then end the
    workers still running. With `device` auto and a GPU visible, stop after the imports."""
    import importlib

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # before the imports: a command that connects meanwhile waits
    listener.listen(128)
    start = time.perf_counter()
    modules = preloaded_modules()
    for module in modules:
        importlib.import_module(module)
    print(f"preloaded {len(modules)} modules in {time.perf_counter() - start:.1f} s",
          flush=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished workers are reaped by the kernel
    listener.settimeout(1.0)
    try:
        if device != "cpu" and sys.modules["torch"].cuda.is_available():
            print("jobs run on the GPU: the server stops, every job imports on its own",
                  flush=True)
            return
        while os.getppid() == owner:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            if (hazard := fork_hazard()) is not None:
                print(f"{hazard}: not forking, the job runs in its own process", flush=True)
                connection.close()  # the command, answered nothing, runs in process
                continue
            if os.fork() == 0:
                status = 1
                try:  # whatever happens, a worker never returns into the server's loop
                    listener.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the job may wait on its own
                    status = _work(connection)
                finally:
                    os._exit(status)
            connection.close()
    finally:
        listener.close()
        Path(path).unlink(missing_ok=True)
        try:
            Path(path).parent.rmdir()  # start_server's temporary folder, now empty
        except OSError:
            pass
        # The workers are in this server's process group (start_server makes it): a run
        # that was killed leaves no job training on behind it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpgrp(), signal.SIGTERM)


def fork_hazard() -> str | None:
    """Why forking now would give a worker a broken state (a lock held by another thread, a
    CUDA context), or None. The math libraries' own pools are sized by THREAD_VARIABLES."""
    if threading.active_count() > 1:
        return f"{threading.active_count()} Python threads are running in the server"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised in the server"
    return None


def _work(connection) -> int:
    """In a forked worker: take on the command's streams, folder and environment, run it."""
    connection.setblocking(True)
    header, fds, _, _ = socket.recv_fds(connection, NUMBER.size, 3)
    rest = read_exactly(connection, NUMBER.size - len(header))
    payload = None if rest is None else read_exactly(connection, NUMBER.unpack(header + rest)[0])
    if payload is None:  # the command ended while sending: there is nothing to run
        for fd in fds:
            os.close(fd)
        return 0
    request = json.loads(payload)
    if not _can_run(request):
        connection.sendall(NUMBER.pack(DECLINED))
        return 0
    start = time.perf_counter()
    log = os.dup(1)  # the server's log, before the command's streams take its place
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    connection.sendall(NUMBER.pack(ACCEPTED))
    _end_with(connection)
    status = _run(request["argv"][1:])
    _log_usage(log, time.perf_counter() - start, status, request["argv"][1:])
    connection.sendall(NUMBER.pack(status))
    return status


def _log_usage(fd: int, wall: float, status: int, arguments: list[str]):
    """A forked process's times start at zero (fork(2)), so they are the job's own."""
    cpu = sum(getattr(resource.getrusage(who), field)
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    line = USAGE_LINE.format(wall=wall, cpu=cpu, rss=_peak_rss_mb(), status=status,
                             command=shlex.join(arguments))
    os.write(fd, line.encode())  # one write: lines of parallel workers do not interleave
    os.close(fd)


def _peak_rss_mb() -> float:
    """VmHWM: ru_maxrss would carry the server's peak over the fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def job_usage(log: Path) -> list[dict]:
    """The `job` lines of a server's log: wall, cpu (s), rss (MB), status, command."""
    rows = []
    for line in Path(log).read_text().splitlines():
        fields = line.split("\t")
        if fields[0] == "job" and len(fields) == 6:
            rows.append({"wall": float(fields[1]), "cpu": float(fields[2]),
                         "rss": float(fields[3]), "status": int(fields[4]),
                         "command": fields[5]})
    return rows


def _can_run(request: dict) -> bool:
    """Only a command of this Python environment (not a per-rule one) whose thread and import
    settings are the server's: anything else would not compute what it computes on its own."""
    return (request["prefix"] == sys.prefix
            and _import_settings(request["env"]) == _import_settings(os.environ))


def _import_settings(environment) -> dict:
    return {name: value for name, value in environment.items()
            if name in THREAD_VARIABLES or name.startswith(IMPORT_TIME_PREFIXES)}


def _end_with(connection):
    """A worker outlives no command: when the command's process ends (Snakemake cancels the
    job, Ctrl-C), its side of the connection closes and the worker terminates."""
    def watch():
        try:
            connection.recv(1)  # returns, empty, when the command's side closes
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _run(arguments: list[str]) -> int:
    from opdgeo import cli

    try:
        cli.main(arguments)
        status = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            status = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return status


# ---------------------------------------------------------------- starting and stopping


_server: subprocess.Popen | None = None  # the one this process started


def start_server(log: Path, threads: int, device: str = "cpu", wait: float = 10.0):
    """Start a server for the calling process (the Snakemake run) and export its socket to
    the jobs it starts, unless the jobs run on `device` cuda (auto: the server stops when it
    sees a GPU); when it does not come up in `wait` s, say so in `log` and go on without.
    The socket lives in a short temporary path (Unix socket paths are limited to ~100 bytes,
    a workdir may be deeper).

    Math libraries size their thread pools from the environment when they are imported, and
    a thread count changes the last bits of a float sum: the server gets the variables that
    Snakemake gives a job of `threads` threads, so that a forked job computes what it would
    have computed on its own."""
    global _server
    log.parent.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        log.write_text("jobs run on the GPU: no preload server, every job imports on its own\n")
        return
    path = Path(tempfile.mkdtemp(prefix="opdgeo-preload-")) / "socket"
    environment = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    with log.open("w") as handle:
        _server = subprocess.Popen(
            [sys.executable, "-m", "opdgeo.preload", str(path), str(os.getpid()), device],
            env=environment, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ[SOCKET_VARIABLE] = str(path)
    deadline = time.monotonic() + wait
    while not path.exists():
        if _server.poll() is not None or time.monotonic() > deadline:
            stop_server()
            with log.open("a") as handle:
                print("the preload server did not start: every job imports on its own",
                      file=handle)
            return
        time.sleep(0.05)


def stop_server():
    """Stop the server and any worker still running (its session); remove its socket."""
    global _server
    path = os.environ.pop(SOCKET_VARIABLE, None)
    if _server is not None:
        try:
            os.killpg(_server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _server.wait()
        _server = None
    if path:
        shutil.rmtree(Path(path).parent, ignore_errors=True)

if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
