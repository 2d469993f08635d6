"""Process-wide tuning shared by the shim and the workers."""

import gc


def quiet_gc() -> None:
    """Collect garbage rarely, and never look at what start-up built again.

    A request or a batch allocates thousands of short-lived objects, almost none in cycles (reference
    counting frees them); the default thresholds run the cycle collector every few hundred allocations, and
    its full passes over a large heap are what the slowest requests wait on.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
