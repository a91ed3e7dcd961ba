"""Shared autouse fixture: run a test with one intra-op torch thread, then restore the count.

Import it into a test module (``from tests.torch_threads import one_thread  # noqa: F401``)
to apply it to every test there.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: intra-op threads only add spin-wait overhead on a loaded 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
