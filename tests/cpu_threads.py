"""``with one_thread():`` torch on one CPU thread, restored after.

On 2 shared, busy cores the small tensor ops of these tests (tiny UNets, 64 px renders, a 16-cell tet grid) run
10-30x slower with 2 torch threads than with 1: the threads spin waiting for each other.
"""

from __future__ import annotations

import pytest
import torch


class one_thread:  # noqa: N801  (used like a function)
    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        torch.set_num_threads(self.before)


@pytest.fixture
def single_thread():
    """The fixture form: a module uses it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield
