"""requirements.lock (what .ci/setup installs) agrees with pyproject.toml (what a pip user gets)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+!\-]+)", line)
        assert m, f"requirements.lock line {line!r} is not an exact name==version pin"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    own = canonicalize_name(project["name"])  # an extra naming others of the project's own extras
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != own]


def test_every_declared_dependency_is_locked_within_its_range():
    pins = locked()
    for req in declared():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in requirements.lock: run `bash .ci/lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name}=={pins[name]}, outside pyproject.toml's {req}: run `bash .ci/lock`")


def test_the_lock_holds_the_torch_pins_that_make_it():
    pins = locked()
    lock_script = (ROOT / ".ci" / "lock").read_text()
    for name, version in re.findall(r"\b(torch|torchvision)==([0-9][0-9.]*)", lock_script):
        assert pins.get(name) == version, f".ci/lock pins {name}=={version}, requirements.lock has {pins.get(name)}"


def test_setup_installs_from_the_lock_alone():
    setup = (ROOT / ".ci" / "setup").read_text()
    assert "--no-deps -r requirements.lock" in setup
    installs = [ln for ln in setup.splitlines() if "pip install" in ln]
    assert all("--no-deps" in ln for ln in installs), installs
