"""The memory planner: model states against DeepSpeed's estimators, activations against a measured
peak on the CPU, ring traffic against the bytes the losses really send, and the command line.

The children of the gloo pool import this module to find ``_loss_traffic``: no open_clip at the
top (see tests/gloo_pool.py).
"""

import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tuneclip_ds.engine import DS_CONFIG_DIR
from tuneclip_ds.plan import Setup, ZeroSettings, make_plan, model_shape, model_states, ring_traffic
from tuneclip_ds.plan.__main__ import main
from tuneclip_ds.plan.estimate import (LOSSES, MODEL_STATE_ROWS, activation_bytes, bucket_bytes, optimizer_step_bytes,
                                       stage3_transients)
from tuneclip_ds.plan.loss_time import (OPS_PER_HOP, HopOps, Links, hop_ops, loss_times, nodes_where_loss_passes,
                                        towers_time)
from tuneclip_ds.plan.measure import AllocatorPeak
from tuneclip_ds.plan.shape import Tower, count_params, largest_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vit_b_32():
    return model_shape("ViT-B-32")


# ---------------------------------------------------------------- model states


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 1), (1, 8), (2, 8), (4, 4)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimate(vit_b_32, precision, nodes, gpus_per_node, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    setup = Setup(nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=2, offload_optimizer=offload,
                  precision=precision)
    _, expected = estimate_zero2_model_states_mem_needs(vit_b_32.params, gpus_per_node, nodes, cpu_offload=offload)
    assert sum(model_states(vit_b_32, setup).values()) == pytest.approx(expected, abs=1)  # DeepSpeed rounds down


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 1), (1, 8), (2, 8), (4, 4)])
@pytest.mark.parametrize("offload, offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_equal_deepspeeds_estimate(vit_b_32, precision, nodes, gpus_per_node, offload,
                                                      offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    setup = Setup(nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=3, offload_optimizer=offload,
                  offload_params=offload_params, precision=precision)
    _, expected, largest_layer_memory = estimate_zero3_model_states_mem_needs(
        vit_b_32.params, vit_b_32.largest_layer, gpus_per_node, nodes, cpu_offload=offload,
        cpu_offload_params=offload_params)
    rows = model_states(vit_b_32, setup)
    assert rows["gathered layer"] == largest_layer_memory
    assert sum(rows.values()) == pytest.approx(expected, abs=1)


def test_model_states_of_the_stages_deepspeed_does_not_estimate(vit_b_32):
    """ZeRO-0 and -1 and fp32 follow the same table: bytes per parameter on 4 GPUs."""
    per_param = {
        (0, "bf16"): 2 + 2 + 4 + 4 + 8,
        (1, "bf16"): 2 + 2 + (4 + 4 + 8) / 4,
        (0, "fp32"): 4 + 4 + 8,  # no master copy: the optimizer steps the weights themselves
        (2, "fp32"): 4 + (4 + 4 + 8) / 4,
    }
    for (stage, precision), expected in per_param.items():
        rows = model_states(vit_b_32, Setup(gpus_per_node=4, zero_stage=stage, precision=precision))
        assert sum(rows.values()) == pytest.approx(expected * vit_b_32.params)
    offloaded = model_states(vit_b_32, Setup(gpus_per_node=4, zero_stage=1, offload_optimizer=True))
    assert offloaded == {"parameters": 2 * vit_b_32.params, "gradients": 2 * vit_b_32.params,
                         "optimizer states": 0, "gathered layer": 0}


def test_parameter_counts_are_deepspeeds():
    """The meta model counts as DeepSpeed's ``model_to_params`` counts the real one."""
    import open_clip
    from deepspeed.runtime.zero.stage3 import model_to_params

    real = open_clip.create_model("tiny-ViT")
    shape = model_shape("tiny-ViT")
    assert model_to_params(real) == (count_params(real), largest_layer(real)) == (shape.params, shape.largest_layer)


# ---------------------------------------------------------------- ZeRO's buffers and the optimizer step


def test_zero_settings_default_to_deepspeeds_and_read_the_json():
    assert ZeroSettings.from_json({}, "empty") == ZeroSettings()
    large = ZeroSettings.from_file(DS_CONFIG_DIR / "zero3_large.json")
    assert (large.reduce_bucket_size, large.max_live_parameters, large.max_reuse_distance) == (2e8, 3e8, 3e8)
    assert ZeroSettings.from_json({"zero_optimization": {"overlap_comm": False}}, "x").overlaps(3) is False
    assert ZeroSettings().overlaps(3) and not ZeroSettings().overlaps(2)


def _bucket_buffers(rank, world_size, stage, overlap, precision):
    """The gradient buckets a DeepSpeed engine allocates in one backward, as (elements, bytes each):
    ZeRO-1/2 make theirs in backward and release them at its end, so they are read just before."""
    import deepspeed

    from tuneclip_ds.distributed import start_deepspeed_comm

    start_deepspeed_comm()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": precision == "bf16"},
                 "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "overlap_comm": overlap},
                 "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config)
    seen = []

    def read_buckets():
        buffers = []
        for bucket in engine.optimizer.ipg_buckets.values():
            buffers += bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        seen.append(sum(buffer.numel() * buffer.element_size() for buffer in buffers))

    if stage < 3:
        release = engine.optimizer._release_ipg_buffers
        engine.optimizer._release_ipg_buffers = lambda: (read_buckets(), release())
    inputs = torch.randn(2, 64, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    engine.backward(engine(inputs).float().sum())
    read_buckets()
    return seen


@pytest.mark.parametrize("stage, overlap, precision", [(1, False, "fp32"), (2, True, "bf16"), (2, False, "bf16"),
                                                       (3, True, "bf16"), (3, False, "fp32")])
def test_gradient_buckets_are_the_ones_deepspeed_allocates(pool, stage, overlap, precision):
    seen = pool.run(_bucket_buffers, stage, overlap, precision)[0]
    setup = Setup(gpus_per_node=2, zero_stage=stage, precision=precision,
                  zero=ZeroSettings(reduce_bucket_size=3000, overlap_comm=overlap))
    if stage < 3:  # in backward, gone after it
        assert seen == [bucket_bytes(setup), 0]
    else:  # allocated once and kept
        assert seen == [bucket_bytes(setup)]
    shape = model_shape("tiny-ViT")
    plan = make_plan(shape, setup)
    assert (plan.held if stage == 3 else plan.forward_backward)["gradient buckets"] == bucket_bytes(setup)


def _adamw_step_peak(numel: int, **implementation) -> int:
    """Bytes torch's AdamW allocates at its peak in a step of one flat tensor of ``numel`` elements
    (the second step: the moments exist)."""
    flat = torch.nn.Parameter(torch.zeros(numel))
    flat.grad = torch.ones(numel)
    optimizer = torch.optim.AdamW([flat], **implementation)
    optimizer.step()
    return AllocatorPeak().measure(optimizer.step)


@pytest.mark.parametrize("device, implementation, optimizer", [
    ("cuda", {"foreach": True}, "torch"),  # torch's default on GPUs
    ("cpu", {"foreach": False}, "torch"),  # torch's default on the CPU
    ("cuda", {"fused": True}, "deepspeed"),  # fused, as DeepSpeed's FusedAdam: no temporaries
])
def test_optimizer_temporaries_are_what_adamw_allocates(vit_b_32, device, implementation, optimizer):
    """ZeRO-1 on one rank steps the whole model as one flat fp32 tensor of ``params`` elements."""
    shape = dataclasses.replace(vit_b_32, params=1_000_000)
    setup = Setup(zero_stage=1, precision="bf16", optimizer=optimizer, device=device)
    planned = optimizer_step_bytes(shape, setup).get("optimizer temporaries", 0)
    measured = _adamw_step_peak(shape.params, **implementation)
    assert planned == pytest.approx(measured, abs=4096)  # a few scalars besides


def test_stage3_keeps_the_whole_model_gathered_within_the_reuse_distance(vit_b_32):
    """With DeepSpeed's defaults (reuse distance 1e9) every parameter of a model under 5e8 is kept;
    zero3_large.json's 3e8 keeps 1.5e8 and prefetches 5e7 more."""
    def gathered(zero):
        setup = Setup(gpus_per_node=2, zero_stage=3, precision="fp32", zero=zero)
        return stage3_transients(vit_b_32, setup)["parameters gathered ahead"] / 4 + vit_b_32.largest_layer

    assert gathered(ZeroSettings()) == vit_b_32.params
    large = ZeroSettings(max_reuse_distance=300_000_000, prefetch_bucket_size=50_000_000)
    assert gathered(large) == min(vit_b_32.params, 200_000_000)
    limited = ZeroSettings(max_reuse_distance=100_000, prefetch_bucket_size=50_000_000, max_live_parameters=1_000_000)
    assert gathered(limited) == pytest.approx(vit_b_32.largest_layer)  # 5e4 kept and 9.5e5 prefetched < one layer


# ---------------------------------------------------------------- activations


def _measure(model: str, batch_size: int, precisions: list[str]) -> list[dict]:
    """The measured and estimated activation peaks of every precision, with and without gradient
    checkpointing, in a fresh process (see tuneclip_ds/plan/measure.py for the method)."""
    command = [sys.executable, "-m", "tuneclip_ds.plan.measure", "--model", model, "--batch-size", str(batch_size),
               "--precision", *precisions, "--grad-checkpointing", "off", "on"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _assert_within_30_percent(results: list[dict]) -> None:
    for result in results:
        assert abs(result["estimated"] - result["measured"]) <= 0.3 * result["measured"], result


def test_activation_estimate_within_30_percent_of_the_measured_peak():
    results = _measure("tiny-ViT", 256, ["fp32", "bf16"])
    assert len(results) == 4
    _assert_within_30_percent(results)
    fp32 = {result["grad_checkpointing"]: result["measured"] for result in results if result["precision"] == "fp32"}
    assert fp32[True] < 0.6 * fp32[False]  # checkpointing keeps one of the 16 widths of each block


@pytest.mark.slow
def test_activation_estimate_within_30_percent_of_the_measured_peak_vit_b_32():
    _assert_within_30_percent(_measure("ViT-B-32", 8, ["fp32"]))


def test_activations_scale_with_batch_precision_and_checkpointing(vit_b_32):
    def estimate(batch_size, precision="bf16", checkpointing=False):
        return activation_bytes(vit_b_32, batch_size, precision, checkpointing)

    assert estimate(256) == pytest.approx(2 * estimate(128), rel=1e-3)  # but for one parameter's gradient
    assert 1.9 * estimate(128) < estimate(128, "fp32") < 2 * estimate(128)  # the statistics are fp32 in both
    assert estimate(128, checkpointing=True) < estimate(128) / 4


# ---------------------------------------------------------------- ring traffic


def _loss_traffic(rank, world_size, loss_name, batch_size, dim, dtype):
    """Bytes this rank sends to the others in one forward and backward of the loss: point-to-point
    (the ring), and the estimators' all-gather (its tensor to every other rank) and per-sample all-reduce
    (a ring all-reduce sends twice its share); the scalar all-reduces are left out."""
    from tuneclip_ds.losses import build_loss

    sent = []
    send_and_receive, all_gather, all_reduce = dist.batch_isend_irecv, dist.all_gather_into_tensor, dist.all_reduce

    def counting_send_and_receive(operations):
        sent.extend(op.tensor.nbytes for op in operations if op.op is dist.isend)
        return send_and_receive(operations)

    def counting_all_gather(output, tensor, **kwargs):
        sent.append((world_size - 1) * tensor.nbytes)
        return all_gather(output, tensor, **kwargs)

    def counting_all_reduce(tensor, **kwargs):
        if tensor.numel() > 8:
            sent.append(2 * (world_size - 1) * tensor.nbytes // world_size)
        return all_reduce(tensor, **kwargs)

    generator = torch.Generator().manual_seed(rank)
    image, text = (torch.nn.functional.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1)
                   .to(dtype).requires_grad_() for _ in range(2))
    ids = torch.arange(rank * batch_size, (rank + 1) * batch_size)  # owners alternate: half stay here
    loss = build_loss(loss_name, tile_size=16)
    with mock.patch.object(dist, "batch_isend_irecv", counting_send_and_receive), \
            mock.patch.object(dist, "all_gather_into_tensor", counting_all_gather), \
            mock.patch.object(dist, "all_reduce", counting_all_reduce):
        loss(image, text, torch.tensor([10.0]), torch.tensor([-10.0]), sample_ids=ids).backward()
    return sum(sent)


@pytest.mark.parametrize("loss", ["infonce", "siglip", "hgcl"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ring_traffic_is_what_the_losses_send(pool, loss, precision):
    batch_size, dim = 24, 32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    sent = pool.run(_loss_traffic, loss, batch_size, dim, dtype)
    setup = Setup(gpus_per_node=2, batch_size=batch_size, precision=precision, loss=loss)
    assert sent == [sum(ring_traffic(dim, setup).values())] * 2


def test_ema_is_one_fp32_copy_of_the_ranks_share_of_the_masters(vit_b_32):
    share = 4 * vit_b_32.params / 8  # bytes on each of 8 ranks at ZeRO 1-3

    def plan(**settings):
        return make_plan(vit_b_32, Setup(gpus_per_node=8, **settings))

    assert plan(zero_stage=2, ema="same").held["EMA of the weights"] == share
    assert plan(zero_stage=2, ema="same").total - plan(zero_stage=2).total == pytest.approx(share)
    assert plan(zero_stage=0, ema="same").held["EMA of the weights"] == 8 * share  # ZeRO-0: the whole model
    without = plan(zero_stage=3)
    assert "EMA of the weights" not in without.held and without.ema_cpu_per_node == 0
    offloaded = plan(zero_stage=3, offload_optimizer=True, ema="same")  # beside the masters, on the CPU
    assert "EMA of the weights" not in offloaded.held and offloaded.ema_cpu_per_node == 8 * share
    on_cpu = plan(zero_stage=3, ema="cpu")  # with the pinned copy each update fills
    assert "EMA of the weights" not in on_cpu.held and on_cpu.ema_cpu_per_node == 2 * 8 * share


# ---------------------------------------------------------------- command line


def test_vit_bigg_plan_reports_memory_per_gpu_and_a_verdict(capsys):
    argv = ["--model", "ViT-bigG-14", "--nodes", "2", "--gpus-per-node", "8", "--batch-size", "32", "--zero", "3",
            "--precision", "bf16", "--grad-checkpointing"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ViT-bigG-14: 2,539.6M parameters" in out and "16 ranks, ZeRO-3, bf16, gradient checkpointing" in out
    rows = (*MODEL_STATE_ROWS, "= model states", "gradient buckets", "= held through the step",
            "forward-backward: activations", "forward-backward: loss buffers",
            "forward-backward: parameters gathered ahead", "forward-backward: reduce-scatter copy",
            "optimizer step: flat fp32 gradient", "optimizer step: optimizer temporaries", "= total")
    for row in rows:
        assert f"\n  {row} " in out
    assert "ring loss traffic per rank:" in out
    assert "verdict: FITS in 80 GiB per GPU" in out


def test_plan_does_not_fit(capsys):
    assert main(["--model", "ViT-bigG-14", "--batch-size", "1", "--zero", "0", "--gpu-memory", "40"]) == 0
    assert "verdict: DOES NOT FIT in 40 GiB per GPU" in capsys.readouterr().out


def test_plan_from_an_experiment_config(capsys):
    config = os.path.join(ROOT, "configs", "tuneclip_vitb16.yaml")
    assert main(["--config", config, "train.batch_size=48", "--gpus-per-node", "8", "--zero", "3"]) == 0
    out = capsys.readouterr().out
    # (DeepSpeed may print its accelerator warning first, depending on what ran before)
    assert "\nViT-B-16-quickgelu: " in "\n" + out and "batch 48 per GPU" in out and "ZeRO-3" in out


def test_plan_counts_the_ema_an_experiment_config_keeps(capsys):
    config = os.path.join(ROOT, "configs", "tuneclip_vitb16.yaml")
    assert main(["--config", config, "ema.decay=0.999", "ema.device=cpu", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "EMA of the weights (in CPU memory)" in out and "\nCPU per node for the EMA of the weights: 1.1 GiB" in out
    assert main(["--config", config, "ema.decay=0.999", "--gpus-per-node", "8"]) == 0
    assert "\n  EMA of the weights " in capsys.readouterr().out


def test_total_is_what_is_held_and_the_larger_peak(vit_b_32):
    for batch_size in (1, 512):  # the optimizer step's peak, then forward and backward's, is the larger
        plan = make_plan(vit_b_32, Setup(gpus_per_node=8, zero_stage=3, batch_size=batch_size))
        added = [sum(plan.forward_backward.values()), sum(plan.optimizer_step.values())]
        assert plan.total == pytest.approx(sum(plan.held.values()) + max(added))
        assert plan.rows()[-1] == ("= total (held + the larger peak)", plan.total)
    assert added[0] > added[1] and plan.fits


@pytest.mark.parametrize("argv, message", [
    (["--model", "ViT-Nope-99"], "'ViT-Nope-99' is not an open_clip model"),
    (["--model", "ViT-B-32", "--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--model", "ViT-B-32", "--zero", "0", "--offload"], "optimizer offload needs ZeRO stage 1, 2 or 3"),
    (["--model", "ViT-B-32", "--zero", "2", "--offload", "--offload-params"], "parameter offload needs ZeRO stage 3"),
    (["--model", "ViT-B-32", "--deepspeed-config", "nope.json"], "DeepSpeed config nope.json does not exist"),
    (["--model", "ViT-B-32", "--inter-node-gbs", "0"], "--inter-node-gbs must be positive, got 0"),
    (["--model", "ViT-B-32", "--intra-node-gbs", "-450"], "--intra-node-gbs must be positive, got -450"),
    (["--model", "ViT-B-32", "--inter-node-latency-us", "-1"], "--inter-node-latency-us must be positive, got -1"),
    (["--model", "ViT-B-32", "--op-us", "nan"], "--op-us must be positive, got nan"),
    (["--model", "ViT-B-32", "--fp32-tflops", "0"], "--fp32-tflops must be positive, got 0"),
])
def test_bad_input_is_one_message_and_exit_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_zero_setting_deepspeed_refuses_is_one_message(capsys, tmp_path):
    ds_json = tmp_path / "bad.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "lots"}}))
    assert main(["--model", "ViT-B-32", "--zero", "3", "--deepspeed-config", str(ds_json)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ds_json}: zero_optimization is not valid") and "reduce_bucket_size" in err


def test_zero_stage_out_of_range_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--model", "ViT-B-32", "--zero", "5"])
    assert stop.value.code == 2
    assert "argument --zero: invalid choice: 5" in capsys.readouterr().err


def test_bad_model_exits_2_without_traceback_from_the_shell():
    done = subprocess.run([sys.executable, "-m", "tuneclip_ds.plan", "--model", "ViT-Nope-99"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: --model 'ViT-Nope-99' is not an open_clip model" in done.stderr


# ---------------------------------------------------------------- loss time


def test_loss_time_of_a_small_case_is_the_formula_by_hand(monkeypatch):
    monkeypatch.setitem(OPS_PER_HOP, "infonce", HopOps(forward=10, backward=20, matmuls=3))
    setup = Setup(nodes=2, gpus_per_node=2, batch_size=4, precision="fp32", loss="infonce")
    links = Links(intra_node_gbs=0.1, inter_node_gbs=0.01, intra_node_latency_us=1, inter_node_latency_us=5, op_us=2,
                  fp32_tflops=1e-3, bf16_tflops=1)
    times = loss_times(8, setup, links)
    # 4 ranks, blocks of 4 x 8 fp32: forward both features, 256 bytes; backward both features and
    # 4 x (1 + 2 x 2) fp32 statistics, 336 bytes; one matmul 2 x 4 x 4 x 8 = 256 flops
    launches = 4 * (10 + 20) * 2  # every block visited, its own too
    matmuls = 4 * 3 * 256 / 1e9 * 1e6
    expected = {
        "ring": (3, 2 * 3 * 5, launches, 3 * 592 / 1e7 * 1e6, matmuls),  # 3 hops, all at the inter-node link
        # 1 step of the gather inside a node, 1 hop of node blocks (2 ranks' blocks) between nodes
        "hierarchical": (1, 2 * (1 + 5), launches, (592 / 1e8 + 2 * 592 / 1e7) * 1e6, matmuls),
        # 3 steps of one all-gather of both features; the 16 x 16 matrix: 3 matmuls of 2 x 16 x 16 x 8 flops
        "all-gather": (3, 3 * 5, 0, 3 * 256 / 1e7 * 1e6, 3 * 2 * 16 * 16 * 8 / 1e9 * 1e6),
    }
    for topology, (hops, latency, launch, transfer, matmul) in expected.items():
        time = times[topology]
        assert time.hops == hops
        assert [1e6 * part for part in (time.latency, time.launch, time.transfer, time.matmul)] == pytest.approx(
            [latency, launch, transfer, matmul], rel=1e-12), topology


@pytest.mark.parametrize("loss", LOSSES)
def test_16bit_features_take_the_16bit_matmul_rate_and_the_ops_their_casts_add(loss):
    fp32 = Setup(nodes=2, gpus_per_node=4, batch_size=64, precision="fp32", loss=loss)
    links = Links(fp32_tflops=1, bf16_tflops=8)
    bf16 = dataclasses.replace(fp32, precision="bf16")
    ring32, ring16 = (loss_times(128, setup, links)["ring"] for setup in (fp32, bf16))
    assert ring16.matmul == pytest.approx(ring32.matmul / 8, rel=1e-12)
    extra = sum(hop_ops(loss, "bf16")[:2]) - sum(OPS_PER_HOP[loss][:2])
    assert extra > 0 and ring16.launch - ring32.launch == pytest.approx(8 * extra * links.op_us / 1e6, rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_hierarchical_ring_is_faster_across_nodes_and_the_flat_ring_on_one(vit_b_32, loss):
    for nodes, gpus_per_node in [(2, 8), (32, 8), (128, 4)]:
        times = loss_times(512, Setup(nodes=nodes, gpus_per_node=gpus_per_node, batch_size=256, loss=loss), Links())
        assert times["hierarchical"].total < times["ring"].total
        assert times["hierarchical"].launch == times["ring"].launch  # blocks are worked on one by one
    for nodes, gpus_per_node in [(1, 8), (16, 1)]:  # where the loss falls back to the flat ring
        times = loss_times(512, Setup(nodes=nodes, gpus_per_node=gpus_per_node, batch_size=256, loss=loss), Links())
        assert times["hierarchical"] == times["ring"]


def test_the_towers_time_is_their_blocks_flops_by_hand(vit_b_32):
    towers = (Tower("image", tokens=5, width=4, layers=2, heads=1, mlp_width=16, mlp_saved=2, outer=3),
              Tower("text", tokens=3, width=2, layers=1, heads=1, mlp_width=8, mlp_saved=2, outer=1))
    shape = dataclasses.replace(vit_b_32, towers=towers)
    # forward per sample: image 2 x (2 x 5 x (4 x 4^2 + 2 x 4 x 16) + 4 x 5^2 x 4) = 4640, text 360;
    # backward twice that; 2 samples at 1e6 flop/s
    links = Links(bf16_tflops=1e-6)
    assert towers_time(shape, Setup(batch_size=2), links) == pytest.approx(3 * 5000 * 2 / 1e6)
    assert towers_time(shape, Setup(batch_size=2, grad_checkpointing=True), links) == pytest.approx(4 * 5000 * 2 / 1e6)


def test_the_loss_outlasts_the_towers_from_the_nodes_the_verdict_names(vit_b_32):
    setup, links = Setup(gpus_per_node=8, batch_size=256), Links()
    nodes = nodes_where_loss_passes(vit_b_32, setup, links, "hierarchical")

    def loss_on(nodes):
        return loss_times(vit_b_32.embed_dim, dataclasses.replace(setup, nodes=nodes), links)["hierarchical"].total

    assert 1 < nodes and loss_on(nodes - 1) <= towers_time(vit_b_32, setup, links) < loss_on(nodes)
    assert nodes_where_loss_passes(vit_b_32, setup, Links(op_us=1e-9, intra_node_latency_us=1e-9,
                                                          inter_node_latency_us=1e-9), "hierarchical") > nodes


def test_the_plan_shows_the_loss_time_models_inputs_outputs_and_verdict(capsys):
    argv = ["--model", "ViT-B-16", "--nodes", "32", "--gpus-per-node", "8", "--batch-size", "256", "--loss", "hgcl",
            "--op-us", "5", "--inter-node-gbs", "25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ops = hop_ops("hgcl", "bf16")  # the default precision
    assert ops.forward > OPS_PER_HOP["hgcl"].forward
    assert ("256 ranks = 32 node(s) x 8 ranks per node, batch 256 per rank, features 512, hgcl: "
            f"{ops.forward} + {ops.backward} ops per visited block (forward + backward), {ops.matmuls} matmuls") in out
    assert "constants: intra-node 450 GB/s, 3 us; inter-node 25 GB/s, 8 us; 5 us per op;" in out
    assert "estimates for H100/H200 nodes until measured" in out
    assert "python -m tuneclip_ds.plan.measure --ring-ops" in out
    links = Links(op_us=5, inter_node_gbs=25)
    times = loss_times(512, Setup(nodes=32, gpus_per_node=8, batch_size=256, loss="hgcl"), links)
    for topology, time in times.items():
        parts = (time.total, time.latency, time.launch, time.transfer, time.matmul)
        assert f"\n  {topology:<16}{time.hops:>8,}" + "".join(
            f"{1e3 * part:>{width},.2f}" for part, width in zip(parts, (11, 10, 10, 11, 10))) + "\n" in out
    assert (f"\nloss verdict: the hierarchical ring (loss.topology hierarchical) takes "
            f"{1e3 * times['hierarchical'].total:,.1f} ms per micro-step") in out
    assert main([*argv, "--topology", "ring"]) == 0
    assert f"loss verdict: the flat ring (loss.topology ring) takes {1e3 * times['ring'].total:,.1f} ms" in \
        capsys.readouterr().out


def test_the_loss_verdict_follows_the_experiments_topology_and_one_node(capsys):
    config = os.path.join(ROOT, "configs", "tuneclip_vitb16.yaml")
    assert main(["--config", config, "loss.topology=ring", "--nodes", "2", "--gpus-per-node", "8"]) == 0
    assert "loss verdict: the flat ring (loss.topology ring)" in capsys.readouterr().out
    assert main(["--config", config, "--gpus-per-node", "8"]) == 0
    assert ("loss verdict: the flat ring (hierarchical falls back to it here) (loss.topology hierarchical)"
            in capsys.readouterr().out)


def test_measure_ring_ops_counts_and_times_a_hop():
    done = subprocess.run([sys.executable, "-m", "tuneclip_ds.plan.measure", "--ring-ops", "--loss", "siglip",
                           "--repeats", "20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ops_per_hop"] == list(OPS_PER_HOP["siglip"][:2]) and result["device"] == "cpu"
    ops = sum(OPS_PER_HOP["siglip"][:2])
    assert result["us_per_hop_beyond_ops"] == pytest.approx(1e3 * result["ms_per_hop"] - ops * result["us_per_op"])
    assert result["ms_per_step"]["3"] > result["ms_per_step"]["2"] > 0 and result["us_per_op"] > 0
