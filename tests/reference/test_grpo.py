"""The vision-language path of reference-guided localisation (DifferAD-R1 with TRL), on a tiny random
Qwen2.5-VL built in memory: prompts and coordinates, the model build and 2-image generation, prediction rows,
and (slow) GRPO steps and the two commands."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from cadmtl import testing
from cadmtl.reference import command, grpo
from cadmtl.reference.answers import ParseStats
from cadmtl.reference.pairs import pair_features
from cadmtl.reference.prompts import INSTRUCTIONS, instruction_index, prompt_text
from cadmtl.reference.rewards import difficulty_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
PAIR_FEATURES = pair_features()  # the pairs config's columns, as `cadmtl reference build-pairs` writes
ANOMALY_BOX = [10.0, 12.0, 40.0, 30.0]  # in the 80 x 60 query


def make_pairs(count: int = 4, seed: int = 0) -> datasets.Dataset:
    """``count`` pairs with the pairs-config columns: a 64 x 48 reference, an 80 x 60 query; even pairs
    anomalous (a bright patch under ANOMALY_BOX), odd ones normal."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for i in range(count):
        reference = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        query = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        mask = np.zeros((60, 80), dtype=np.uint8)
        anomalous = i % 2 == 0
        if anomalous:
            query[12:30, 10:40] = 255
            mask[12:30, 10:40] = 1
        box = ANOMALY_BOX if anomalous else [0.0] * 4
        rows["pair_id"].append(f"pair-{i}")
        rows["query_id"].append(f"query-{i}")
        rows["reference_id"].append(f"reference-{i}")
        rows["reference"].append(Image.fromarray(reference))
        rows["query"].append(Image.fromarray(query))
        rows["box"].append(box)
        rows["boxes"].append([box] if anomalous else [])
        rows["mask"].append(Image.fromarray(mask))
        rows["has_anomaly"].append(anomalous)
        rows["category"].append("door")
        rows["defect_type"].append("dent" if anomalous else "good")
        rows["source"].append("synthetic")
        rows["misalignment"].append("none")
        rows["misalignment_params"].append(json.dumps({"level": "none"}))
    return datasets.Dataset.from_dict(rows, features=PAIR_FEATURES)


