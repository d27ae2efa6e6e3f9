"""Fixtures shared by every test folder. Tiny model configs live in `cadmtl.testing` (importable helpers)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cadmtl.testing import tiny_cadmtl_config, tiny_vit_config
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


@pytest.fixture(scope="session")
def tiny_dense_scorer() -> Callable[..., torch.nn.Module]:
    """A builder of the fullest tiny patch-memory scorer, for the tests that carry every Hub-file feature through
    a boundary (remote code, ONNX): `build(bank, heldout, size, **options)` fits a dense memory of the nearest 2
    images (float16, projected search, horizontal flips) on the (N, 3, size, size) `bank`, sets a border profile
    and fits the defect head (statistics on `heldout`); `options` go to `from_backbone`."""
    from cadmtl.anomaly import PatchMemoryScorer
    from cadmtl.anomaly.defect_head import fit_defect_head
    from cadmtl.features import backbone_from_config

    def build(bank: torch.Tensor, heldout: torch.Tensor, size: int, **options) -> torch.nn.Module:
        torch.manual_seed(0)
        scorer = PatchMemoryScorer.from_backbone(
            backbone_from_config(tiny_vit_config()),
            layers=[1, 2],
            image_size=(size, size),
            neighbour_images=2,
            search_projection_dim=8,
            map_flips=["h"],
            **options,
        )
        scorer.fit(bank)
        scorer.config.border_profile = [1.5, 1.0]
        fit_defect_head(scorer, [bank], [heldout], seed=0)
        return scorer

    return build


@pytest.fixture
def tiny_config() -> CadMtlConfig:
    return tiny_cadmtl_config("vit")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """In-process training runs share Accelerate's singletons (an `Accelerator` with another mixed precision
    cannot be made in the same process): reset them after every test, so no test depends on the order."""
    yield
    reset_accelerate_state()
