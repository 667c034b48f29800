import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# pytest-xdist (make test): each worker compiles into its own Inductor cache directory. Two processes building
# the same C++ kernel in one directory race: a worker loaded the other's half-written .so ("undefined symbol").
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir(), f"xdist-{_WORKER}")

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles AOTInductor packages or Inductor graphs (minutes on 2 CPU cores)")