def write_pairs_repo(repo: Path) -> Path:
    """A pairs repo folder: 4 train pairs and 2 test pairs, laid out as `cadmtl reference build-pairs` writes."""
    (repo / "pairs").mkdir(parents=True)
    make_pairs(4, seed=1).to_parquet(str(repo / "pairs" / "train-00000-of-00001.parquet"))
    make_pairs(2, seed=2).to_parquet(str(repo / "pairs" / "test-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: pairs\n  data_files:\n  - split: train\n    path: pairs/train-*.parquet\n"
        "  - split: test\n    path: pairs/test-*.parquet\n---\n"
    )
    return repo


@pytest.fixture(scope="module")
def pairs() -> datasets.Dataset:
    return make_pairs()


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return testing.tiny_random_vlm()


# ---------------------------------------------------------------------------------------------------------
# Prompt and conversation


def test_prompt_states_the_answer_rules_and_picks_a_stable_instruction() -> None:
    text = prompt_text("pair-7")
    assert "<think></think>" in text and "<answer></answer>" in text
    assert "(x1,y1),(x2,y2)" in text and "(0,0),(0,0)" in text
    assert text.index("reference image") < text.index("test image")  # reference named first, as shown
    assert INSTRUCTIONS[instruction_index("pair-7")] in text
    assert prompt_text("pair-7") == text  # the same pair always gets the same wording
    assert INSTRUCTIONS[3] in prompt_text("pair-7", instruction=3)
    assert "0-1000" in prompt_text("p", coordinates="qwen2", coordinate_hint=True)
    assert "0-1000" not in prompt_text("p", coordinates="qwen2")
    assert len({instruction_index(f"p{i}") for i in range(200)}) == len(INSTRUCTIONS)


def test_conversation_has_two_images_reference_first(pairs, tiny) -> None:
    _, processor = tiny
    pair = pairs[0]
    sample = grpo.to_conversation(pair, processor)
    assert set(sample) == {"prompt", "images", "solution"}
    (message,) = sample["prompt"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image", "image", "text"]
    reference, query = sample["images"]
    assert reference.size == (64, 48) and query.size == (80, 60)
    assert np.array_equal(np.asarray(reference), np.asarray(pair["reference"]))
    assert np.array_equal(np.asarray(query), np.asarray(pair["query"]))


def test_solution_in_qwen25_resized_pixels_and_qwen2_thousandths(pairs, tiny) -> None:
    _, processor = tiny
    pair = pairs[0]
    resized = smart_resize(60, 80, 28, 56 * 56, 112 * 112)
    assert resized == (56, 84) == grpo.resized_size(processor, (60, 80))
    qwen25 = grpo.to_conversation(pair, processor, "qwen2.5")["solution"]
    assert qwen25 == pytest.approx([10 * 84 / 80, 12 * 56 / 60, 40 * 84 / 80, 30 * 56 / 60])
    qwen2 = grpo.to_conversation(pair, processor, "qwen2")["solution"]
    assert qwen2 == pytest.approx([125.0, 200.0, 500.0, 500.0])
    for coordinates in grpo.COORDINATES:  # a normal pair's solution is the zero box in both conventions
        assert grpo.to_conversation(pairs[1], processor, coordinates)["solution"] == [0.0] * 4
    with pytest.raises(ValueError, match="coordinates"):
        grpo.to_conversation(pair, processor, "pixels")


@pytest.mark.parametrize("coordinates", grpo.COORDINATES)
def test_truth_box_round_trips_through_model_coordinates(pairs, tiny, coordinates) -> None:
    _, processor = tiny
    pair = pairs[0]
    query_size = (60, 80)
    space = grpo.answer_size(processor, query_size, coordinates)
    solution = grpo.to_conversation(pair, processor, coordinates)["solution"]
    assert grpo.scale_box(solution, space, query_size) == pytest.approx(ANOMALY_BOX)
    # A model writes integers: through the answer parser the box comes back within one answer unit.
    x1, y1, x2, y2 = (round(v) for v in solution)
    row = grpo.prediction_row(
        "p", f"<think>t</think><answer>({x1},{y1}),({x2},{y2})</answer>", query_size, space
    )
    (box,) = row["boxes"]
    unit = max(query_size[1] / space[1], query_size[0] / space[0])
    assert np.allclose(box, ANOMALY_BOX, atol=unit / 2 + 1e-6)


def test_conversation_dataset_keeps_reward_columns_only(pairs, tiny) -> None:
    _, processor = tiny
    conversations = grpo.conversation_dataset(pairs, processor)
    assert set(conversations.column_names) == {
        "pair_id",
        "has_anomaly",
        "category",
        "prompt",
        "images",
        "solution",
    }
    row = conversations[0]
    assert [part["type"] for part in row["prompt"][0]["content"]] == ["image", "image", "text"]
    assert [image.size for image in row["images"]] == [(64, 48), (80, 60)]
    assert row["solution"] == pytest.approx(grpo.to_conversation(pairs[0], processor)["solution"])


# ---------------------------------------------------------------------------------------------------------
# The tiny model


def test_tiny_tokenizer_processor_and_model_build_offline(tiny) -> None:
    model, processor = tiny
    tokenizer = processor.tokenizer
    text = "<think>dent near (12,30)</think><answer>(1,2),(3,4)</answer> é"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    for token in testing.QWEN_SPECIAL_TOKENS:
        assert len(tokenizer(token)["input_ids"]) == 1
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert grpo.vision_tower(model) is model.model.visual


def test_tiny_processor_expands_two_images(pairs, tiny) -> None:
    _, processor = tiny
    sample = grpo.to_conversation(pairs[0], processor)
    text = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("<|im_start|>assistant\n")
    inputs = processor(images=[sample["images"]], text=[text], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4], [1, 4, 6]]  # 48 x 64 -> 56 x 56, 60 x 80 -> 56 x 84 (patch 14)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_pad).sum()) == int(grid.prod(dim=1).sum()) // 4


def test_tiny_generation_with_two_images_is_seeded(pairs, tiny) -> None:
    model, processor = tiny
    sample = grpo.to_conversation(pairs[0], processor)
    text = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[sample["images"]], text=[text], return_tensors="pt")
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        outputs.append(model.generate(**inputs, max_new_tokens=6, do_sample=True, min_new_tokens=6))
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0].shape == (1, inputs["input_ids"].shape[1] + 6)
    assert isinstance(processor.batch_decode(outputs[0][:, -6:])[0], str)


