"""Whose a backend connection is: the identity it carries and the statements it holds.

One ``ConnectionIdentity`` per backend connection, kept across clients under transaction
pooling. The engine (frontend/engine.py) is its only writer, through the methods below:

    key          the role and settings applied, as a client's key (person, settings);
                 None: unknown — the next client pays a full switch
    person       whose prepared statements and session objects these are
    prepared     (text, parameter types) -> our statement name, an LRU
    pending      names whose Parse is not answered yet -> the Sync count when it was sent:
                 usable before the next Sync only (if it fails, PostgreSQL skips to Sync,
                 and everything using it in between with it)
    syncs        Syncs sent on the connection so far
    unnamed      (owner, generation) of the client whose unnamed statement this is

Pure: no I/O. A connection that is reset (DISCARD ALL) or whose state is unknown is
``forget()``-ed: nobody's, with nothing prepared.
"""

from __future__ import annotations

from types import MappingProxyType

# The one empty mapping that connections and sessions hold while they have nothing of a kind
# (statements, portals, startup settings, ParameterStatus values): an empty dict is 64 bytes,
# and thousands of idle clients would each hold several. Read-only, so a write that forgot to
# make its own dict fails instead of being shared.
EMPTY = MappingProxyType({})


class ConnectionIdentity:
    __slots__ = ("key", "person", "prepared", "pending", "syncs", "counter", "unnamed_owner", "unnamed_gen")

    def __init__(self) -> None:
        self.key = None
        self.person = None
        self.prepared: dict[tuple, str] = EMPTY  # oldest first (dicts keep insertion order)
        self.pending: dict[str, int] = EMPTY
        self.syncs = 0
        self.counter = 0
        self.unnamed_owner = None
        self.unnamed_gen = 0

    def carries(self, key) -> bool:
        return self.key == key

    def forget(self) -> None:
        """Nobody's connection any more (reset, or a statement that may have undone our settings)."""
        self.key = None
        self.person = None
        self.prepared = self.pending = EMPTY
        self.unnamed_owner = None

    def became(self, person, key) -> bool:
        """A switch to ``key`` went out; True if it was another person's (their statements go)."""
        new_person = self.person != person
        if new_person:
            self.prepared = self.pending = EMPTY
        self.person, self.key, self.unnamed_owner = person, key, None
        return new_person

    def settings_changed(self, old_key, new_key, exact: bool) -> None:
        """The client's settings changed on this connection: it carries ``new_key`` if the
        change is known exactly, else nobody knows what it carries."""
        if self.key == old_key:
            self.key = new_key if exact else None

    # --- prepared statements -----------------------------------------------------------

    def synced(self) -> None:
        """A Sync goes out: statements still pending from before it may yet have failed."""
        self.syncs += 1

    def lookup(self, key: tuple) -> str | None:
        """Our name for ``key`` if the connection has it (or it is being prepared since the last Sync)."""
        name = self.prepared.get(key)
        if name is not None:
            sent = self.pending.get(name)
            if sent is not None and sent != self.syncs:
                return None  # its Parse may have been skipped: prepare it again
            prepared = self.prepared
            prepared[key] = prepared.pop(key)  # the most recently used goes last
        return name

    def prepare(self, key: tuple, limit: int) -> tuple[str, list[str]]:
        """A new name for ``key``, and the names evicted to stay within ``limit``."""
        prepared, pending = self.prepared, self.pending
        if prepared is EMPTY:
            prepared = self.prepared = {}
        if pending is EMPTY:
            pending = self.pending = {}
        evicted = []
        prepared.pop(key, None)  # an older name still pending: abandoned (DISCARD ALL ends it)
        while len(prepared) >= limit:
            old = prepared.pop(next(iter(prepared)))  # the least recently used
            pending.pop(old, None)
            evicted.append(old)
        self.counter += 1
        name = prepared[key] = f"pgproxy_{self.counter}"
        pending[name] = self.syncs
        return name, evicted

    def prepared_ok(self, name: str) -> None:
        """Its ParseComplete came."""
        if name in self.pending:
            del self.pending[name]

    def unprepare(self, key: tuple, name: str) -> None:
        """Its Parse failed or was skipped: the connection does not have it."""
        if name in self.pending:
            del self.pending[name]
        if self.prepared.get(key) == name:
            del self.prepared[key]

    def deallocated(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL ran: nothing is prepared any more."""
        self.prepared = self.pending = EMPTY
        self.unnamed_owner = None

    # --- the unnamed statement ---------------------------------------------------------

    def holds_unnamed(self, owner, generation: int) -> bool:
        return self.unnamed_owner is owner and self.unnamed_gen == generation

    def claim_unnamed(self, owner, generation: int) -> None:
        self.unnamed_owner, self.unnamed_gen = owner, generation

    def drop_unnamed(self) -> None:
        self.unnamed_owner = None
