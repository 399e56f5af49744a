"""Handle-scoped lifetime across processes: who still holds a handle of an unnamed actor.

Box in the data flow: ``ActorHandle`` counts its live copies per process (``__init__`` /
``__del__``, never on the call path). Passing a handle to another process is recorded in the
job directory, next to the actor's status file, in ``<actor>.holders/``:

- pickling a counted handle *lends* it: a token file ``t-<random>`` stands for the handle in
  flight (counted from the moment it is serialized, like a ref);
- the process that unpickles it holds ``p-<pid>`` instead (one file per process, however many
  copies it has) and removes the token;
- when the creating process drops its last handle it writes ``released``; when a borrower
  drops its last one it removes its ``p-`` file. Each then looks: ``released`` and no token
  and no ``p-`` file of a live process means nobody holds a handle, and the actor is stopped.

Each side writes before it looks, so two last drops at once cannot both miss the other (at
worst both stop it, which is harmless). A handle lost in flight, or a borrower killed before it
dropped its handle, leaves the actor running until ``ta.kill`` or shutdown: the safe side.
"""

from __future__ import annotations

import os
import secrets

from torchactors.actors import _current
from torchactors.store.registry import pid_alive

counts: dict[str, int] = {}         # actor id -> live handles in this process (counted actors only)
_owner: set[str] = set()            # counted actors this process created


def track(actor_id: str) -> None:
    """This process created the actor: count its handles here."""
    counts[actor_id] = 0
    _owner.add(actor_id)


def forget_all() -> None:
    """At shutdown: every actor stops anyway; later drops of old handles do nothing."""
    counts.clear()
    _owner.clear()


def _holders(actor_id: str) -> str | None:
    backend = _current.backend
    return None if backend is None else os.path.join(backend.job.dir, "actors", actor_id + ".holders")


def lend(actor_id: str) -> str | None:
    """A counted handle is being pickled: the token the receiver will trade for its own hold
    (None for actors not counted here: named, detached, or not ours)."""
    where = _holders(actor_id)
    if actor_id not in counts or where is None:
        return None
    os.makedirs(where, mode=0o700, exist_ok=True)
    token = secrets.token_hex(8)
    os.close(os.open(os.path.join(where, "t-" + token), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return token


def receive(actor_id: str, token: str) -> bool:
    """A lent handle was unpickled here: hold it in this process, drop the token. True if this
    process now counts the actor's handles for the first time (a new borrower)."""
    where = _holders(actor_id)
    if where is None:
        return False
    first = actor_id not in counts
    if first:
        counts[actor_id] = 0
        os.close(os.open(os.path.join(where, f"p-{os.getpid()}"), os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        os.unlink(os.path.join(where, "t-" + token))
    except FileNotFoundError:
        pass            # a restarted actor reading its constructor arguments again
    return first


def nobody_holds(actor_id: str) -> bool:
    """This process dropped its last handle: record it, and say whether no process holds one."""
    where = _holders(actor_id)
    if where is None:
        return False
    if actor_id in _owner:
        _owner.discard(actor_id)
        if not os.path.isdir(where):
            return True                 # never passed on
        os.close(os.open(os.path.join(where, "released"), os.O_WRONLY | os.O_CREAT, 0o600))
    else:
        try:
            os.unlink(os.path.join(where, f"p-{os.getpid()}"))
        except FileNotFoundError:
            pass
    try:
        names = os.listdir(where)
    except FileNotFoundError:
        return False
    if "released" not in names:
        return False
    for name in names:
        if name.startswith("t-"):
            return False
        if name.startswith("p-") and pid_alive(int(name[2:])):
            return False
    return True