def test_freezing_the_vision_tower_leaves_the_language_model_trainable() -> None:
    model, _ = testing.tiny_random_vlm()
    frozen = grpo.freeze_vision_tower(model)
    assert frozen == sum(p.numel() for p in model.model.visual.parameters()) > 0
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_tiny_random_is_the_same_model_in_every_call() -> None:
    first, _ = testing.tiny_random_vlm()
    second, _ = testing.tiny_random_vlm()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# Predictions


def test_prediction_rows_parse_answers_into_query_pixels() -> None:
    stats = ParseStats()
    space, query = (56, 84), (60, 80)
    garbage = grpo.prediction_row("a", "RT\x00 no tags at all", query, space, stats)
    assert garbage == {
        "pair_id": "a",
        "boxes": [],
        "scores": [],
        "has_anomaly": False,
        "parse_ok": False,
        "text": "RT\x00 no tags at all",
    }
    normal = grpo.prediction_row("b", "<think>same</think><answer>(0,0),(0,0)</answer>", query, space, stats)
    assert normal["parse_ok"] and not normal["has_anomaly"] and normal["boxes"] == []
    found = grpo.prediction_row("c", "<answer>(21,14),(84,70)</answer>", query, space, stats)
    assert found["parse_ok"] and found["has_anomaly"] and found["scores"] == [1.0]
    assert found["boxes"] == [pytest.approx([20.0, 15.0, 80.0, 60.0])]  # y2 clipped to the 56-pixel height
    assert (stats.total, stats.parsed, stats.no_answer_tag, stats.clipped) == (3, 2, 1, 1)


