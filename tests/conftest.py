import os

import pytest
import torch

# Test tensors are tiny: one intra-op thread per test process is faster than two competing
# ones, and `make test` runs one process per core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh random inputs; the seed is printed so a failure can be rerun
    with SUBQ_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SUBQ_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"SUBQ_TEST_SEED={seed}")
    yield seed
