"""The EMA of the weights: sharded like the optimizer, equal to a reference EMA of plain AdamW's weights,
untouched by stage I, restored exactly on resume (on another world size too), exported for open_clip."""

import pytest
import torch
from safetensors.torch import load_file

from test_checkpoint import assert_bit_identical, check_resume_is_bit_identical, ema_snapshot
from test_export import train_and_export, train_overrides
from test_osr import assert_close_by_name, build_fixed_run, reference_adamw
from test_resume_world_size import check_resume_on_other_world_size, resume_and_finish
from test_resume_world_size import train_and_snapshot as train_and_snapshot_all
from test_training import TINY_RUN
from tuneclip_ds import export
from tuneclip_ds.config import ConfigError, load_config
from tuneclip_ds.optim.ema import read_averages

DECAY = 0.5  # recent weights count: a wrong step or order shows
SCHEDULE = ["ema.every=2", "ema.start_step=3", "ema.warmup=true"]  # steps 1-2 copied, 3 and 5 averaged


def reference_ema(weights: list[dict], decay: float, every: int = 1, start_step: int = 0,
                  warmup: bool = False) -> tuple[dict, int]:
    """The EMA of ``weights`` (at the start of stage II, then after each of its steps) as the README defines it,
    and its number of updates."""
    ema, updates = dict(weights[0]), 0
    for step, current in enumerate(weights[1:], start=1):
        if step < start_step:
            ema = dict(current)
        elif (step - start_step) % every == 0:
            rate = min(decay, (1 + updates) / (10 + updates)) if warmup else decay
            ema = {name: rate * ema[name] + (1 - rate) * current[name] for name in ema}
            updates += 1
    return ema, updates


def schedule_of(overrides: list[str]) -> dict:
    ema = load_config(None, ["train.steps=1", *overrides]).ema
    return {"decay": ema.decay, "every": ema.every, "start_step": ema.start_step, "warmup": ema.warmup}


def train_with_ema(rank, world_size, overrides, record_weights=False):
    """Train on fixed global batches; the EMA gathered whole at the end of stage I (if any) and at the end, and
    with ``record_weights`` the full fp32 masters at the start and after every step."""
    from tuneclip_ds.optim.state import full_parameters

    trainer = build_fixed_run(rank, world_size, overrides)
    result = {"start": full_parameters(trainer.engine), "steps": []}
    begin_stage2, train_step = trainer.osr.begin_stage2, trainer.train_step

    def snapshot_then_begin(*args):
        result["stage1_end"] = {"params": full_parameters(trainer.engine), **ema_snapshot(trainer)}
        return begin_stage2(*args)

    def step_then_record():
        step = train_step()
        if record_weights:
            result["steps"].append(full_parameters(trainer.engine))
        return step

    trainer.osr.begin_stage2, trainer.train_step = snapshot_then_begin, step_then_record
    trainer.run()
    held = sum(average.values.numel() for average in trainer.ema.averages.values())  # on this rank
    return {**result, **ema_snapshot(trainer), "held": held}


@pytest.mark.parametrize("stage, schedule", [  # ZeRO-2 with SCHEDULE: after stage I, below
    (0, SCHEDULE), (3, []),
    pytest.param(0, [], marks=pytest.mark.slow), pytest.param(2, [], marks=pytest.mark.slow),
    pytest.param(3, SCHEDULE, marks=pytest.mark.slow),
])
def test_ema_equals_the_ema_of_plain_adamw_weights(pool, stage, schedule):
    from tuneclip_ds.plan import Setup, model_shape
    from tuneclip_ds.plan.estimate import ema_bytes

    overrides = [f"train.zero_stage={stage}", "train.steps=6", f"ema.decay={DECAY}", *schedule]
    ours, other = pool.run(train_with_ema, overrides)
    # Each rank holds its share of the masters, as the planner counts it: the whole model at ZeRO-0.
    planned = ema_bytes(model_shape("tiny-ViT"), Setup(gpus_per_node=2, zero_stage=stage, ema="same")) / 4
    assert ours["held"] + other["held"] == (2 if stage == 0 else 1) * sum(p.numel() for p in ours["ema"].values())
    assert abs(ours["held"] - planned) < 8 and abs(other["held"] - planned) < 8  # ZeRO's partitions are aligned
    weights = [snapshot["params"] for snapshot in reference_adamw(0, 1e-3, 0.1, 0.5, stage2_steps=6)]
    expected, updates = reference_ema(weights, **schedule_of(overrides))
    assert ours["ema_updates"] == updates == (2 if schedule else 6)
    assert_close_by_name(ours["ema"], expected, "EMA", rtol=1e-4)  # as the weights themselves (test_osr)