def test_predict_pairs_writes_one_row_per_pair(pairs, tiny, tmp_path) -> None:
    model, processor = tiny
    stats = ParseStats()
    rows = grpo.predict_pairs(model, processor, pairs, batch_size=3, max_new_tokens=4, parse_stats=stats)
    assert [row["pair_id"] for row in rows] == list(pairs["pair_id"])
    assert all(set(row) == {"pair_id", "boxes", "scores", "has_anomaly", "parse_ok", "text"} for row in rows)
    assert stats.total == len(pairs) and not any(row["parse_ok"] for row in rows)  # random weights: no tags
    assert processor.tokenizer.padding_side == "right"  # restored after left-padded generation
    path = grpo.write_predictions(rows, tmp_path / "out" / "predictions.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


# ---------------------------------------------------------------------------------------------------------
# GRPO pieces and commands


def test_completion_weights_repeat_each_groups_difficulty_weight() -> None:
    accuracy = torch.tensor([1.0, 0.9, 0.0, 0.1, 0.5, float("nan")])
    weights = grpo.completion_weights(accuracy, num_generations=2)
    expected = difficulty_weights(torch.tensor([[1.0, 0.9], [0.0, 0.1], [0.5, 0.0]]))
    assert torch.allclose(weights, expected.repeat_interleave(2))


def test_difficulty_trainer_scales_each_process_advantages_by_its_group_weight(monkeypatch) -> None:
    from trl import GRPOTrainer

    trainer_class = grpo._difficulty_trainer_class()
    trainer = trainer_class.__new__(trainer_class)  # only the attributes the override reads
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SimpleNamespace(process_index=1)  # the second of two processes, 4 completions each
    trainer.num_generations, trainer.accuracy_index, trainer.error_threshold = 2, 1, 0.3
    trainer._metrics = {"train": defaultdict(list)}
    accuracy = torch.tensor([1.0, 0.9, 0.0, 0.1, 0.5, 0.2, 1.0, 1.0])
    gathered = torch.stack([torch.ones(8), accuracy], dim=1)  # (B * G, rewards): format, dclr

    def generate_and_score(self, inputs):
        self._gathered_rewards = gathered  # what the _calculate_rewards override keeps
        return {"advantages": torch.tensor([1.0, -1.0, 2.0, -2.0])}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generate_and_score)
    output = trainer._generate_and_score_completions([{}] * 4)
    weights = difficulty_weights(accuracy.view(4, 2)).repeat_interleave(2)
    assert torch.allclose(output["advantages"], torch.tensor([1.0, -1.0, 2.0, -2.0]) * weights[4:])
    assert trainer._metrics["train"]["difficulty_weight/mean"] == [pytest.approx(weights.mean().item())]
    assert trainer._gathered_rewards is None
    trainer.model.training = False  # evaluation batches are left alone
    assert torch.equal(
        trainer._generate_and_score_completions([{}] * 4)["advantages"], torch.tensor([1.0, -1.0, 2.0, -2.0])
    )


def test_grpo_config_uses_dapo_clipping_and_cpu_settings(tmp_path) -> None:
    config = grpo.grpo_config(tmp_path, 3, num_generations=2, max_completion_length=8)
    assert (config.loss_type, config.epsilon, config.epsilon_high) == ("dapo", 0.2, 0.28)
    assert config.per_device_train_batch_size == 2 and config.max_steps == 3
    if not torch.cuda.is_available():
        assert config.use_cpu and not config.bf16


@pytest.mark.parametrize(
    ("main", "prog"),
    [(command.grpo_main, "cadmtl reference grpo"), (command.zero_shot_main, "cadmtl reference zero-shot")],
)
def test_commands_have_help_with_an_example(main, prog, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog}") and "examples:" in out and "--dataset" in out


@pytest.mark.parametrize("name", ["differad_r1_qwen2_5_vl_7b.yaml", "differad_r1_qwen2_vl_7b.yaml"])
def test_grpo_yaml_configs_hold_only_known_options(name) -> None:
    parser = command.grpo_parser()
    extra = command._config_defaults(parser, ["--config", str(REPO_ROOT / "configs" / "grpo" / name)])
    args = parser.parse_args(["--config", "x"])
    assert args.num_generations == 8 and args.model and args.coordinates in grpo.COORDINATES
    from trl import GRPOConfig

    assert set(extra) <= set(GRPOConfig.__dataclass_fields__)


def test_pairs_dataset_reads_a_pairs_repo_through_the_one_pairs_reader(tmp_path) -> None:
    repo = write_pairs_repo(tmp_path / "pairs-repo")
    dataset = grpo.pairs_dataset(repo, "train", limit=3)
    assert dataset.column_names == ["pair_id", "reference", "query", "box", "has_anomaly", "category"]
    assert dataset["pair_id"] == ["pair-0", "pair-1", "pair-2"]
    assert dataset["has_anomaly"] == [True, False, True]
    assert dataset[0]["box"] == ANOMALY_BOX and dataset[1]["box"] == [0.0] * 4
    expected = make_pairs(4, seed=1)[0]["query"]
    assert np.array_equal(np.asarray(dataset[0]["query"]), np.asarray(expected))
    assert len(grpo.pairs_dataset(repo, "test")) == 2
    with pytest.raises(ValueError, match=r"pairs-repo: the pairs repo has no split 'validation'"):
        grpo.pairs_dataset(repo, "validation")


