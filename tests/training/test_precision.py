"""Mixed precision: `auto` is bf16 only where the hardware computes it natively."""

from __future__ import annotations

import logging

import pytest
import torch

from cadmtl import precision
from cadmtl.anomaly.learner_training import parse_args as parse_learner_args
from cadmtl.precision import autocast_dtype, native_bf16, resolve_mixed_precision
from cadmtl.training.arguments import parse_arguments


def _cpu_with(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"), (False, False, "no")],
)
def test_auto_is_bf16_only_on_cpus_with_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: str
) -> None:
    _cpu_with(monkeypatch, amx, avx512_bf16)
    assert native_bf16() is (expected == "bf16")
    assert resolve_mixed_precision("auto") == expected


def test_a_cpu_probe_missing_from_torch_counts_as_no_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "_CPU_BF16_PROBES", ("_no_such_probe",))
    assert resolve_mixed_precision("auto") == "no"


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_mixed_precision("auto") == "no"
    # An explicit device type is asked about, not the one torch would pick.
    _cpu_with(monkeypatch, amx=True, avx512_bf16=False)
    assert resolve_mixed_precision("auto", "cpu") == "bf16"
    assert resolve_mixed_precision("auto", "mps") == "no"


def test_explicit_choices_are_kept_and_emulated_bf16_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _cpu_with(monkeypatch, amx=False, avx512_bf16=False)
    with caplog.at_level(logging.WARNING, logger="cadmtl.precision"):
        assert resolve_mixed_precision("bf16") == "bf16"
    assert "no bf16 instructions" in caplog.text and "--mixed-precision auto" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cadmtl.precision"):
        assert resolve_mixed_precision("no") == "no"
        assert resolve_mixed_precision("fp16") == "fp16"
    assert not caplog.text
    _cpu_with(monkeypatch, amx=True, avx512_bf16=True)
    with caplog.at_level(logging.WARNING, logger="cadmtl.precision"):
        assert resolve_mixed_precision("bf16") == "bf16"
    assert not caplog.text


def test_an_unknown_choice_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="auto, bf16, fp16, no; got 'fp8'"):
        resolve_mixed_precision("fp8")


def test_autocast_dtypes() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("no") is None


def test_training_and_the_learner_default_to_auto() -> None:
    _, _, train_args = parse_arguments([])
    assert train_args.mixed_precision == "auto"
    learner_args = parse_learner_args(["data/tile", "--config", "tile_ad", "--output-dir", "out"])
    assert learner_args.mixed_precision == "auto"