def test_stage1_leaves_the_ema_at_the_weights_stage2_starts_from(pool):
    overrides = ["train.zero_stage=2", "osr.steps=3", "train.steps=6", f"ema.decay={DECAY}", *SCHEDULE]
    ours, _ = pool.run(train_with_ema, overrides)
    at_stage2 = ours["stage1_end"]
    assert at_stage2["ema_updates"] == 0
    assert_bit_identical(at_stage2["ema"], at_stage2["params"], "the EMA after stage I")
    assert_bit_identical(at_stage2["ema"], ours["start"], "the EMA after stage I and the starting weights")
    weights = [snapshot["params"] for snapshot in reference_adamw(3, 1e-3, 0.1, 0.5, stage2_steps=6)]
    expected, updates = reference_ema(weights, **schedule_of(overrides))
    assert ours["ema_updates"] == updates == 2
    assert_close_by_name(ours["ema"], expected, "EMA", rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    ["train.zero_stage=0", "train.precision=bf16"], ["train.zero_stage=1", "train.precision=bf16"],
    ["train.zero_stage=3", "train.precision=bf16"],
    ["train.zero_stage=2", "train.offload_optimizer=true"], ["train.zero_stage=3", "train.offload_optimizer=true"],
])
def test_ema_averages_the_fp32_masters_in_bf16_and_with_offload(pool, setting):
    ours, _ = pool.run(train_with_ema, [*setting, "train.steps=4", f"ema.decay={DECAY}"], True)
    expected, _ = reference_ema([ours["start"], *ours["steps"]], DECAY)
    # The masters themselves (not the bf16 weights, rounded by about 4e-3), wherever the optimizer keeps them.
    assert_close_by_name(ours["ema"], expected, "EMA", rtol=1e-6)


@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_of_an_ema_run_is_bit_identical(pool, synthetic_shards, tmp_path, stage):
    straight, resumed = check_resume_is_bit_identical(
        pool, synthetic_shards, tmp_path, f"train.zero_stage={stage}", f"ema.decay={DECAY}", "ema.every=2",
        "ema.start_step=1", "ema.warmup=true", keys=("params", "exp_avg", "exp_avg_sq", "ema"))
    assert resumed["ema_updates"] == straight["ema_updates"] == 3  # steps 1, 3 and 5


@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_ema_resumes_on_fewer_ranks(pools, synthetic_shards, tmp_path, stage):
    saved, resumed = check_resume_on_other_world_size(pools, synthetic_shards, tmp_path, stage, 2, 1,
                                                      f"ema.decay={DECAY}", "ema.warmup=true")
    loaded = resumed[0]["loaded"]
    assert_bit_identical(loaded["ema"], saved[0]["ema"], "the EMA after loading")
    assert loaded["ema_updates"] == saved[0]["ema_updates"] == 3
    assert not any(torch.equal(saved[0]["ema"][name], saved[0]["params"][name]) for name in saved[0]["params"])


@pytest.mark.slow
def test_checkpoint_without_ema_starts_the_ema_from_its_weights(pool, synthetic_shards, tmp_path):
    common = TINY_RUN + [f"data.train_shards={synthetic_shards}", "train.batch_size=8", "data.shuffle_buffer=16",
                         "train.zero_stage=2", f"output_dir={tmp_path}"]
    pool.run(train_and_snapshot_all, common + ["train.steps=3"])
    resumed, _ = pool.run(resume_and_finish, common + ["train.steps=4", "checkpoint.resume=latest",
                                                       f"ema.decay={DECAY}"])
    assert_bit_identical(resumed["loaded"]["ema"], resumed["loaded"]["params"], "the EMA after loading")
    assert any("holds no EMA of the weights" in message for message in resumed["warnings"])
    assert resumed["final"]["ema_updates"] == 1


