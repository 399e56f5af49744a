"""Shared-memory segments: memfd files, their mappings, and the owner's pool of blocks.

Box in the data flow: ``put`` asks the pool for a block, copies bytes into it, and the ref
names (segment fd, inode, offset); ``get`` in another process opens ``/proc/<owner>/fd/<fd>``
once, checks the inode, and keeps the mapping in a per-process cache.

Segments are ``memfd_create`` files (mode 0600): no ``/dev/shm`` entry to leak and no size cap
from a small ``/dev/shm``; the kernel frees them with the last fd and mapping, so a SIGKILL of
any process leaves nothing behind. See docs/design.md.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ALIGN = 64                      # every block starts on a cache line
MIN_CLASS = 256                 # smallest block
SMALL_LIMIT = 16 << 20          # blocks up to this size come from shared arenas
ARENA_SIZE = 64 << 20           # arena segment size for small blocks
PAGE = mmap.PAGESIZE


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) & ~(a - 1)


def size_class(nbytes: int) -> int:
    """Round a request up to its block class: powers of two for arena blocks, eighths of
    a power of two (at most 12.5% waste) for dedicated segments, so hot sizes reuse blocks."""
    n = max(nbytes, MIN_CLASS)
    if n <= SMALL_LIMIT:
        return 1 << (n - 1).bit_length()
    step = 1 << ((n - 1).bit_length() - 4)
    return align_up((n + step - 1) // step * step, PAGE)


class Segment:
    """One memfd file mapped in this process. ``fd`` stays open while the segment lives so
    that peers can open it through /proc/<pid>/fd/<fd>."""

    __slots__ = ("seg_id", "fd", "size", "inode", "mm", "base", "u8", "owned", "live_blocks", "__weakref__")

    def __init__(self, seg_id: int, size: int, fd: Optional[int] = None, populate: bool = True) -> None:
        self.seg_id = seg_id
        self.owned = fd is None
        if fd is None:
            fd = os.memfd_create(f"torchactors-{os.getpid()}-{seg_id}", os.MFD_CLOEXEC)
            try:
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        self.fd = fd
        self.size = size
        self.inode = os.fstat(fd).st_ino
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        self.mm = mmap.mmap(fd, size, flags=flags) if size else None
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        self.base = self.u8.data_ptr()
        self.live_blocks = 0

    def close(self) -> None:
        """Drop this process's handle; memory stays valid for tensors still viewing it."""
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class SharedFile:
    """A storage torch already shares through an fd (``share_memory_()``): peers open that fd
    as they open a segment's, and the owner reads the storage itself. No mapping, no new fd."""

    __slots__ = ("fd", "inode", "size")

    def __init__(self, fd: int, inode: int, size: int) -> None:
        self.fd = fd
        self.inode = inode
        self.size = size


def shared_file(storage: torch.UntypedStorage) -> Optional[SharedFile]:
    """The fd torch shares ``storage`` through (the storage keeps it open), or None."""
    if not storage.is_shared() or storage.device.type != "cpu":
        return None
    try:
        fd, size = storage._share_fd_cpu_()[:2]
        return SharedFile(fd, os.fstat(fd).st_ino, size)
    except (RuntimeError, AttributeError, TypeError, OSError):
        return None


