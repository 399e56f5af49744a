"""Futex wait/wake on a 32-bit word of a shared mapping: how a process sleeps until another
process changes a counter in shared memory, without a pipe per waiter and without polling.

The word lives in a memfd segment mapped ``MAP_SHARED`` by every party, so the kernel keys
the futex on the file page, not on an address (no ``FUTEX_PRIVATE_FLAG``). ``ctypes`` drops
the GIL around the syscall. Waits are always given a timeout: callers wake up to check that
the other side is still alive.
"""

from __future__ import annotations

import ctypes
import platform

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_INT_MAX = 0x7FFFFFFF
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def low32(value: int) -> int:
    """The futex word of an int64 cell (little-endian: its low half), as a C int."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the int32 at ``addr`` equals ``expected``, at most ``timeout`` seconds.
    Returns early on a wake, a change, or a signal; the caller re-reads the word."""
    if _SYS_FUTEX is None:          # another architecture: a short sleep is correct, just slower
        import time
        time.sleep(min(timeout, 0.001))
        return
    ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_int(expected), ctypes.byref(ts),
                  None, 0)


def wake(addr: int) -> None:
    """Wake every process sleeping on the int32 at ``addr``."""
    if _SYS_FUTEX is not None:
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, _INT_MAX, None, None, 0)
