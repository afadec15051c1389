"""Fixed batch-size buckets for the pose network, captured as CUDA graphs on a GPU.

A GPU forward pass of a small network is dominated by kernel launches; replaying a CUDA graph
launches the whole pass at once. Graphs need fixed shapes, so batches are padded up to the next
bucket (powers of two up to the largest batch the server forms) and every bucket is captured at
warm-up, before the service reports ready. On other devices the same padding runs eagerly (no
capture), which is how the CPU tests check it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch


def bucket_sizes(largest: int) -> list[int]:
    """Powers of two below ``largest``, then ``largest`` itself: 1, 2, 4, ..., largest."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


class BucketedForward:
    """``network(x)`` for any batch, run as a padded fixed-size bucket (a CUDA graph on CUDA)."""

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        example: torch.Tensor,
        buckets: Sequence[int],
        use_cuda_graphs: bool | None = None,
    ) -> None:
        """``example``: one input ``[1, C, H, W]`` in the network's dtype, layout and device."""
        self.network = network
        self.example = example
        self.buckets = sorted(set(buckets))
        self.use_cuda_graphs = (
            example.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        )
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._lock = threading.Lock()  # static buffers: one replay at a time

    def _static_input(self, size: int) -> torch.Tensor:
        return (
            self.example.expand(size, *self.example.shape[1:])
            .clone(memory_format=torch.preserve_format)
            .zero_()
        )

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run (and on CUDA capture) every bucket once, so no request pays for it."""
        for size in self.buckets:
            static = self._static_input(size)
            if not self.use_cuda_graphs:
                self.network(static)
                continue
            stream = torch.cuda.Stream(device=static.device)
            stream.wait_stream(torch.cuda.current_stream(static.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # cuDNN autotuning and allocator warm-up off the graph
                    self.network(static)
            torch.cuda.current_stream(static.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.network(static)
            self._inputs[size], self._outputs[size], self._graphs[size] = static, output, graph
        if self.use_cuda_graphs:
            torch.cuda.synchronize(self.example.device)

    def bucket_for(self, count: int) -> int:
        return next((size for size in self.buckets if size >= count), self.buckets[-1])

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        largest = self.buckets[-1]
        if len(inputs) > largest:  # more than the largest bucket: in bucket-sized pieces
            return torch.cat([self(piece) for piece in inputs.split(largest)])
        size, count = self.bucket_for(len(inputs)), len(inputs)
        if not self.use_cuda_graphs:
            padded = self._static_input(size)
            padded[:count].copy_(inputs)
            return self.network(padded)[:count]
        with self._lock:
            static = self._inputs[size]
            static[:count].copy_(inputs, non_blocking=True)
            static[count:].zero_()
            self._graphs[size].replay()
            return self._outputs[size][:count].clone()
