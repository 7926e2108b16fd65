"""An `opdgeo` command's start in a local Snakemake run: handed over to the run's preload
server (opdgeo.preload), which runs it in a fork of a process that has imported torch,
transformers and TRL, or run in its own process, which ends with the run.

The command's side of the server's socket is here with the few numbers both sides exchange:
the command sends its arguments, working directory, environment and standard streams; the
server answers ACCEPTED (a forked worker runs it) or DECLINED (run it yourself), then the
worker's exit status. Without OPDGEO_PRELOAD_SOCKET, or when the server is gone, the command
runs in process. This module imports nothing of the package: the console entry point
(opdgeo.cli.command) reads it before it knows which command runs.
"""

import json
import os
import select
import signal
import socket
import struct
import sys
import threading

SOCKET_VARIABLE = "OPDGEO_PRELOAD_SOCKET"
# The process id of the local Snakemake run whose jobs end with it (`end_with_run`).
RUN_VARIABLE = "OPDGEO_RUN_PID"
NUMBER = struct.Struct("!q")  # every number on the socket: a request's length, an answer, a status
ACCEPTED, DECLINED = 0, 1  # the server's first answer: "running it" or "run it yourself"


def run_in_server(argv: list[str]) -> int | None:
    """Run `opdgeo argv[1:]` in the preload server; its exit status, or None when there is no
    server to run it (the caller then runs it in process)."""
    path = os.environ.get(SOCKET_VARIABLE)
    if not path or not _streams_open():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        return None  # the run that started the server has ended
    with connection:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "prefix": sys.prefix}).encode()
        try:
            socket.send_fds(connection, [NUMBER.pack(len(request))], [0, 1, 2])
            connection.sendall(request)
            answer = _read_int(connection)
        except OSError:
            answer = None  # the server closed the connection without taking the command
        if answer != ACCEPTED:
            return None
        status = _read_int(connection)
    if status is None:
        print("opdgeo: the preloaded worker ended without an exit status (killed?); "
              "--config preload=false runs every job in its own process", file=sys.stderr)
        return 1
    return status


def _streams_open() -> bool:
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return False
    return True


def _read_int(connection) -> int | None:
    data = read_exactly(connection, NUMBER.size)
    return None if data is None else NUMBER.unpack(data)[0]


def read_exactly(connection, size: int) -> bytes | None:
    """`size` bytes, or None when the other side closes first."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def end_with_run():
    """A job in its own process (no server, or one it declined) ends when the local Snakemake
    run that started it is gone: killed with SIGKILL, a run cancels no job, and the job would
    train on, writing outputs that no run records. The run's process id comes from
    RUN_VARIABLE (set by `export_run` for local runs only: a cluster job's run lives on
    another machine); a thread waits for that process to end, then terminates this one."""
    owner = os.environ.get(RUN_VARIABLE)
    if not owner:
        return
    try:
        handle = os.pidfd_open(int(owner))
    except ProcessLookupError:  # the run ended before this job started
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except OSError:  # no pidfd here (an old kernel): the job outlives a killed run
        return

    def watch():
        select.select([handle], [], [])  # readable once the run's process has ended
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def export_run():
    """Jobs started from here on end with this process (`end_with_run`)."""
    os.environ[RUN_VARIABLE] = str(os.getpid())
