"""The broker's Lua scripts (broker/protocol/lua/*.lua, each with its KEYS/ARGV contract in its header), loaded here.

Scripts that read or write jobs by id have broker/protocol/lua/rq.lua put before them and get the key prefixes of
broker.protocol.keys.PREFIXES as their first arguments (a script never spells a key name), added by `args`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.protocol import keys

LUA_DIR = Path(__file__).with_name("lua")
RQ_LIB = (LUA_DIR / "rq.lua").read_text()
WITH_RQ_LIB = ("take", "record", "recover")
NAMES = ("enqueue", *WITH_RQ_LIB)


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    with_lib: bool

    def args(self, args) -> list:
        """The script's ARGV: `args`, after the key prefixes when it uses rq.lua."""
        return [*keys.PREFIXES, *args] if self.with_lib else list(args)

    def on_pipeline(self, pipe, keys_: list, args: list) -> None:
        """Queues the script on `pipe` (by its text: a pipeline of EVALSHAs would first ask Redis whether they
        exist, a round trip of its own)."""
        pipe.execute_command("EVAL", self.source, len(keys_), *keys_, *self.args(args))


def _load(name: str) -> LuaScript:
    text = (LUA_DIR / f"{name}.lua").read_text()
    with_lib = name in WITH_RQ_LIB
    return LuaScript(name, RQ_LIB + text if with_lib else text, with_lib)


SCRIPTS = {name: _load(name) for name in NAMES}


class Scripts:
    """Every script registered on one client, sync or asyncio: `scripts.call("take", keys, args)` (EVALSHA, and
    EVAL when Redis lost it)."""

    def __init__(self, client):
        self._registered = {name: (s, client.register_script(s.source)) for name, s in SCRIPTS.items()}

    def call(self, name: str, keys_: list, args: list):
        """The script's reply (a coroutine for an asyncio client)."""
        script, registered = self._registered[name]
        return registered(keys=keys_, args=script.args(args))
