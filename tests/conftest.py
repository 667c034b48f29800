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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide AcceleratorState: the first Accelerator's settings (a Trainer's, an
    SFTConfig's default bf16 mixed precision) stay for every later Accelerator() that does not name them. A test
    that left bf16 there made a later float32 loop autocast (test_accelerate read a 2.5e-5 relative loss gap)."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles AOTInductor packages or Inductor graphs (minutes on 2 CPU cores)")
    config.addinivalue_line("markers", "real_capture: every capture runs torch.export, never the capture memo "
                                       "(tests of what capture itself does to the model and its inputs)")


def pytest_collection_modifyitems(config, items):
    """Heaviest test files first (tests/durations.py), for pytest-xdist's whole-file scheduling."""
    from durations import heaviest_first, load

    items[:] = heaviest_first(items, load())


def _memoise_captures():
    """Captures shared across tests (tests/capture_memo.py); AC_TEST_CAPTURE_MEMO=0 turns it off."""
    from adapt_compiler import pipeline
    from capture_memo import memoised

    pipeline._capture = memoised(pipeline._capture)


_memoise_captures()


@pytest.fixture(autouse=True, scope="module")
def _real_captures_in_marked_modules(request):
    import capture_memo

    marked = request.node.get_closest_marker("real_capture") is not None  # the module's pytestmark
    saved, capture_memo.ENABLED = capture_memo.ENABLED, capture_memo.ENABLED and not marked
    yield
    capture_memo.ENABLED = saved


@pytest.fixture(autouse=True)
def _real_captures_in_marked_tests(request, monkeypatch):
    import capture_memo

    if request.node.get_closest_marker("real_capture"):
        monkeypatch.setattr(capture_memo, "ENABLED", False)


def pytest_terminal_summary(terminalreporter):
    from capture_memo import ENABLED, STATS

    if ENABLED and any(STATS.values()):
        terminalreporter.write_line(f"capture memo (this process): {STATS}")
