"""Small things of the command line, tried as a user would."""

import signal
import subprocess
import sys

from tests.helpers import REPO, eventually


def test_stats_watch_ends_on_ctrl_c_without_a_traceback(redis_server, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "broker", "stats", "--redis-url", redis_server.url, "--watch",
                             "0.2"], cwd=REPO, stdout=open(out, "w"), stderr=subprocess.PIPE, text=True)
    assert eventually(lambda: open(out).read().count("queue 'encode'") >= 2, timeout=60), open(out).read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
