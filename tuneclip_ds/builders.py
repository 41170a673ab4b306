"""Each component built from its own config section, and the run assembled from them."""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path
import torch

from tuneclip_ds.config import Config, DataConfig, LossConfig, SyntheticConfig, corpus_size
from tuneclip_ds.data.stream import BatchStream
from tuneclip_ds.distributed import set_wait_timeout, wait_for_rank0
from tuneclip_ds.engine import build_ds_config, build_engine
from tuneclip_ds.losses import build_loss
from tuneclip_ds.models import ClipBundle, build_model, build_partitioned_model
from tuneclip_ds.optim import StageClock, StatisticsRecovery
from tuneclip_ds.optim.ema import build_ema
from tuneclip_ds.trainer import Trainer, stage_lengths

logger = logging.getLogger(__name__)


def ensure_synthetic_corpus(data: DataConfig) -> None:
    """Rank 0 writes the synthetic corpus when ``data.synthetic`` is set and the folder has no shards, and
    its held-out split when ``data.synthetic.val_shards`` names a folder without shards (the others wait)."""
    wait_for_rank0(lambda: _write_splits(data))


def _write_splits(data: DataConfig) -> None:
    spec = data.synthetic
    _write_split_once(Path(data.train_shards), spec, spec.num_samples, spec.split, spec.domain)
    if spec.val_shards:
        _write_split_once(Path(spec.val_shards), spec, spec.val_samples, "val")
    if spec.shifted_val_shards:
        _write_split_once(Path(spec.shifted_val_shards), spec, spec.val_samples, "val", domain="shifted")


def _write_split_once(folder: Path, spec: SyntheticConfig, num_samples: int, split: str,
                      domain: str = "standard") -> None:
    from tuneclip_ds.data.synthetic import write_synthetic_corpus

    if any(folder.glob("*.tar")):
        return
    logger.info("writing a synthetic %s split (%s scenery) of %d samples to %s", split, domain, num_samples, folder)
    partial = folder.with_name(folder.name + ".partial")  # renamed when complete: a killed write leaves no shards
    shutil.rmtree(partial, ignore_errors=True)
    write_synthetic_corpus(str(partial), num_samples=num_samples, samples_per_shard=spec.samples_per_shard,
                           image_size=spec.image_size, difficulty=spec.difficulty, seed=spec.seed, split=split,
                           paraphrase=spec.paraphrase, domain=domain)
    if folder.exists():
        folder.rmdir()  # empty (no shards); a folder holding other files is left alone and the rename fails
    partial.rename(folder)


def build_batches(config: Config, bundle: ClipBundle, rank: int, world_size: int) -> BatchStream:
    """This rank's endless stream of training batches, one epoch of its shards after another."""
    from tuneclip_ds.data.augment import CaptionAugmenter, image_train_transform
    from tuneclip_ds.data.labelled import ClassPrompts, LabelledBatches, resolve_labelled_shards
    from tuneclip_ds.data.pipeline import build_train_loader, resolve_shards

    data = config.data
    if data.synthetic is not None:
        ensure_synthetic_corpus(data)
    make_batches = None
    if data.labels is not None:  # captions made from class names and templates
        make_batches = partial(LabelledBatches, ClassPrompts.from_config(data.labels))
    resolve = resolve_shards if make_batches is None else resolve_labelled_shards
    sources = mixed_sources(data, resolve)
    text = data.text_augmentation
    loader = build_train_loader(
        sources[0].shards if sources else resolve(data.train_shards),
        preprocess=image_train_transform(bundle.model, data.augmentation, bundle.preprocess_train),
        tokenizer=bundle.tokenizer,
        batch_size=config.train.batch_size,
        num_workers=data.num_workers,
        rank=rank,
        world_size=world_size,
        seed=config.seed,
        shuffle_buffer=data.shuffle_buffer,
        resampled=data.resampled,
        captions=CaptionAugmenter(text, bundle.tokenizer, config.seed) if text.active else None,
        sources=sources,
        pin_memory=torch.cuda.is_available(),
        make_batches=make_batches,
    )
    return BatchStream(loader)


def mixed_sources(data: DataConfig, resolve) -> list:
    """``data.sources`` with their shards, each one's ids offset past the earlier sources' (none: one source)."""
    from tuneclip_ds.data.pipeline import Source

    sources, offset = [], 0
    for source in data.sources:
        sources.append(Source(resolve(source.shards), source.weight, offset, source.num_samples))
        offset += source.num_samples or 0
    return sources


def build_loss_from_config(loss: LossConfig):
    kwargs = {"tile_size": loss.tile_size, "topology": loss.topology}
    if loss.name in ("gcl", "hgcl"):
        kwargs.update(margin=loss.margin, eps=loss.eps)
    if loss.label_smoothing:
        kwargs.update(label_smoothing=loss.label_smoothing)
    if loss.same_label_positives:
        kwargs.update(same_label_positives=True)
    return build_loss(loss.name, **kwargs)


def build_writer(config: Config, rank: int):
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(config.run_dir))


def build_run(config: Config, rank: int, world_size: int, batches=None) -> Trainer:
    """The trainer of ``config``; ``batches`` (an iterator of batch dicts) replaces the data pipeline."""
    torch.manual_seed(config.seed)
    set_wait_timeout(config.train.wait_timeout_minutes)
    bundle = build_training_model(config, world_size)
    batches = build_batches(config, bundle, rank, world_size) if batches is None else batches
    evaluator = build_evaluator(config, bundle)  # checks the evaluation data before the engine is built
    stage1_steps, stage2_steps = stage_lengths(config, world_size)
    clock = StageClock(stage2_start=None, schedule_start=None) if stage1_steps else StageClock()
    engine = build_engine(config, bundle.model, stage2_steps, clock)
    osr = StatisticsRecovery(engine, clock, config.osr, stage1_steps)
    loss_fn = build_loss_from_config(config.loss)
    if hasattr(loss_fn, "estimators"):  # GCL/HGCL: this rank's share of the corpus, allocated once
        loss_fn.estimators.reserve(corpus_size(config), loss_fn.group_info(), engine.device)
    return Trainer(config, engine, batches, loss_fn, stage2_steps, writer=build_writer(config, rank), osr=osr,
                   evaluator=evaluator, export_record=bundle.export_record(), ema=build_ema(config.ema, engine))


def build_training_model(config: Config, world_size: int) -> ClipBundle:
    """At ZeRO-3 the model is built partitioned (``deepspeed.zero.Init``); otherwise whole on every rank."""
    if config.train.zero_stage == 3:
        return build_partitioned_model(config.model, build_ds_config(config, world_size))
    return build_model(config.model)


def build_evaluator(config: Config, bundle: ClipBundle):
    """Evaluation during training when ``eval.tasks`` names a suite (its inputs are checked now)."""
    if not config.eval.tasks:
        return None
    from tuneclip_ds.eval.periodic import TrainingEvaluator

    return TrainingEvaluator(config.eval, bundle.preprocess_val, bundle.tokenizer)
