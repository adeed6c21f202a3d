"""Test set-up: several forced CPU devices so that pmap code paths run."""

import os
import tempfile

import pytest

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # As main.py sets it: in-process runs equal its runs.
# Tests build the same tiny models many times (also in subprocesses): reuse compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "l2p_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_collection_modifyitems(config, items):
  """The slow tests (tens of seconds to minutes each) first, so that with `-n N --maxschedchunk=1`
  the workers start them early and the short tests fill in around them, instead of one of them
  starting last and running alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _shared_runs(tmp_path_factory, request):
  """Lets the test processes of one session share the reference runs of `run_util.train_in_process`."""
  from tests import run_util  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):  # A pytest-xdist worker: its base directory lies in the session's.
    root = root.parent
  run_util.SHARED_RUNS_DIR = str(root / "shared_runs")
