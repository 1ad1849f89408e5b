"""Every random stream of a process, captured and restored in one place.

A resumed run draws the same numbers as an uninterrupted one only if all of them come back:
python `random`, numpy's global RNG, torch's CPU and CUDA default generators, and the loop's
own named torch.Generators. Restore them LAST: anything drawn after them shifts the streams.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch

from personalize.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class RngState:
    """Every random stream of one process: python `random`, numpy's global RNG, torch's CPU and
    CUDA default generators, and the loop's own torch.Generators by name."""

    python: tuple
    numpy: tuple
    torch_cpu: torch.Tensor  # uint8
    torch_cuda: list[torch.Tensor] = field(default_factory=list)  # one uint8 state per device
    generators: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> uint8 state

    def to_json(self) -> dict[str, Any]:
        """The non-tensor part (python and numpy states) as plain JSON."""
        version, internal, gauss_next = self.python
        kind, keys, pos, has_gauss, cached = self.numpy
        return {
            "python": [version, list(internal), gauss_next],
            "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        }

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}torch_cpu": self.torch_cpu}
        out.update({f"{prefix}torch_cuda/{i}": s for i, s in enumerate(self.torch_cuda)})
        out.update({f"{prefix}generator/{name}": s for name, s in self.generators.items()})
        return out

    @classmethod
    def from_parts(cls, js: dict[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str) -> "RngState":
        version, internal, gauss_next = js["python"]
        kind, keys, pos, has_gauss, cached = js["numpy"]
        cuda: dict[int, torch.Tensor] = {}
        gens: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if rest.startswith("torch_cuda/"):
                cuda[int(rest.split("/", 1)[1])] = value
            elif rest.startswith("generator/"):
                gens[rest.split("/", 1)[1]] = value
        return cls(
            python=(int(version), tuple(int(x) for x in internal), gauss_next),
            numpy=(kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
            torch_cpu=tensors[f"{prefix}torch_cpu"],
            torch_cuda=[cuda[i] for i in sorted(cuda)],
            generators=gens,
        )


def capture_rng(generators: Optional[Mapping[str, torch.Generator]] = None) -> RngState:
    """Snapshot every random stream of this process (call it on each rank)."""
    return RngState(
        python=random.getstate(),
        numpy=np.random.get_state(legacy=True),
        torch_cpu=torch.get_rng_state().clone(),
        torch_cuda=[s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        generators={name: g.get_state().clone() for name, g in (generators or {}).items()},
    )


def restore_rng(
    states: list[RngState],
    generators: Optional[Mapping[str, torch.Generator]] = None,
    rank: int = 0,
) -> None:
    """Put every random stream of this process back where it was when `states` were captured
    (one `RngState` per rank, as a checkpoint holds them).

    `generators` are the loop's freshly built torch.Generators under the names they were saved
    with; their states are overwritten in place. The names must match the checkpoint's exactly:
    a stream saved but not restored (or the reverse) would silently break reproducibility.
    """
    if not states:
        raise CheckpointError("the checkpoint holds no RNG state")
    if rank >= len(states):
        raise CheckpointError(
            f"the checkpoint holds RNG states for {len(states)} process(es), none for rank {rank} "
            "(resuming with more processes than the run that saved it)"
        )
    state = states[rank]
    given = dict(generators or {})
    if set(given) != set(state.generators):
        raise CheckpointError(
            f"generators to restore {sorted(given)} differ from the checkpoint's {sorted(state.generators)}"
        )
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu)
    if torch.cuda.is_available() and state.torch_cuda:
        n = torch.cuda.device_count()
        if n != len(state.torch_cuda):
            log.warning("checkpoint has CUDA RNG states for %d device(s), this pod has %d", len(state.torch_cuda), n)
        for device, s in enumerate(state.torch_cuda[:n]):
            torch.cuda.set_rng_state(s, device)
    for name, g in given.items():
        g.set_state(state.generators[name])
