"""train_accelerate.py end to end: 2-process adaptive run, kill-and-resume, bad input (offline, CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cadmtl.training.launch import reset_accelerate_state
from dataset_scripts.make_demo import build_demo_dataset
from dataset_scripts.taxonomy import load_taxonomy

REPO_ROOT = Path(__file__).resolve().parents[2]

TRAIN_SCRIPT = str(REPO_ROOT / "train_accelerate.py")
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# A short, fast run on a small demo dataset: 64 px images, tiny backbone, CoBa updating every 2 steps.
FAST = [
    "--cls_image_size", "64", "--det_image_size", "64", "--seg_image_size", "64",
    "--batch_size", "4", "--cls_batch_size", "4", "--eval_batch_size", "8", "--coba_val_batch_size", "4",
    "--coba_every", "2", "--coba_warmup_steps", "3", "--coba_history_length", "4",
    "--warmup_steps", "2", "--freeze_steps", "2", "--logging_steps", "2", "--shuffle_buffer", "16",
]  # fmt: skip


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "cad100k-mini"
    build_demo_dataset(folder, train=16, validation=8, test=8)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")


def run_main(argv: list[str]) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import train_accelerate
    finally:
        sys.path.pop(0)
    return train_accelerate.main(argv)


@pytest.mark.slow
def test_two_process_adaptive_run_draws_the_same_tasks_on_every_rank(
    small_demo: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        TRAIN_SCRIPT, "--dataset", str(small_demo), "--output_dir", str(output), "--max_steps", "12",
        "--max_eval_batches", "1", *FAST,
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "2 processes" in completed.stderr
    rank0 = (output / "logs" / "tasks_rank0.txt").read_text().split("\n")
    rank1 = (output / "logs" / "tasks_rank1.txt").read_text().split("\n")
    assert rank0 == rank1 and len([line for line in rank0 if line]) == 12
    assert len({line.split()[1] for line in rank0 if line}) >= 2  # the scheduler did mix tasks
    summary = json.loads((output / "eval_results.json").read_text())
    assert summary["steps"] == 12 and summary["paradigm"] == "adaptive"
    assert summary["weighting"]["name"] == "coba"
    assert abs(sum(summary["weighting"]["weights"].values()) - 1) < 1e-6
    assert {"chassis_cls", "exterior_det", "exterior_seg"} <= set(summary["results"])
    assert (output / "model" / "model.safetensors").exists() and (output / "training_curves.png").exists()
    records = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("coba/weight/cls" in r and "scheduler/prob/det" in r for r in records)


def registered_state(checkpoint: Path, name: str) -> object:
    """The saved state of the object registered as `name` in a checkpoint, found through its objects index."""
    from cadmtl.training.checkpoint import OBJECTS_INDEX

    index = json.loads((checkpoint / OBJECTS_INDEX).read_text())
    return torch.load(checkpoint / index[name], weights_only=False)


def checkpoint_state(checkpoint: Path) -> dict:
    """The weighting's state, the loop counters and the model weights of a checkpoint written by save_state."""
    from safetensors.torch import load_file

    return {
        "weighting": registered_state(checkpoint, "weighting"),
        "loop": registered_state(checkpoint, "loop"),
        "weights": load_file(checkpoint / "model.safetensors"),
    }


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(small_demo: Path, tmp_path: Path) -> None:
    args = [
        TRAIN_SCRIPT, "--dataset", str(small_demo), "--max_steps", "16", "--save_every", "4",
        "--save_total_limit", "10", "--max_eval_batches", "1", "--test_split", "None", *FAST,
    ]  # fmt: skip
    env = cpu_env()
    uninterrupted = tmp_path / "uninterrupted"
    completed = subprocess.run(
        [sys.executable, *args, "--output_dir", str(uninterrupted)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, *args, "--output_dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_8").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()  # it really died before the end

    resumed = subprocess.run(
        [sys.executable, *args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr
    expected = checkpoint_state(uninterrupted / "checkpoints" / "step_16")
    actual = checkpoint_state(killed / "checkpoints" / "step_16")
    assert actual["loop"]["step"] == expected["loop"]["step"] == 16
    assert actual["weighting"] == expected["weighting"]
    for name, tensor in expected["weights"].items():
        torch.testing.assert_close(actual["weights"][name], tensor, rtol=0, atol=0, msg=name)


def test_unknown_dataset_config_is_a_clear_error(
    small_demo: Path, tmp_path: Path, fresh_accelerate_state
) -> None:
    with pytest.raises(ValueError, match=r"has no config \['nope_det'\]; available configs: \["):
        run_main(
            ["--dataset", str(small_demo), "--output_dir", str(tmp_path), "--det_configs", "nope_det", *FAST]
        )


def test_unknown_task_or_paradigm_is_a_clear_error(small_demo: Path, tmp_path: Path) -> None:
    common = ["--dataset", str(small_demo), "--output_dir", str(tmp_path)]
    with pytest.raises(
        ValueError, match=r"single paradigm needs single_task in \('cls', 'det', 'seg'\), got 'depth'"
    ):
        run_main([*common, "--paradigm", "single", "--single_task", "depth"])
    with pytest.raises(
        ValueError, match=r"paradigm must be one of \('single', 'base', 'adaptive'\), got 'coba'"
    ):
        run_main([*common, "--paradigm", "coba"])


def test_config_of_the_wrong_task_is_a_clear_error(small_demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cls_configs lists 'exterior_det', which is not a cls config"):
        run_main(
            ["--dataset", str(small_demo), "--output_dir", str(tmp_path), "--cls_configs", "exterior_det"]
        )


def test_label_set_differing_from_the_model_is_a_clear_error(
    small_demo: Path, tmp_path: Path, fresh_accelerate_state
) -> None:
    from cadmtl.testing import tiny_cadmtl_config
    from modeling_cadmtl import CadMtlModel

    CadMtlModel(tiny_cadmtl_config()).save_pretrained(tmp_path / "other-model")
    with pytest.raises(ValueError, match=r"has cls labels .* that the model does not know"):
        run_main(
            [
                "--dataset",
                str(small_demo),
                "--output_dir",
                str(tmp_path / "run"),
                "--model_name_or_path",
                str(tmp_path / "other-model"),
                *FAST,
            ]
        )


@pytest.mark.slow
def test_empty_split_is_a_clear_error(small_demo: Path, tmp_path: Path, fresh_accelerate_state) -> None:
    dataset = tmp_path / "dataset"
    subprocess.run(["cp", "-r", str(small_demo), str(dataset)], check=True)
    shards = sorted((dataset / "exterior_seg").glob("validation-*.parquet"))
    schema = pq.read_schema(shards[0])
    for shard in shards:
        shard.unlink()
    pq.write_table(
        pa.Table.from_pylist([], schema=schema),
        dataset / "exterior_seg" / "validation-00000-of-00001.parquet",
    )
    # Keep the dataset card consistent with the now empty split.
    _, front_matter, body = (dataset / "README.md").read_text().split("---\n", 2)
    card = yaml.safe_load(front_matter)
    for info in card["dataset_info"]:
        for split in info["splits"] if info["config_name"] == "exterior_seg" else []:
            if split["name"] == "validation":
                split["num_examples"], split["num_bytes"] = 0, 0
    (dataset / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n{body}")
    with pytest.raises(ValueError, match="split 'validation' of config 'exterior_seg' is empty"):
        run_main(
            ["--dataset", str(dataset), "--output_dir", str(tmp_path / "run"), "--max_steps", "2", *FAST]
        )


@pytest.mark.slow
def test_nan_losses_are_skipped_then_stop_the_run(
    small_demo: Path, tmp_path: Path, fresh_accelerate_state, monkeypatch
) -> None:
    from modeling_cadmtl import CadMtlModel

    original = CadMtlModel.forward

    def nan_forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        if self.training and outputs.loss is not None:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(CadMtlModel, "forward", nan_forward)
    output = tmp_path / "run"
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a NaN or infinite loss"):
        run_main(
            [
                "--dataset",
                str(small_demo),
                "--output_dir",
                str(output),
                "--max_steps",
                "10",
                "--max_consecutive_nonfinite",
                "3",
                "--paradigm",
                "base",
                *FAST,
            ]
        )
    assert not (output / "model").exists()  # nothing half-written


@pytest.mark.slow
def test_checkpoint_of_a_different_model_is_refused(
    small_demo: Path, tmp_path: Path, fresh_accelerate_state
) -> None:
    output = tmp_path / "run"
    common = ["--dataset", str(small_demo), "--output_dir", str(output), "--max_eval_batches", "1", *FAST]
    run_main([*common, "--max_steps", "2", "--save_every", "2", "--paradigm", "base", "--test_split", "None"])
    reset_accelerate_state()
    with pytest.raises(
        ValueError, match="belongs to a different model: neck_channels is 128 there and 64 here"
    ):
        run_main([*common, "--max_steps", "4", "--neck_channels", "64", "--resume_from_checkpoint", "latest"])


@pytest.mark.slow
def test_two_process_gradient_method_run_keeps_the_replicas_equal(small_demo: Path, tmp_path: Path) -> None:
    """PCGrad with every task per step on 2 CPU processes: per-task gradients all-reduced by hand, one step."""
    output = tmp_path / "run"
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        TRAIN_SCRIPT, "--dataset", str(small_demo), "--output_dir", str(output), "--max_steps", "4",
        "--weighting", "pcgrad", "--all_tasks_per_step", "--save_every", "4", "--test_split", "None",
        "--max_eval_batches", "1", *FAST,
    ]  # fmt: skip
    completed = subprocess.run(
        command, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads((output / "eval_results.json").read_text())
    assert summary["weighting"]["name"] == "pcgrad" and summary["nonfinite_steps"] == 0
    records = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss/cls", "loss/det", "loss/seg"} <= set(r) for r in records if "lr" in r)
    assert any("pcgrad/pcgrad/conflicts" in r for r in records)
    rank0 = (output / "logs" / "tasks_rank0.txt").read_text().split()
    assert rank0[1::2] == ["cls,det,seg"] * 4
    assert registered_pcgrad_calls(output / "checkpoints" / "step_4") == 4


def registered_pcgrad_calls(checkpoint: Path) -> int:
    return int(registered_state(checkpoint, "weighting")["num_combined"])


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["famo", "cagrad", "aligned_mtl"])
def test_every_weighting_method_trains_in_the_loop(
    small_demo: Path, tmp_path: Path, fresh_accelerate_state, weighting: str
) -> None:
    argv = [
        "--dataset", str(small_demo), "--output_dir", str(tmp_path / weighting), "--max_steps", "3",
        "--weighting", weighting, "--all_tasks_per_step", "--test_split", "None", "--max_eval_batches", "1",
        *FAST,
    ]  # fmt: skip
    summary = run_main(argv)
    assert (
        summary["weighting"]["name"] == weighting
        and summary["steps"] == 3
        and summary["nonfinite_steps"] == 0
    )
    assert abs(sum(summary["weighting"]["weights"].values()) - 1) < 1e-6


def read_results_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved model folder, under the module's own parameter names."""
    from modeling_cadmtl import CadMtlModel

    return CadMtlModel.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_patience_stops_early_and_best_model_is_kept(small_demo: Path, tmp_path: Path) -> None:
    """Learning rate 0: every evaluation ties the first, so patience 2 stops after the evaluation of step 6."""
    from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

    output = tmp_path / "run"
    (output / "best").mkdir(parents=True)  # a stale best/ of an earlier run in the same folder is dropped
    argv = [
        "--dataset", str(small_demo), "--output_dir", str(output), "--max_steps", "20", "--paradigm", "base",
        "--learning_rate", "0", "--eval_every", "2", "--patience", "2", "--load_best_model_at_end",
        "--max_eval_batches", "1", "--test_split", "None", *FAST,
    ]  # fmt: skip
    summary = run_main(argv)
    assert summary["steps"] == 6
    rows = read_results_csv(output / "results.csv")
    assert [r["step"] for r in rows] == ["2", "4", "6"] and [r["is_best"] for r in rows] == ["1", "0", "0"]
    assert len({r["fitness"] for r in rows}) == 1 and 0 <= float(rows[0]["fitness"]) <= 1
    assert {"train/cls_loss", "train/det_loss", "train/seg_loss", "time"} <= set(rows[0])
    assert {"metrics/chassis_cls/acc@1", "metrics/exterior_det/AP", "metrics/exterior_seg/mIoU"} <= set(
        rows[0]
    )
    assert float(rows[0]["time"]) < float(rows[2]["time"])
    info = json.loads((output / "best" / "best.json").read_text())
    assert info["step"] == 2 and info["metric_for_best_model"] == "mean_primary" and not info["ema"]
    assert info["value"] == pytest.approx(float(rows[0]["fitness"]))
    best = CadMtlModel.from_pretrained(output / "best")
    final_config = CadMtlModel.from_pretrained(output / "model").config
    assert best.config.cls_labels == final_config.cls_labels
    # config.json records the generated demo repo it was trained on (the app says so above its results)
    assert final_config.training_data["repo"] == str(small_demo) and final_config.training_data["generated"]
    assert sorted(final_config.training_data["configs"]) == sorted(load_taxonomy().config_names())
    assert CadMtlImageProcessor.from_pretrained(output / "best").task_sizes == {
        "cls": 64,
        "det": 64,
        "seg": 64,
    }
    assert (output / "best" / "README.md").exists()
    final, kept = safetensors_weights(output / "model"), safetensors_weights(output / "best")
    assert final.keys() == kept.keys()
    for name, tensor in kept.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_resumed_exactly(small_demo: Path, tmp_path: Path) -> None:
    """best/ and model/ hold the EMA weights; resuming from step 4 ends with the same EMA as the uninterrupted run."""
    common = [
        "--dataset", str(small_demo), "--max_steps", "8", "--eval_every", "4", "--save_every", "4",
        "--save_total_limit", "10", "--ema_decay", "0.5", "--paradigm", "base", "--max_eval_batches", "1",
        "--test_split", "None", *FAST,
    ]  # fmt: skip
    uninterrupted = tmp_path / "uninterrupted"
    run_main([*common, "--output_dir", str(uninterrupted), "--load_best_model_at_end"])
    rows = read_results_csv(uninterrupted / "results.csv")
    assert [r["step"] for r in rows] == ["4", "8"]
    best_step = json.loads((uninterrupted / "best" / "best.json").read_text())["step"]
    assert [r["step"] for r in rows if r["is_best"] == "1"][-1] == str(best_step)

    def ema_weights(step: int) -> dict[str, torch.Tensor]:
        state = registered_state(uninterrupted / "checkpoints" / f"step_{step}", "ema")
        assert int(state["n_averaged"]) == step  # one update per optimizer step
        return {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}

    # best/ (and model/, load_best_model_at_end) hold the EMA of the best step, in fp32, not the raw weights.
    best, final = model_weights(uninterrupted / "best"), model_weights(uninterrupted / "model")
    ema = ema_weights(best_step)
    raw = safetensors_weights(uninterrupted / "checkpoints" / f"step_{best_step}")
    assert best.keys() == ema.keys()
    for name, tensor in best.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, ema[name].cpu(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(raw[name], best[name]) for name in raw)

    reset_accelerate_state()
    resumed = tmp_path / "resumed"
    checkpoint_4 = str(uninterrupted / "checkpoints" / "step_4")
    run_main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", checkpoint_4])
    expected = registered_state(uninterrupted / "checkpoints" / "step_8", "ema")
    actual = registered_state(resumed / "checkpoints" / "step_8", "ema")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    assert registered_state(resumed / "checkpoints" / "step_8", "best")["evaluations"] == 2
    # Without load_best_model_at_end, model/ ships the final EMA.
    for name, tensor in model_weights(resumed / "model").items():
        torch.testing.assert_close(tensor, ema_weights(8)[name].cpu(), rtol=0, atol=0, msg=name)
    resumed_rows = read_results_csv(resumed / "results.csv")
    assert [r["step"] for r in resumed_rows] == ["8"]
    assert resumed_rows[0]["fitness"] == rows[1]["fitness"]
