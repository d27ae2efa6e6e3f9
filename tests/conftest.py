"""Fixtures shared by every test folder. Tiny model configs live in `cadmtl.testing` (importable helpers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cadmtl.testing import tiny_cadmtl_config
from cadmtl.training.launch import reset_accelerate_state
from modeling_cadmtl import CadMtlConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests run on a 2-core machine; one intra-op thread per process avoids oversubscription in multi-process tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they run fastest on one; two threads on a busy 2-core machine run ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (README, train_accelerate.py, configs)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: the real datasets (tests that need it skip when it is absent)."""
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def tiny_config() -> CadMtlConfig:
    return tiny_cadmtl_config("vit")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process training runs share Accelerate's singletons (an `Accelerator` with another mixed precision
    cannot be made in the same process): reset them after every test, so no test depends on the order."""
    yield
    reset_accelerate_state()
