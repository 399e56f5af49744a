"""Shared-memory segments: memfd files, their mappings, and the owner's pool of blocks.

Box in the data flow: ``put`` asks the pool for a block, copies bytes into it, and the ref
names (segment fd, inode, offset, the segment's window of the file); ``get`` in another
process opens ``/proc/<owner>/fd/<fd>`` once per window, checks the inode, maps the window
and closes the fd again, keeping the mapping in a per-process cache.

Segments are windows of ``memfd_create`` files (mode 0600): no ``/dev/shm`` entry to leak and
no size cap from a small ``/dev/shm``; the kernel frees them with the last fd and mapping, so
a SIGKILL of any process leaves nothing behind. Small blocks come from arenas (a file each);
large blocks share a few files (``LARGE_FILE_BLOCKS`` windows each), so that an owner's
descriptors do not grow with its number of large objects. Mappings are made with libc's
``mmap`` (Python's keeps a duplicate fd per mapping) and unmapped when the last tensor viewing
them goes. See docs/design.md.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import threading
from typing import Any

import torch

from torchactors.errors import StoreFullError

logger = logging.getLogger(__name__)

ALIGN = 64                      # every block starts on a cache line
MIN_CLASS = 256                 # smallest block
SMALL_LIMIT = 16 << 20          # blocks up to this size come from shared arenas
ARENA_SIZE = 64 << 20           # arena segment size for small blocks
LARGE_FILE_BLOCKS = 16          # large-block windows per memfd: fds grow 16x slower than objects
LARGE_FILE_SPAN = 1 << 30       # ... and at most this many bytes of windows per file
MAX_CACHED_MAPPINGS = 512       # windows of other processes kept mapped for reuse ...
MAX_CACHED_BYTES = 2 << 30      # ... and their bytes of address space (oldest dropped first)
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PUNCH_HOLE = 0x02 | 0x01       # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


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


def _limit(which: int) -> str:
    soft, _ = resource.getrlimit(which)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def fd_limit_error(requested: int, used: int, capacity: int) -> StoreFullError:
    return StoreFullError(requested, used, capacity,
                          f"this process reached its open-file limit (RLIMIT_NOFILE = {_limit(resource.RLIMIT_NOFILE)}"
                          f" descriptors): raise it with `ulimit -n 65536` in the shell that starts the job, or "
                          f"resource.setrlimit(resource.RLIMIT_NOFILE, ...) at the start of the program")


def map_error(requested: int, used: int, capacity: int, err: int) -> StoreFullError:
    return StoreFullError(requested, used, capacity,
                          f"cannot map {requested} bytes of shared memory ({os.strerror(err)}): the address space "
                          f"of this process is limited (RLIMIT_AS = {_limit(resource.RLIMIT_AS)} bytes, `ulimit -v`);"
                          f" raise it or lower store_capacity")


class Mapping:
    """A libc ``mmap`` of a file window. Costs no descriptor; unmapped when the last Python
    object referring to it (a segment, a buffer, a tensor's storage) goes."""

    __slots__ = ("addr", "size", "__weakref__")

    def __init__(self, fd: int, size: int, file_off: int, populate: bool, writable: bool = True) -> None:
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, size, prot, flags, fd, file_off)
        if addr is None or addr == _MAP_FAILED:
            self.size = 0
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.addr = addr
        self.size = size

    def buffer(self, ctype: Any = ctypes.c_char) -> Any:
        """A ctypes array over the mapping (typed Any: callers hang attributes on it)."""
        buf = (ctype * (self.size // ctypes.sizeof(ctype))).from_address(self.addr)
        buf.mapping = self          # the buffer (and what views it) keeps the mapping
        return buf

    def __del__(self) -> None:
        if self.size:
            _libc.munmap(self.addr, self.size)


class DataFile:
    """A memfd of this process holding one or more segment windows."""

    __slots__ = ("fd", "inode", "top", "windows", "free_ranges", "max_windows")

    def __init__(self, name: str, max_windows: int) -> None:
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _FdLimit() from e
            raise
        os.fchmod(fd, 0o600)
        self.fd = fd
        self.inode = os.fstat(fd).st_ino
        self.top = 0                # end of the windows carved so far
        self.windows = 0            # live windows
        self.free_ranges: dict[int, list[int]] = {}     # size -> file offsets of dropped windows
        self.max_windows = max_windows

    def take(self, size: int) -> int | None:
        """A file offset for a new window of ``size`` bytes, or None if the file is full."""
        free = self.free_ranges.get(size)
        if free:
            off = free.pop()
        elif self.windows < self.max_windows and (self.top == 0 or self.top + size <= LARGE_FILE_SPAN):
            off = self.top
            self.top += size
            os.ftruncate(self.fd, self.top)
        else:
            return None
        self.windows += 1
        return off

    def give_back(self, off: int, size: int) -> None:
        """Free a window's memory now (its pages leave every process's mapping of it)."""
        _libc.fallocate(self.fd, _PUNCH_HOLE, off, size)
        self.free_ranges.setdefault(size, []).append(off)
        self.windows -= 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _FdLimit(Exception):
    """memfd_create hit the descriptor limit (turned into a StoreFullError by the pool)."""


class Segment:
    """One window of a memfd file mapped in this process. In the owner, the file's fd stays
    open while the window lives so that peers can open it through /proc/<pid>/fd/<fd>."""

    __slots__ = ("seg_id", "fd", "size", "inode", "file_off", "file", "mm", "base", "owned", "live_blocks",
                 "__weakref__")

    def __init__(self, seg_id: int, size: int, fd: int, inode: int, file_off: int = 0,
                 file: DataFile | None = None, populate: bool = True) -> None:
        self.seg_id = seg_id
        self.owned = file is not None
        self.file = file
        self.fd = fd
        self.inode = inode
        self.size = size
        self.file_off = file_off
        self.mm = Mapping(fd, size, file_off, populate).buffer()
        self.base = ctypes.addressof(self.mm)
        self.live_blocks = 0

    def close(self) -> None:
        """Drop this process's handle; memory stays mapped for tensors still viewing it."""
        self.fd = -1


class OwnSegment(Segment):
    """A window on a memfd of its own, outside the pool's capacity and free lists: a queue's
    ring or a weights channel's header, which live as long as their object. Closing it closes
    the file (peers that mapped it keep their mappings)."""

    __slots__ = ()

    def __init__(self, tag: str, size: int) -> None:
        file = DataFile(f"torchactors-{os.getpid()}-{tag}", 1)
        try:
            file.take(size)
            super().__init__(0, size, file.fd, file.inode, 0, file, populate=False)
        except BaseException:
            file.close()
            raise

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


class SharedFile:
    """A storage torch already shares through an fd (``share_memory_()``): peers open that fd
    as they open a segment's, and the owner reads the storage itself. No mapping, no new fd."""

    __slots__ = ("fd", "inode", "size")
    file_off = 0

    def __init__(self, fd: int, inode: int, size: int) -> None:
        self.fd = fd
        self.inode = inode
        self.size = size


def shared_file(storage: torch.UntypedStorage) -> SharedFile | None:
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
        self._arena: Segment | None = None
        self._arena_top = 0
        self._large_files: list[DataFile] = []
        self.reserved = 0           # bytes of all segments we hold (live blocks + pooled free ones)
        self.used = 0               # bytes of live blocks

    def _new_segment(self, size: int) -> Segment:
        """A new window: an arena gets a file of its own, a large block a window of a shared
        large file. Raises StoreFullError at the descriptor or address-space limit."""
        name = f"torchactors-{os.getpid()}-{self._next_seg}"
        try:
            if size == self.arena_size:
                file, off = DataFile(name, 1), 0
                file.take(size)
            else:
                file, off = self._large_window(name, size)
            try:
                seg = Segment(self._next_seg, size, file.fd, file.inode, off, file)
            except OSError as e:
                self._release_window(file, off, size)
                raise map_error(size, self.used, self.capacity, e.errno or errno.ENOMEM) from None
        except _FdLimit:
            raise fd_limit_error(size, self.used, self.capacity) from None
        self._next_seg += 1
        self.segments[seg.seg_id] = seg
        self.reserved += size
        logger.debug("new segment %d of %d bytes (fd %d; %d of %d bytes reserved)", seg.seg_id, size, seg.fd,
                     self.reserved, self.capacity)
        return seg

    def _large_window(self, name: str, size: int) -> tuple[DataFile, int]:
        for file in self._large_files:
            off = file.take(size)
            if off is not None:
                return file, off
        file = DataFile(name, LARGE_FILE_BLOCKS)
        self._large_files.append(file)
        off = file.take(size)
        assert off is not None, "a new file always has room for its first window"
        return file, off

    def _release_window(self, file: DataFile, off: int, size: int) -> None:
        file.give_back(off, size)
        if file.windows == 0:
            if file in self._large_files:
                self._large_files.remove(file)
            file.close()

    def _drop_segment(self, seg: Segment) -> None:
        assert seg.file is not None, "only the pool's own segments are dropped"
        del self.segments[seg.seg_id]
        self.reserved -= seg.size
        self._release_window(seg.file, seg.file_off, seg.size)
        seg.close()

    def allocate(self, nbytes: int, cls: int = 0) -> tuple[Segment, int, int] | None:
        """Return (segment, offset, block size) or None if the capacity would be exceeded
        (``cls``: ``size_class(nbytes)`` if the caller has it)."""
        cls = cls or size_class(nbytes)
        with self.lock:
            if cls <= self.small_limit:
                found = self._alloc_small(cls)
            else:
                found = self._alloc_large(cls)
            if found is not None:
                found[0].live_blocks += 1
                self.used += cls
            return found

    def _alloc_small(self, cls: int) -> tuple[Segment, int, int] | None:
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

    def _alloc_large(self, cls: int) -> tuple[Segment, int, int] | None:
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
                small = self._free_small.get(cls)
                if small is None:
                    small = self._free_small[cls] = []
                small.append((seg, offset))
            else:
                large = self._free_large.get(cls)
                if large is None:
                    large = self._free_large[cls] = []
                large.append(seg)

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
                for cls, blocks in self._free_small.items():
                    self._free_small[cls] = [(s, o) for s, o in blocks if s is not seg]
                if seg is self._arena:
                    self._arena = None
                self._drop_segment(seg)
        return self.reserved + need <= self.capacity

    def close(self) -> None:
        with self.lock:
            for seg in list(self.segments.values()):
                self._drop_segment(seg)
            for file in self._large_files:
                file.close()
            self._large_files.clear()
            self._free_small.clear()
            self._free_large.clear()
            self._arena = None
            self.used = 0


class MappingCache:
    """Windows of other processes' files mapped into this one, opened once and reused: a
    segment holding many objects costs one mapping per process, however many objects are read.
    Holds no descriptors. Bounded: the oldest windows are dropped from the cache first (a
    tensor still viewing one keeps it mapped), and a dead process's windows are dropped at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._maps: dict[tuple[int, int, int, int], Segment] = {}   # (pid, fd, inode, file offset)
        self._bytes = 0

    def map(self, pid: int, fd: int, inode: int, file_off: int, size: int) -> Segment | None:
        """The window, or None if the owner no longer has that file open (freed, or dead)."""
        key = (pid, fd, inode, file_off)
        seg = self._maps.get(key)
        if seg is not None and seg.size >= size:
            return seg
        with self.lock:
            seg = self._maps.get(key)
            if seg is not None and seg.size >= size:
                return seg
            try:
                local = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    raise fd_limit_error(size, 0, 0) from None
                return None
            try:
                st = os.fstat(local)
                if st.st_ino != inode or file_off + size > st.st_size:
                    return None
                try:
                    seg = Segment(0, size, local, inode, file_off, populate=False)
                except OSError as e:
                    if e.errno == errno.ENOMEM:
                        raise map_error(size, 0, 0, e.errno) from None
                    raise ValueError(f"cannot map {size} bytes at offset {file_off} of process {pid}'s fd {fd}: "
                                     f"{e.strerror}") from None
            finally:
                os.close(local)     # the mapping needs no descriptor
            seg.fd = fd
            old = self._maps.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._maps[key] = seg
            self._bytes += size
            while len(self._maps) > MAX_CACHED_MAPPINGS or self._bytes > MAX_CACHED_BYTES:
                oldest = next(iter(self._maps))
                self._bytes -= self._maps.pop(oldest).size
            return seg

    def forget(self, pid: int) -> None:
        """Drop cached mappings of ``pid`` (it died). Tensors still viewing them keep their
        own window mapped; nothing new is read through them."""
        with self.lock:
            for key in [k for k in self._maps if k[0] == pid]:
                self._bytes -= self._maps.pop(key).size

    def count(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        with self.lock:
            self._maps.clear()
            self._bytes = 0
