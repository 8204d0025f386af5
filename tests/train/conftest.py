"""Training tests run tiny models: one thread each (two contending threads on a busy 2-core
machine made a 0.7 s test take 45 s)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
