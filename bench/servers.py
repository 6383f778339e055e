"""Server processes for the bench scripts: start, wait for /health, stop.

Owns what bench/template_identity.py and bench/embeddings_vs_llama_server.py both need to
run llama-server and llamapool-router as child processes (Python 3 standard library only):

    free_port()        a free loopback TCP port
    anchor_env(DIR)    the environment for llama-server from a llama.cpp build in DIR
                       (LD_LIBRARY_PATH=DIR in front of the caller's)
    Server             one server in its own process group (start_new_session), stdout and
                       stderr in one log file (a given path, kept; or a temporary file,
                       removed on stop); tail() the log's last lines; wait_healthy();
                       stop(): SIGTERM to the process group and every descendant (and
                       their groups, never ours), up to `stop_grace` seconds for all of
                       them to go, then SIGKILL; every started Server is in LIVE until
                       stopped, and stop_all() stops them (for atexit and signal paths)
    wait_healthy(...)  polls several servers' GET /health until each answers 200, exits
                       or runs out of time
    http_call(...)     one JSON request on a fresh loopback connection
    on_sigterm         a SIGTERM handler raising KeyboardInterrupt, so that the scripts'
                       `finally` blocks stop their servers

The scripts import it as `from servers import ...`: `python3 bench/X.py` puts the script's
own folder (bench/) first on sys.path, whatever the current directory. Descendants are found
through /proc (Linux); where /proc is unavailable only the process groups are signalled.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

LIVE = set()


def free_port():
    """A loopback TCP port free right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anchor_env(anchor):
    """os.environ with the llama.cpp build directory `anchor` first in LD_LIBRARY_PATH."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(anchor), env.get("LD_LIBRARY_PATH")) if p)
    return env


def proc_stat_fields(pid):
    """The fields of /proc/PID/stat after `(comm)`, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2:].split()


def descendants_of(pid):
    """Every descendant of `pid`, from /proc (empty where /proc is unavailable)."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    parent = {}
    for e in entries:
        fields = proc_stat_fields(e)
        if fields and len(fields) > 1:
            parent[e] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for kid, ppid in parent.items():
            if ppid == p:
                out.append(kid)
                todo.append(kid)
    return out


def alive(pid):
    """Whether `pid` exists and is not a zombie."""
    fields = proc_stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def signal_tree(pids, sig):
    """`sig` to each of `pids` and to each of their process groups (never our own)."""
    groups = set()
    for p in pids:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    groups.discard(os.getpgrp())
    for g in groups:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def http_call(port, method, path, body=None, timeout=30.0):
    """(status, text) on a fresh connection; raises OSError / http.client.HTTPException."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Connection": "close"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class Server:
    """One server process in its own process group, its stdout and stderr in one log.

    `log_path` None: the log is a temporary file (named after `log_prefix` and `label`),
    removed by stop(); else the log is written there and kept. Raises OSError when the
    program cannot be started."""

    def __init__(self, label, argv, port, log_path=None, env=None, cwd=None,
                 stop_grace=5.0, log_prefix="bench-"):
        self.label = label
        self.argv = argv
        self.port = port
        self.stop_grace = stop_grace
        if log_path is None:
            self.log = tempfile.NamedTemporaryFile(prefix=f"{log_prefix}{label}-",
                                                   suffix=".log", delete=False)
            self.log_path, self.remove_log = self.log.name, True
        else:
            self.log = open(log_path, "wb")
            self.log_path, self.remove_log = log_path, False
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        except OSError:
            self.log.close()
            raise
        LIVE.add(self)

    def tail(self, lines):
        """The log's last `lines` lines (empty when it cannot be read)."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def wait_healthy(self, timeout):
        """None once GET /health answers 200, else why not."""
        return wait_healthy([self], timeout)[self.label]

    def stop(self):
        """SIGTERM to the whole process tree, up to `stop_grace` s for it to go, then
        SIGKILL (up to 5 s more)."""
        if self.proc is None:
            return
        tree = [self.proc.pid] + descendants_of(self.proc.pid)
        for sig, grace in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
            # Descendants started since the last look (a worker being respawned) too.
            tree += [p for p in descendants_of(self.proc.pid) if p not in tree]
            signal_tree(tree, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()  # reaps our own child, so it is not left a zombie
                if not any(alive(p) for p in tree):
                    break
                time.sleep(0.05)
            if not any(alive(p) for p in tree):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        self.log.close()
        if self.remove_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        LIVE.discard(self)


def stop_all():
    """Stops every started Server not stopped yet."""
    for s in list(LIVE):
        s.stop()


def wait_healthy(servers, timeout):
    """Polls every server's GET /health until 200; returns {label: None | why not}."""
    result = {s.label: "not healthy" for s in servers}
    pending = list(servers)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for s in list(pending):
            if s.proc.poll() is not None:
                result[s.label] = f"exited with status {s.proc.returncode}"
                pending.remove(s)
                continue
            try:
                status, _ = http_call(s.port, "GET", "/health", timeout=2)
            except (OSError, http.client.HTTPException):
                continue
            if status == 200:
                result[s.label] = None
                pending.remove(s)
        if pending:
            time.sleep(0.2)
    for s in pending:
        result[s.label] = f"no 200 from /health within {timeout:.0f} s"
    return result


def on_sigterm(_signum, _frame):
    """SIGTERM behaves like Ctrl-C, so that the `finally` blocks stop the servers."""
    raise KeyboardInterrupt