def test_export_of_the_ema_loads_in_open_clip(pool, synthetic_shards, tmp_path):
    run, output = tmp_path / "run", tmp_path / "ema.pt"
    overrides = train_overrides(synthetic_shards, tmp_path, 3) + [f"ema.decay={DECAY}", "model.lock_image=true"]
    (engine, exported), _ = pool.run(train_and_export, overrides, [(run, output, "--ema")])
    tensors, ema = exported[output]["tensors"], engine["ema"]
    assert "the EMA of the weights (decay 0.5, 3 updates)" in exported[output]["printed"]
    assert ema and not any(name.startswith("visual.") for name in ema)  # the locked image tower is not trained
    for name, param in engine["params"].items():  # open_clip loaded it (strictly): every name is there
        expected = ema.get(name, param)  # frozen parameters: the weights
        assert torch.equal(tensors[name].reshape(expected.shape), expected), name
    assert not torch.equal(ema["text_projection"], engine["params"]["text_projection"])
    assert export.main([str(run), "--ema", "--folder", str(tmp_path / "folder")]) == 0
    folder = load_file(tmp_path / "folder" / export.FOLDER_WEIGHTS)
    assert all(torch.equal(folder[name], tensors[name]) for name in tensors)


def module_weights(engine) -> dict[str, torch.Tensor]:
    """The module's trained parameters whole in fp32, as the forward sees them (gathered at ZeRO-3)."""
    import deepspeed

    params = {name: param for name, param in engine.module.named_parameters() if param.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {name: param.detach().float().clone() for name, param in params.items()}


def swap_in_the_ema(rank, world_size, overrides):
    """Train; the module's weights and the masters before, inside and after ``ema.swapped_in()``."""
    from tuneclip_ds.optim.state import full_parameters

    trainer = build_fixed_run(rank, world_size, overrides)
    trainer.run()
    engine = trainer.engine
    before = {"module": module_weights(engine), "masters": full_parameters(engine)}
    with trainer.ema.swapped_in():
        inside = module_weights(engine)
    after = {"module": module_weights(engine), "masters": full_parameters(engine)}
    return {"before": before, "inside": inside, "after": after, "ema": trainer.ema.full_averages()}


# ZeRO-3 in the slow suite (its engines take long). It failed once in a full fast-suite run on the loaded 2-core
# machine (text_projection, kept whole below the persistence threshold, did not hold the EMA inside the block):
# DeepSpeed waited for the last of several asynchronous gloo all-gathers only; CPU ranks now gather one by one
# (test_config.py::test_ds_config_on_cpu_gathers_zero3_parameters_one_at_a_time)
@pytest.mark.parametrize("setting", [
    ["train.zero_stage=2"], pytest.param(["train.zero_stage=3"], marks=pytest.mark.slow),
    pytest.param(["train.zero_stage=0", "train.precision=bf16"], marks=pytest.mark.slow),
    pytest.param(["train.zero_stage=3", "train.precision=bf16"], marks=pytest.mark.slow),
])
def test_the_ema_swapped_into_the_module_and_back_exactly(pool, setting):
    results = pool.run(swap_in_the_ema, [*setting, "train.steps=3", f"ema.decay={DECAY}"])
    dtype = torch.bfloat16 if "train.precision=bf16" in setting else torch.float32
    for ours in results:
        in_precision = {name: value.to(dtype).float() for name, value in ours["ema"].items()}
        assert_bit_identical(ours["inside"], in_precision, "the module's parameters holding the EMA")
        assert_bit_identical(ours["after"]["module"], ours["before"]["module"], "the module's parameters after")
        assert_bit_identical(ours["after"]["masters"], ours["before"]["masters"], "the masters after")
        moved = [name for name in ours["ema"] if not torch.equal(ours["inside"][name], ours["before"]["module"][name])]
        assert len(moved) > len(ours["ema"]) // 2  # in bf16 some parameters round to their weights


def test_evaluation_of_both_weights_selects_the_best_ema(pools, tmp_path):
    from test_eval_training import train_with_evaluation, write_suite
    from test_launch import scalars

    data = tmp_path / "data"
    overrides = TINY_RUN + [
        f"data.train_shards={data / 'train'}", "data.synthetic.num_samples=256", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=32", f"data.synthetic.val_shards={data / 'val'}",
        "data.synthetic.val_samples=48", "train.batch_size=8", "train.steps=4", "train.zero_stage=2",
        f"output_dir={tmp_path}", "run_name=run", f"eval.tasks={write_suite(tmp_path, data / 'val')}",
        "eval.every=2", "eval.weights=both", "eval.select=ema/ret/mean_R@1", f"ema.decay={DECAY}",
    ]
    best, _ = pools[2].run(train_with_evaluation, overrides)
    logged = scalars(tmp_path / "run")
    model, ema = logged["eval/ret/mean_R@1"], logged["eval/ema/ret/mean_R@1"]
    assert len(model) == len(ema) == 3 and model[0] == ema[0]  # stage II starts with the EMA at the weights
    assert model[1:] != ema[1:]
    assert best["metric"] == "ema/ret/mean_R@1" and best["best"] == pytest.approx(max(ema))


def write_ema_files(folder, fragments_by_rank: list[dict]) -> None:
    from tuneclip_ds import checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    for rank, fragments in enumerate(fragments_by_rank):
        torch.save({"updates": 2, "fragments": fragments}, checkpoint.ema_file(folder, rank))


def test_parameters_are_assembled_from_the_ranks_fragments_and_a_gap_is_an_error(tmp_path):
    from tuneclip_ds.checkpoint import CheckpointError

    weight, bias = torch.arange(12.0), torch.arange(3.0)
    write_ema_files(tmp_path, [{"w": (0, weight[:7])}, {"w": (7, weight[7:]), "b": (0, bias)}])
    assembled = read_averages(tmp_path, {"w": torch.Size([3, 4]), "b": torch.Size([3]), "frozen": torch.Size([2])})
    assert torch.equal(assembled["w"], weight.view(3, 4)) and torch.equal(assembled["b"], bias)
    assert assembled.keys() == {"w", "b"}
    write_ema_files(tmp_path, [{"w": (0, weight[:6])}, {"w": (7, weight[7:]), "b": (0, bias)}])
    with pytest.raises(CheckpointError, match="do not cover every element of w: a file is missing"):
        read_averages(tmp_path, {"w": torch.Size([3, 4]), "b": torch.Size([3])})


@pytest.mark.parametrize("overrides, message", [
    (["eval.weights=ema"], "eval.weights=ema evaluates the EMA of the weights: set ema.decay (e.g. 0.999)"),
    (["ema.decay=0.9", "eval.weights=ema", "eval.select=average"],
     "eval.select='average' names a result of the model, which eval.weights=ema does not evaluate: select "
     "ema/average (the EMA's result) or set eval.weights=both"),
    (["ema.decay=0.9", "eval.select=ema/average"],
     "eval.select='ema/average' names a result of the EMA, which eval.weights=model does not evaluate: set "
     "eval.weights=ema or both"),
])
def test_evaluating_the_ema_needs_one_and_a_matching_selection(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["train.steps=1", "eval.tasks=suite.yaml", *overrides])
    load_config(None, ["train.steps=1", "eval.tasks=suite.yaml", "ema.decay=0.9", "eval.weights=both",
                       "eval.select=ema/average"])


def test_exporting_the_ema_of_a_run_without_one_is_a_clear_error(tmp_path, capsys):
    from test_checkpoint_errors import fake_checkpoint

    source = fake_checkpoint(tmp_path / "checkpoints", 4)
    assert export.main([str(source), "--ema", "--output", str(tmp_path / "ema.pt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --ema: checkpoint") and "holds no EMA of the weights" in error
    assert "Traceback" not in error and not (tmp_path / "ema.pt").exists()
