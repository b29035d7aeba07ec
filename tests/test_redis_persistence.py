"""The project's own Redis (`python -m broker redis-server`, the Procfile's) keeps its data across restarts: an
append-only file in the password's folder, read back when it starts again, after a SIGTERM or a SIGKILL."""

import glob
import os
import signal

import pytest
import redis

from tests.helpers import eventually, free_port, start_process


class ProjectRedis:
    """`python -m broker redis-server` on a free port, its password file (and so its data) in `folder`."""

    def __init__(self, folder):
        self.folder, self.port = str(folder), free_port()
        self.password_file = os.path.join(self.folder, "password")
        self.proc = None

    def start(self) -> redis.Redis:
        self.proc = start_process(["-m", "broker", "redis-server", "--port", str(self.port), "--file",
                                   self.password_file], os.path.join(self.folder, "..", "redis.log"))
        log = os.path.join(self.folder, "..", "redis.log")

        def client():
            return redis.Redis(port=self.port, password=open(self.password_file).read().strip())

        def up():
            assert self.proc.poll() is None, open(log).read()
            try:
                return client().ping()
            except (OSError, redis.ConnectionError, redis.BusyLoadingError):
                return False
        assert eventually(up, timeout=30)
        return client()

    def stop(self, sig) -> None:
        os.kill(self.proc.pid, sig)
        self.proc.wait(30)


@pytest.fixture
def project_redis(tmp_path):
    server = ProjectRedis(tmp_path / "redis")
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop(signal.SIGKILL)


def aof_holds(folder: str, text: bytes) -> bool:
    """Whether the append-only files under `folder` hold `text` (written there, whatever fsync does next)."""
    return any(text in open(path, "rb").read() for path in glob.glob(os.path.join(folder, "appendonlydir", "*")))


def test_the_project_redis_keeps_its_data_across_a_sigterm_and_a_sigkill(project_redis):
    keep = os.path.join(project_redis.folder, "users-file")
    os.makedirs(project_redis.folder, mode=0o700, exist_ok=True)
    with open(keep, "w") as f:
        f.write("not Redis's")
    r = project_redis.start()
    r.set("eb:test:before-sigterm", "1")
    project_redis.stop(signal.SIGTERM)
    r = project_redis.start()
    assert r.get("eb:test:before-sigterm") == b"1"
    r.set("eb:test:before-sigkill", "2")
    assert eventually(lambda: aof_holds(project_redis.folder, b"eb:test:before-sigkill"), timeout=10)
    project_redis.stop(signal.SIGKILL)
    r = project_redis.start()
    assert r.get("eb:test:before-sigterm") == b"1" and r.get("eb:test:before-sigkill") == b"2"
    assert open(keep).read() == "not Redis's"
    conf = open(os.path.join(project_redis.folder, "redis.conf")).read()
    assert "appendonly yes\n" in conf and "appendfsync everysec\n" in conf
