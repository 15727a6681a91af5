import os

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh random inputs; the seed is printed so a failure can be rerun
    with SUBQ_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SUBQ_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"SUBQ_TEST_SEED={seed}")
    yield seed
