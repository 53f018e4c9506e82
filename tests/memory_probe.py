"""Peak CPU tensor memory of a call, from the PyTorch profiler's allocation events."""

from __future__ import annotations

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn) -> int:
    """Highest total of CPU bytes allocated and not yet freed while ``fn()`` runs.

    Every allocator call is an ``Allocation`` event (size > 0 allocates, < 0 frees); walking
    them in time order gives the live total. Memory held before the call is not counted.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
