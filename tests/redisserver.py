"""
A real C{redis-server} for tests: started in a temporary directory on a
loopback port the OS picked, without persistence, and stopped by its PID.

C{redis-server} must be installed: a missing server is a test failure, not
a skip (the Redis back end must be tested wherever the suite runs).
"""

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Optional


class RedisServerError(Exception):
    """
    The test Redis server could not be started.
    """


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now, chosen by
    the OS.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its TCP port (once started).
    @ivar directory: its working directory, removed on L{stop}.
    """

    def __init__(
        self,
        executable: str = "redis-server",
        unixSocket: bool = False,
        tls: Optional[tuple] = None,
        persistent: bool = False,
    ) -> None:
        """
        @param unixSocket: listen on a UNIX socket (L{socketPath}) too.
        @param tls: C{(certificate path, key path)}: serve TLS only, on
            L{port}, with that certificate (which is also its CA file).
        @param persistent: keep the data in an append-only file in
            L{directory}, fsynced after every write, as an operator's Redis
            would; a server started again (after L{kill}) reads it back.
        """
        self.executable = executable
        self.persistent = persistent
        self.unixSocket = unixSocket
        self.tls = tls
        self.socketPath: Optional[str] = None
        self.port: Optional[int] = None
        self.directory: Optional[str] = None
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 10.0, port: Optional[int] = None) -> "RedisServer":
        """
        Start the server and wait until it answers PING.

        @param port: the port to listen on; by default one the OS picks.

        @raise RedisServerError: if C{redis-server} is not installed, exits
            or does not answer within C{timeout} seconds.
        """
        path = shutil.which(self.executable)
        if path is None:
            raise RedisServerError(
                f"{self.executable!r} is not on PATH: install Redis"
                " (e.g. apt-get install redis-server) to run the Redis store tests"
            )
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="smartrelay-redis-")
        log = os.path.join(self.directory, "redis.log")
        extra = []
        if self.tls is not None:
            certificate, key = self.tls
            extra += [
                "--tls-cert-file", certificate,
                "--tls-key-file", key,
                "--tls-ca-cert-file", certificate,
                "--tls-auth-clients", "no",
            ]
        if self.unixSocket:
            self.socketPath = os.path.join(self.directory, "redis.sock")
            extra += ["--unixsocket", self.socketPath, "--unixsocketperm", "700"]
        # Another process may take the port between freePort() and the
        # server's bind: try a few.
        for attempt in range(1 if port else 5):
            self.port = port or freePort()
            with open(log, "wb") as output:
                self.process = subprocess.Popen(
                    [
                        path,
                        *(
                            ["--port", "0", "--tls-port", str(self.port)]
                            if self.tls
                            else ["--port", str(self.port)]
                        ),
                        "--bind", "127.0.0.1",
                        "--dir", self.directory,
                        "--save", "",
                        *(
                            ["--appendonly", "yes", "--appendfsync", "always"]
                            if self.persistent
                            else ["--appendonly", "no"]
                        ),
                        "--daemonize", "no",
                        *extra,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                )
            if self._waitForPing(timeout):
                return self
            exited = self.process.poll() is not None
            self._terminate()
            if not exited:
                break
        with open(log, "rb") as f:
            output = f.read().decode("utf-8", "replace")
        self.stop()
        raise RedisServerError(f"redis-server did not start; its output:\n{output}")

    def _waitForPing(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self.command("PING") == b"+PONG\r\n":
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def command(self, *args: str) -> bytes:
        """
        Send one command and return the raw first reply chunk (enough for
        simple replies such as PING or FLUSHALL).
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if self.tls is not None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                s = context.wrap_socket(s)
            s.sendall(_command(*args))
            return s.recv(65536)

    def url(self, db: int = 0) -> str:
        """
        A C{redis://} URL of this server.
        """
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def kill(self) -> None:
        """
        Kill the server with SIGKILL (no shutdown, no last save) and wait
        for it; its directory stays, so L{start} with the same C{port}
        brings it back as an operator's restart would.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """
        Stop the server (SIGTERM to its PID, then wait) and remove its
        directory.  Safe to call more than once.
        """
        self._terminate()
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


_shared: Optional[RedisServer] = None


def sharedRedisServer() -> RedisServer:
    """
    The test process's Redis server, started on first use and stopped when
    the process exits.  Tests that share it keep apart by key prefix.
    """
    global _shared
    if _shared is None or _shared.process is None or _shared.process.poll() is not None:
        server = RedisServer()
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared
