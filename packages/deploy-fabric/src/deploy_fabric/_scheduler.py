"""Placement of processes on nodes by free memory and CPU."""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy_core import Resources

__all__ = ["Node", "Scheduler"]


@dataclass
class Node:
    """A machine that runs processes, with its total capacity and what is in use."""

    name: str
    capacity: Resources
    used: Resources = field(default_factory=lambda: Resources(0, 0))

    @property
    def free(self) -> Resources:
        return self.capacity - self.used


class Scheduler:
    """Chooses a node for each request; the caller queues what does not fit yet.

    ``absent`` are nodes expected but not up (a cluster's listed workers that are down):
    nothing is placed on them, but a request only they could hold is not impossible, it
    waits for them.
    """

    def __init__(self, nodes: list[Node], absent: list[Node] | None = None):
        if not nodes:
            raise ValueError("a scheduler needs at least one node")
        self.nodes = nodes
        self.absent = [] if absent is None else absent

    def impossible(self, request: Resources) -> str | None:
        """Why no node could ever hold ``request`` (even empty), or None if one could."""
        every = [*self.nodes, *self.absent]
        if any(request.fits_in(node.capacity) for node in every):
            return None
        biggest = max(every, key=lambda node: (int(node.capacity.mem), node.capacity.cpu.micros))
        return f"no node can hold {request}: the largest, {biggest.name}, has {biggest.capacity} in all"

    def place(self, request: Resources) -> Node | None:
        """Reserve ``request`` on the node with the most free memory that fits it, or None."""
        fitting = [node for node in self.nodes if request.fits_in(node.free)]
        if not fitting:
            return None
        node = max(fitting, key=lambda node: (int(node.free.mem), node.free.cpu.micros))
        node.used = node.used + request
        return node

    def release(self, node: Node, request: Resources) -> None:
        node.used = node.used - request

    def describe_free(self) -> str:
        return "; ".join(f"{node.name} has {node.free} free" for node in self.nodes)
