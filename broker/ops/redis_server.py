"""The Redis the project runs (Procfile, .ci/start): no client gets in without the password made on its first
run. The password lives in a file of mode 0600 in a folder of mode 0700 (default var/redis/password, or
$EB_REDIS_PASSWORD_FILE); every process reads it from there (broker.protocol.connections.connect), and redis-server
from a config file of mode 0600 written beside it, so it is never on a command line that `ps` shows. It keeps its data
in an append-only file in that folder (fsync'ed every second), so a restart loses at most the last second of jobs,
and the clients enqueue those again (broker.rq_wire)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat

from broker.protocol.connections import DEFAULT_PASSWORD_FILE, PASSWORD_FILE_ENV


def password_file() -> str:
    return os.environ.get(PASSWORD_FILE_ENV) or DEFAULT_PASSWORD_FILE


def _write_private(path: str, text: str, exclusive: bool) -> None:
    """Writes `text` to `path` with mode 0600 from the start (never readable by others, whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _private_dir(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)


def ensure_credential(path: str | None = None) -> str:
    """The password in `path` (default: password_file()), made (32 random bytes, URL-safe) if the file does not
    exist yet. A file that others can read is refused: its password is no secret."""
    path = path or password_file()
    _private_dir(path)
    try:
        _write_private(path, secrets.token_urlsafe(32) + "\n", exclusive=True)
    except FileExistsError:
        pass
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"the Redis password file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others can "
                              f"read it; chmod 600 {path} (and change the password)")
    with open(path) as f:
        password = f.read().strip()
    if not password:
        raise ValueError(f"the Redis password file {path} is empty; delete it to have a new one made")
    return password


def write_config(conf_path: str, password: str, port: int, bind: str = "127.0.0.1", workdir: str | None = None,
                 persist: bool = True) -> str:
    """A redis.conf (mode 0600) for a server on `bind`:`port` that asks for `password`. With `persist` it keeps its
    data across restarts: every write goes to an append-only file under `workdir` (default: the config's folder),
    fsync'ed every second, and a restarted server reads it back (files already there are read, never removed);
    without, it keeps nothing on disk."""
    _private_dir(conf_path)
    durability = ["appendonly yes", "appendfsync everysec"] if persist else ["appendonly no"]
    lines = [f"port {int(port)}", f"bind {bind}", "protected-mode yes", 'save ""', *durability,
             f"dir {os.path.abspath(workdir or os.path.dirname(os.path.abspath(conf_path)))}",
             f"requirepass {password}"]
    _write_private(conf_path, "\n".join(lines) + "\n", exclusive=False)
    return conf_path


def exec_redis_server(port: int, bind: str = "127.0.0.1", password_path: str | None = None) -> None:
    """Replaces this process with a redis-server asking for the project's password (made on first run), its data
    kept across restarts in the password file's folder."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server; .ci/setup does it)")
    path = password_path or password_file()
    conf = write_config(os.path.join(os.path.dirname(os.path.abspath(path)), "redis.conf"), ensure_credential(path),
                        port, bind)
    os.execv(exe, [exe, conf])
