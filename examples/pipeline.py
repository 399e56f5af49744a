"""A producer/consumer pipeline over a ring of recycled shared buffers (TorchBeast-style).

K buffers are put into the store once. The driver hands a free buffer's ref to the producer,
which fills it in place (the ref arrives as a view of shared memory: no copy, no new object);
then hands the same ref to the consumer, which reads it in place; then the buffer is free
again. No tensor bytes ever go through a pipe, and the store never grows after the first K
puts. Each batch carries a checksum computed by the producer, verified by the consumer.

    python examples/pipeline.py
"""

import collections
import time

import torch

import torchactors as ta

K, BATCHES, SHAPE = 4, 500, (64, 256, 128)  # 8 MiB float32 buffers


@ta.actor(num_threads=1)
class Producer:
    def __init__(self) -> None:
        self.base = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))

    def fill(self, buf: torch.Tensor, seq: int) -> float:
        """Write batch ``seq`` into ``buf`` in place (stands in for env steps); return its checksum."""
        torch.add(self.base, seq % 1000, out=buf)
        buf[0, 0, 0] = seq  # readable tag: which batch the buffer holds
        return float(buf.sum(dtype=torch.float64))


@ta.actor(num_threads=1)
class Consumer:
    def __init__(self) -> None:
        self.total = 0.0

    def consume(self, buf: torch.Tensor, seq: int, checksum: float) -> bool:
        """Read ``buf`` in place; True if it holds batch ``seq`` intact."""
        s = float(buf.sum(dtype=torch.float64))
        self.total += s
        return int(buf[0, 0, 0]) == seq and abs(s - checksum) <= 1e-6 * abs(checksum)


def main() -> None:
    ta.init(num_threads=1, store_capacity="256MiB")
    producer, consumer = Producer.remote(), Consumer.remote()
    ring = [ta.put(torch.zeros(SHAPE)) for _ in range(K)]  # the only puts of buffer data
    free = collections.deque(range(K))
    filling, consuming = {}, {}  # result ref -> (buffer index, seq)
    produced = done = ok = 0
    start = time.monotonic()
    while done < BATCHES:
        while free and produced < BATCHES:  # keep the producer busy with every free buffer
            k = free.popleft()
            filling[producer.fill.remote(ring[k], produced)] = (k, produced)
            produced += 1
        [ref], _ = ta.wait(list(filling) + list(consuming), num_returns=1)
        if ref in filling:
            k, seq = filling.pop(ref)
            consuming[consumer.consume.remote(ring[k], seq, ta.get(ref))] = (k, seq)
        else:
            k, _ = consuming.pop(ref)
            ok += bool(ta.get(ref))
            done += 1
            free.append(k)  # recycle: the buffer goes back to the producer
    elapsed = time.monotonic() - start
    gib = BATCHES * ring_bytes(SHAPE) / 2**30
    objects = ta.stats()["objects"]
    ta.shutdown()
    print(f"pipeline: {BATCHES} batches of {ring_bytes(SHAPE) >> 20} MiB through {K} recycled buffers "
          f"in {elapsed:.1f}s ({gib / elapsed:.2f} GiB/s), {ok}/{BATCHES} intact, {objects} objects in the store")


def ring_bytes(shape: tuple) -> int:
    return 4 * shape[0] * shape[1] * shape[2]


if __name__ == "__main__":
    main()