# ---------------------------------------------------------------------------------------------------------
# End to end (slow)


@pytest.mark.slow
def test_two_grpo_steps_with_lora_save_an_adapter_and_log_rewards(pairs, tmp_path) -> None:
    model, processor = testing.tiny_random_vlm()
    trainer = grpo.train_grpo(
        model,
        processor,
        pairs,
        tmp_path / "run",
        max_steps=2,
        num_generations=2,
        max_completion_length=8,
        lora=True,
        lora_rank=4,
        lora_alpha=8,
        difficulty_aware=True,
    )
    assert trainer.state.global_step == 2
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert {"rewards/format_reward/mean", "rewards/dclr_reward/mean", "difficulty_weight/mean"} <= set(
            entry
        )
    saved = {path.name for path in (tmp_path / "run").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
    } <= saved
    assert "model.safetensors" not in saved
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == testing.TINY_RANDOM
    assert all("language_model" in name for name in trainer.model.state_dict() if "lora_" in name)
    settings = json.loads((tmp_path / "run" / grpo.SETTINGS_FILE).read_text())
    assert settings["coordinates"] == "qwen2.5" and settings["rewards"] == ["format_reward", "dclr_reward"]
    # The adapter loads back on its base and answers with the same prompt.
    loaded, loaded_processor = grpo.load_vlm(str(tmp_path / "run"))
    rows = grpo.predict_pairs(loaded, loaded_processor, pairs.select(range(2)), max_new_tokens=4)
    assert [row["pair_id"] for row in rows] == ["pair-0", "pair-1"]


def varied_reward(completions, **kwargs) -> list[float]:
    """A reward that differs between completions, so a tiny random model gets a non-zero policy gradient."""
    return [float(len(set(str(c)))) / 10 for c in completions]


@pytest.mark.slow
def test_grpo_updates_the_language_model_not_the_frozen_vision_tower(pairs, tmp_path) -> None:
    model, processor = testing.tiny_random_vlm()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = grpo.train_grpo(
        model,
        processor,
        pairs,
        tmp_path / "run",
        max_steps=2,
        rewards=["format", varied_reward],
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
    )
    assert any(entry.get("grad_norm", 0) > 0 for entry in trainer.state.log_history)
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and all(".visual." not in f".{name}" for name in changed)
    assert any("language_model" in name for name in changed)
    saved = {path.name for path in (tmp_path / "run").iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", grpo.SETTINGS_FILE} <= saved


@pytest.mark.slow
def test_grpo_and_zero_shot_commands_on_a_pairs_repo(tmp_path) -> None:
    repo = write_pairs_repo(tmp_path / "pairs-repo")
    base = tmp_path / "base"  # a model folder, as a Hub model would be: TRL loads it by name
    model, processor = testing.tiny_random_vlm()
    model.save_pretrained(base)
    processor.save_pretrained(base)
    run, out = tmp_path / "run", tmp_path / "eval"
    train = f"--model {base} --dataset {repo} --output-dir {run} --max-steps 1 --num-generations 2"
    code = command.grpo_main([*train.split(), "--max-completion-length", "8", "--coordinates", "qwen2"])
    assert code == 0 and (run / "model.safetensors").is_file()
    assert json.loads((run / grpo.SETTINGS_FILE).read_text())["frozen_vision_parameters"] > 0
    predict = f"--model {run} --dataset {repo} --split test --output-dir {out} --max-new-tokens 4"
    code = command.zero_shot_main(predict.split())
    assert code == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["pair_id"] for row in rows] == ["pair-0", "pair-1"]
    summary = json.loads((out / "parse_stats.json").read_text())
    assert (
        summary["coordinates"] == "qwen2" and summary["parse"]["total"] == 2
    )  # read from grpo_settings.json
