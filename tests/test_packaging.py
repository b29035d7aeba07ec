"""The wheel as a user gets it: built from this tree, installed in a fresh virtualenv (whose .pth borrows this
environment's site-packages for torch and the rest, so nothing is downloaded), used from outside the tree:
`from broker import EncoderClient`, the `encoder-broker` console script, and the configs shipped inside it."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile

import pytest
import torch

from tests.helpers import REPO, start_process, stop_process, wait_for_workers


def tree_packages() -> set[str]:
    found = set()
    for top in ("broker", "workers", "dit_workers", "shm"):
        for d, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files:
                found.add(os.path.relpath(d, REPO).replace(os.sep, "."))
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"  # a copy: setuptools' build/ in the tree keeps files since deleted
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "var", "build", ".venv", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".whl", ".gl"))
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(d), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = glob.glob(str(d / "*.whl"))
    env = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = str(env / "bin" / "python")
    # The wheel goes in before the .pth: pip then sees only the fresh environment.
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True, timeout=300)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "borrowed.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return {"wheel": wheel, "python": python, "bin": str(env / "bin"), "site": site, "dir": d,
            "build_output": build.stdout + build.stderr}


def run(venv, args, **kw):
    env = dict(os.environ, PATH=venv["bin"] + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=str(venv["dir"]), env=env, **kw)


def test_wheel_holds_every_package_and_the_configs(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert tree_packages() <= packages, tree_packages() - packages
    assert {"broker/configs/encoder.json", "broker/configs/dit.json", "broker/configs/http.json"} <= set(names)


def test_the_build_does_not_warn_about_undeclared_package_data(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    assert {"broker/protocol/lua/rq.lua", "broker/protocol/lua/take.lua"} <= set(names)
    assert "absent from the `packages` configuration" not in venv["build_output"], venv["build_output"][-3000:]


def test_console_script_help_and_the_installed_modules(venv):
    r = run(venv, ["encoder-broker", "--help"])
    assert r.returncode == 0 and all(c in r.stdout for c in ("worker", "dit", "http", "stats", "sweep", "make-tiny"))
    r = run(venv, ["encoder-broker", "worker", "--help"])
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    r = run(venv, [venv["python"], "-c", "import broker, workers; from broker import EncoderClient; "
                                         "print(broker.__file__); print(workers.__file__)"])
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(venv["site"]) for line in r.stdout.split()), r.stdout  # the wheel's, not the tree's


def test_installed_worker_encodes(venv, redis_server, baseline, tiny_dir):
    cfg_dir = venv["dir"] / "my-configs"
    r = run(venv, ["encoder-broker", "configs", str(cfg_dir)])
    assert r.returncode == 0 and (cfg_dir / "encoder.json").exists(), r.stderr
    queue = "pkg-" + uuid.uuid4().hex[:6]
    env = {"EB_REDIS_URL": redis_server.url, "EB_QUEUE": queue, "EB_MODEL_DIR": tiny_dir, "EB_DEVICE": "cpu",
           "EB_BACKEND": "baseline", "EB_MAKE_TINY_IF_MISSING": "false", "EB_MAX_PROMPT_TOKENS": "96",
           "PATH": venv["bin"] + os.pathsep + os.environ["PATH"]}
    log = str(venv["dir"] / "worker.log")
    proc = start_process([], log, env=env, argv=[os.path.join(venv["bin"], "encoder-broker"), "worker",
                                                 "--config", str(cfg_dir / "encoder.json")],
                         cwd=str(venv["dir"]))
    try:
        wait_for_workers(redis_server.url, 1, proc, log, queue=queue)
        out = str(venv["dir"] / "states.pt")
        r = run(venv, [venv["python"], "-c",
                       "import sys, torch; from broker import EncoderClient; "
                       f"c = EncoderClient({redis_server.url!r}, queue={queue!r}, timeout=60); "
                       f"torch.save(c.encode(['a red fox in snow']), {out!r})"])
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop_process(proc)
    (got,) = torch.load(out)
    (want,) = baseline.encode(["a red fox in snow"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
