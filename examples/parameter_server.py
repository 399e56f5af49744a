"""An asynchronous parameter server: workers pull weights by ref and push gradients.

The server holds the model and its optimizer. Each worker loops: get the server's weights by
ref (mapped from shared memory, not copied), compute a gradient on its own data shard, push
it; the server applies gradients as they arrive (some computed on slightly stale weights).

    python examples/parameter_server.py
"""

import time

import torch
from torch import nn

import torchactors as ta

NUM_WORKERS, STEPS_PER_WORKER, BATCH = 2, 300, 256


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def make_data(seed: int, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard of a fixed nonlinear regression task (the same target function for all seeds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.linspace(-1, 1, 16)
    return x, torch.sin(x @ w).unsqueeze(1) + 0.05 * torch.randn(n, 1, generator=g)


@ta.actor(num_threads=1)
class ParameterServer:
    def __init__(self, lr: float) -> None:
        self.model = make_model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.applied = 0

    def get_weights(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def apply_gradients(self, grads: dict) -> None:
        for name, p in self.model.named_parameters():
            p.grad = grads[name].clone()  # the pushed tensors are views; copy before they go
        self.opt.step()
        self.applied += 1

    def num_applied(self) -> int:
        return self.applied


@ta.actor(num_threads=1)
class Worker:
    def __init__(self, index: int) -> None:
        self.model = make_model()
        self.x, self.y = make_data(seed=1 + index)
        self.g = torch.Generator().manual_seed(index)

    def run(self, ps, steps: int) -> float:
        """Pull, compute, push ``steps`` times; returns the last batch loss."""
        push = None
        for _ in range(steps):
            wref = ps.get_weights.remote()  # pull by ref; hold it while its views are read
            self.model.load_state_dict(ta.get(wref))
            idx = torch.randint(0, len(self.x), (BATCH,), generator=self.g)
            loss = nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])
            self.model.zero_grad()
            loss.backward()
            push = ps.apply_gradients.remote({n: p.grad for n, p in self.model.named_parameters()})
        ta.get(push)  # this caller's calls run in order: the last one done means all are
        return loss.item()


def evaluate(weights: dict) -> float:
    model = make_model()
    model.load_state_dict(weights)
    x, y = make_data(seed=0)  # a shard no worker trains on
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    ta.init(num_threads=1, store_capacity="256MiB")
    ps = ParameterServer.remote(lr=1e-2)
    workers = [Worker.remote(i) for i in range(NUM_WORKERS)]
    before = evaluate(ta.get(ps.get_weights.remote(), copy=True))
    start = time.monotonic()
    ta.get([w.run.remote(ps, STEPS_PER_WORKER) for w in workers])  # handles travel to actors
    applied = ta.get(ps.num_applied.remote())
    elapsed = time.monotonic() - start
    after = evaluate(ta.get(ps.get_weights.remote(), copy=True))
    ta.shutdown()
    print(f"parameter_server: {NUM_WORKERS} workers pushed {applied} gradients in {elapsed:.1f}s; "
          f"held-out loss {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