class SegmentPool:
    """The owner's allocator: arenas of power-of-two blocks for small objects, pooled
    dedicated segments for large ones. Freed blocks are kept for reuse (already faulted in),
    and given back to the kernel only under capacity pressure."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # A small store gets smaller arenas, so that small objects fit at all.
        self.arena_size = max(PAGE, min(ARENA_SIZE, capacity // 4 // PAGE * PAGE))
        self.small_limit = min(SMALL_LIMIT, self.arena_size)
        self.lock = threading.RLock()
        self.segments: dict[int, Segment] = {}
        self._next_seg = 1
        self._free_small: dict[int, list[tuple[Segment, int]]] = {}   # class -> [(arena, offset)]
        self._free_large: dict[int, list[Segment]] = {}               # class -> [segment]
        self._arena: Optional[Segment] = None
        self._arena_top = 0
        self.reserved = 0           # bytes of all segments we hold (live blocks + pooled free ones)
        self.used = 0               # bytes of live blocks

    def _new_segment(self, size: int) -> Segment:
        seg = Segment(self._next_seg, size)
        self._next_seg += 1
        self.segments[seg.seg_id] = seg
        self.reserved += size
        logger.debug("new segment %d of %d bytes", seg.seg_id, size)
        return seg

    def _drop_segment(self, seg: Segment) -> None:
        del self.segments[seg.seg_id]
        self.reserved -= seg.size
        seg.close()

    def allocate(self, nbytes: int) -> Optional[tuple[Segment, int, int]]:
        """Return (segment, offset, block size) or None if the capacity would be exceeded."""
        cls = size_class(nbytes)
        with self.lock:
            if cls <= self.small_limit:
                found = self._alloc_small(cls)
            else:
                found = self._alloc_large(cls)
            if found is not None:
                found[0].live_blocks += 1
                self.used += cls
            return found

    def _alloc_small(self, cls: int) -> Optional[tuple[Segment, int, int]]:
        free = self._free_small.get(cls)
        if free:
            seg, off = free.pop()
            return seg, off, cls
        if self._arena is None or self._arena_top + cls > self._arena.size:
            if self.reserved + self.arena_size > self.capacity and not self._shrink(self.arena_size):
                return None
            self._arena = self._new_segment(self.arena_size)
            self._arena_top = 0
        off = self._arena_top
        self._arena_top += cls
        return self._arena, off, cls

    def _alloc_large(self, cls: int) -> Optional[tuple[Segment, int, int]]:
        free = self._free_large.get(cls)
        if free:
            return free.pop(), 0, cls
        if self.reserved + cls > self.capacity and not self._shrink(cls):
            return None
        return self._new_segment(cls), 0, cls

    def can_carve(self, cls: int) -> bool:
        """A small block of class ``cls`` fits in the open arena without new memory."""
        return cls <= self.small_limit and self._arena is not None and self._arena_top + cls <= self._arena.size

    def has_free(self, cls: int) -> bool:
        return bool(self._free_small.get(cls) if cls <= self.small_limit else self._free_large.get(cls))

    def release(self, seg: Segment, offset: int, cls: int) -> None:
        with self.lock:
            seg.live_blocks -= 1
            self.used -= cls
            if cls <= self.small_limit:
                self._free_small.setdefault(cls, []).append((seg, offset))
            else:
                self._free_large.setdefault(cls, []).append(seg)

    def _shrink(self, need: int) -> bool:
        """Give pooled free memory back to the kernel until ``need`` more bytes fit."""
        for cls in sorted(self._free_large, reverse=True):
            free = self._free_large[cls]
            while free and self.reserved + need > self.capacity:
                self._drop_segment(free.pop())
        # Arenas whose blocks are all free can go as a whole.
        for seg in list(self.segments.values()):
            if self.reserved + need <= self.capacity:
                break
            if seg.size == self.arena_size and seg.live_blocks == 0:
                for cls, free in self._free_small.items():
                    self._free_small[cls] = [(s, o) for s, o in free if s is not seg]
                if seg is self._arena:
                    self._arena = None
                self._drop_segment(seg)
        return self.reserved + need <= self.capacity

    def close(self) -> None:
        with self.lock:
            for seg in list(self.segments.values()):
                self._drop_segment(seg)
            self._free_small.clear()
            self._free_large.clear()
            self._arena = None
            self.used = 0


class MappingCache:
    """Segments of other processes mapped into this one, opened once and reused: a segment
    holding many objects costs one mapping per process, however many objects are read."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._maps: dict[tuple[int, int, int], Segment] = {}   # (pid, fd, inode) -> segment

    def map(self, pid: int, fd: int, inode: int) -> Optional[Segment]:
        key = (pid, fd, inode)
        seg = self._maps.get(key)
        if seg is not None:
            return seg
        with self.lock:
            seg = self._maps.get(key)
            if seg is not None:
                return seg
            try:
                local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                st = os.fstat(local)
                if st.st_ino != inode:
                    return None
                seg = Segment(0, st.st_size, fd=local, populate=False)
            finally:
                os.close(local)     # mmap keeps its own handle
            seg.fd = -1
            self._prune(pid)
            self._maps[key] = seg
            return seg

    def _prune(self, pid: int) -> None:
        """Forget mappings of segments ``pid`` has closed since: a cached mapping would keep
        memory the owner gave back to the kernel alive."""
        for key in [k for k in self._maps if k[0] == pid]:
            try:
                alive = os.stat(f"/proc/{pid}/fd/{key[1]}").st_ino == key[2]
            except OSError:
                alive = False
            if not alive:
                del self._maps[key]

    def forget(self, pid: int) -> None:
        """Drop cached mappings of ``pid`` (it died). Tensors still viewing them keep the
        memory; nothing new is read through them."""
        with self.lock:
            for key in [k for k in self._maps if k[0] == pid]:
                del self._maps[key]

    def count(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        with self.lock:
            self._maps.clear()
