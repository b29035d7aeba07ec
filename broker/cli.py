"""encoder-broker COMMAND [ARGS...]: one entry point for every process of the project. Each command is the
`python -m` form it names, with the same arguments (`encoder-broker COMMAND --help`).

A command whose optional dependency is missing (diffusers for `dit`, ...) says which extra to install
(broker.ops.extras) instead of ending in a traceback. It names modules of every package (dit_workers -> workers ->
broker -> shm) but imports a command's module only when that command runs, so `broker` itself depends on none of
the layers above it. `python -m broker.cli` is the same command without the console script.
"""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import os
import shutil
import sys
import textwrap

from broker.errors import MissingExtra

COMMANDS = {  # name: (module whose main(argv) runs it, argv prefix, what it does)
    "worker": ("workers.__main__", [], "an encoder worker (python -m workers)"),
    "dit": ("dit_workers.__main__", [], "a DiT worker (python -m dit_workers)"),
    "http": ("broker.http.__main__", [], "the LightLLM-protocol HTTP front (python -m broker.http)"),
    "stats": ("broker.__main__", ["stats"], "queue, workers and latency (python -m broker stats)"),
    "redis-server": ("broker.__main__", ["redis-server"],
                     "the project's Redis on 127.0.0.1, asking for its password (python -m broker redis-server)"),
    "credential": ("broker.__main__", ["credential"],
                   "make the Redis password file if missing and print its path (python -m broker credential)"),
    "sweep": ("shm.__main__", ["sweep"], "remove expired and orphaned segments (python -m shm sweep)"),
    "make-tiny": ("workers.make_tiny", [], "write the embedded tiny checkpoint (python -m workers.make_tiny)"),
    "demo": ("dit_workers.demo", [], "submit a few generations and check them (python -m dit_workers.demo)"),
    "compare": ("workers.compare", [], "a quantized encoder against the unquantized one on your checkpoint and "
                "prompts (python -m workers.compare)"),
    "configs": (None, [], "copy the shipped configs (encoder, dit, http) into DIR (default ./configs)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [*textwrap.wrap(" ".join(__doc__.split("\n\n")[0].split()), 100), "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
    lines += ["", "Config keys can also come from EB_<KEY> environment variables (they win over a file)."]
    return "\n".join(lines)


def copy_configs(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("encoder-broker configs [DIR]: copy the shipped configs into DIR (default ./configs); existing files "
              "are kept. Their relative paths (../var/tiny) are relative to DIR.")
        return 0
    dest = argv[0] if argv else "configs"
    os.makedirs(dest, exist_ok=True)
    for entry in shipped_configs().iterdir():
        if entry.name.endswith(".json"):
            target = os.path.join(dest, entry.name)
            if os.path.exists(target):
                print(f"kept {target} (exists)")
                continue
            with entry.open("rb") as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            print(f"wrote {target}")
    return 0


def shipped_configs():
    """The wheel's `broker/configs`; in a source tree, the tree's `configs/`."""
    try:
        return importlib.resources.files("broker.configs")
    except ModuleNotFoundError:
        return importlib.resources.files("broker").joinpath("..", "configs")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"encoder-broker: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[name]
    if module is None:
        return copy_configs(rest)
    sys.argv[0] = f"encoder-broker {name}"
    try:
        run = importlib.import_module(module).main
        # usage lines read `encoder-broker worker ...` (a command with a prefix is a subcommand of its module's
        # parser: `encoder-broker` stands for that parser, its subcommand's name follows)
        if "prog" in inspect.signature(run).parameters:
            return run(prefix + rest, prog="encoder-broker" if prefix else f"encoder-broker {name}") or 0
        return run(prefix + rest) or 0
    except MissingExtra as e:
        print(f"encoder-broker {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
