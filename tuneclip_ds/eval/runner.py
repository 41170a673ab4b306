"""``evaluate()``: zero-shot classification and image-text retrieval over a suite, on one or many ranks."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from tuneclip_ds.config import ConfigError
from tuneclip_ds.data.shards import DataError
from tuneclip_ds.eval.collectives import all_reduce_sum, gather_sorted
from tuneclip_ds.eval.data import ImageFolder, Shards, open_data, rank_loader
from tuneclip_ds.eval.encoder import BatchEncoder, pad_rows
from tuneclip_ds.eval.metrics import RECALL_AT, TOP_K, hits_at_k, retrieval_hits
from tuneclip_ds.eval.tasks import EvalTask, Suite, Template, classnames_of, fill_template, templates_of
from tuneclip_ds.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class OpenTask:
    """A task with its data source, and for classification its class names and templates."""

    task: EvalTask
    data: ImageFolder | Shards
    classnames: list[str] | None = None
    templates: list[Template] | None = None


def open_task(task: EvalTask) -> OpenTask:
    """Check a task's inputs without reading images: data path, class folders, class names, templates."""
    data = open_data(task)
    if task.kind == "retrieval":
        return OpenTask(task, data)
    classnames = data.class_names if task.classnames is None else classnames_of(task)
    if classnames is None:
        raise ConfigError(f"task {task.name}: shards do not name their classes: set classnames "
                          "(imagenet, synthetic, or a text file with one name per label)")
    if data.class_names is not None and len(data.class_names) != len(classnames):
        raise DataError(f"task {task.name}: {task.data_path} has {len(data.class_names)} class folders but "
                        f"classnames={task.classnames!r} has {len(classnames)} names: the class names do not "
                        "match the labels (one name per folder, in sorted folder order)")
    return OpenTask(task, data, classnames, templates_of(task))


def check_suite(suite: Suite) -> None:
    """Every task's inputs checked (see :func:`open_task`): cheap, so a run can fail before it starts."""
    for task in suite.tasks:
        open_task(task)


def evaluate(model, tasks: Suite | Sequence[EvalTask], preprocess: Callable, tokenizer: Callable, device,
             rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Metrics of every task (``"{task}/top1"``, ``"{task}/image_to_text_R@1"``, ...) and the suite's averages.

    ``model``: anything :func:`tuneclip_ds.eval.encoder.encode` accepts (an open_clip model, or a
    ``ForwardEncoder`` around a DeepSpeed engine); it is put in eval mode and back. ``preprocess``:
    PIL image -> tensor (the model's validation transform); ``tokenizer``: list of str -> token
    tensor. With ``world_size > 1`` every rank of the default process group must call this with
    the same arguments: each evaluates its share of the samples and all return the same results,
    equal to a single process's. Progress is shown on rank 0.
    """
    suite = tasks if isinstance(tasks, Suite) else Suite(list(tasks))
    device = torch.device(device)
    opened = [open_task(task) for task in suite.tasks]  # input problems surface before any model call
    results = {}
    with torch.no_grad(), _eval_mode(model):
        for task_inputs in opened:
            task = task_inputs.task
            began = time.perf_counter()
            encoder = BatchEncoder(model, task.batch_size, device, world_size, autocast_dtype)
            run = TaskRun(task_inputs, encoder, preprocess, tokenizer, rank, world_size)
            metrics = run.classify() if task.kind == "classification" else run.retrieve()
            results.update({f"{task.name}/{name}": value for name, value in metrics.items()})
            if rank == 0:
                summary = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
                logger.info("%s: %s (%.1f s)", task.name, summary, time.perf_counter() - began)
    main_metric = {task.name: task.main_metric for task in suite.tasks}
    for name, members in suite.averages.items():
        results[name] = sum(results[f"{member}/{main_metric[member]}"] for member in members) / len(members)
    return results


@contextlib.contextmanager
def _eval_mode(model):
    """No dropout while evaluating; the training mode is restored afterwards (a wrapper's ``module`` too)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class TaskRun:
    """One task evaluated on this rank."""

    inputs: OpenTask
    encoder: BatchEncoder
    preprocess: Callable
    tokenizer: Callable
    rank: int
    world_size: int

    @property
    def task(self) -> EvalTask:
        return self.inputs.task

    def classify(self) -> dict[str, float]:
        classifier = self.zero_shot_classifier()
        counts = torch.zeros(len(TOP_K) + 1, dtype=torch.int64, device=self.encoder.device)  # hits at k..., samples
        for indices, embeddings, labels in self.image_embeddings():
            labels = self.checked_labels(indices, labels, num_classes=len(classifier))
            # scored on the padded batch too: one matmul shape whatever the world size
            scores = (pad_rows(embeddings, self.encoder.batch_size) @ classifier.T)[: len(labels)]
            correct = F.one_hot(labels, len(classifier)).bool()
            counts += torch.cat([hits_at_k(scores, correct, TOP_K), counts.new_tensor([len(labels)])])
        *hits, total = all_reduce_sum(counts, self.world_size).tolist()
        self.check_not_empty(total)
        return {f"top{k}": count / total for k, count in zip(TOP_K, hits)}

    def zero_shot_classifier(self) -> torch.Tensor:
        """``(classes, dim)``: per class, the normalised mean of its normalised prompt embeddings (as CLIP).

        Ranks split the classes (class c on rank ``c % world_size``) and share the result.
        """
        names, templates = self.inputs.classnames, self.inputs.templates
        mine = list(range(self.rank, len(names), self.world_size))
        if self.rank == 0:
            logger.info("%s: zero-shot classifier of %d classes x %d templates", self.task.name, len(names),
                        len(templates))
        prompts = self.text_embeddings([fill_template(t, names[c]) for c in mine for t in templates])
        size = len(templates)
        rows = [F.normalize(prompts[i * size : (i + 1) * size].mean(dim=0), dim=0)[None] for i in range(len(mine))]
        device = self.encoder.device
        classifier, _ = gather_sorted(_concat(rows, torch.zeros(0, 0, device=device)),
                                      torch.tensor(mine, dtype=torch.int64, device=device), self.world_size)
        return classifier

    def checked_labels(self, indices: torch.Tensor, labels: list[int], num_classes: int) -> torch.Tensor:
        labels = torch.tensor(labels, dtype=torch.int64, device=self.encoder.device)
        outside = ((labels < 0) | (labels >= num_classes)).nonzero()
        if len(outside):
            first = int(outside[0, 0])
            names = self.task.classnames or "the class folders"
            raise DataError(f"task {self.task.name}: sample {int(indices[first])} has label {int(labels[first])} "
                            f"but {names} gives {num_classes} class names: the class names do not match the labels")
        return labels

    def retrieve(self) -> dict[str, float]:
        image_parts, image_indices, captions, caption_images = [], [], [], []
        for indices, embeddings, caption_lists in self.image_embeddings():
            image_parts.append(embeddings)
            image_indices.append(indices)
            for index, texts in zip(indices.tolist(), caption_lists):
                captions += texts
                caption_images += [index] * len(texts)
        device = self.encoder.device
        text_embeddings = self.text_embeddings(captions)
        images, image_ids = gather_sorted(_concat(image_parts, torch.zeros(0, 0, device=device)),
                                          _concat(image_indices, torch.zeros(0, dtype=torch.int64)).to(device),
                                          self.world_size)
        texts, text_image = gather_sorted(text_embeddings, torch.tensor(caption_images, dtype=torch.int64,
                                                                        device=device), self.world_size)
        self.check_not_empty(len(images))
        assert torch.equal(image_ids, torch.arange(len(images), device=device)), "every sample once, in order"
        hits = all_reduce_sum(retrieval_hits(images, texts, text_image, self.encoder.batch_size, self.rank,
                                             self.world_size), self.world_size).tolist()
        metrics = {f"image_to_text_R@{k}": count / len(images) for k, count in zip(RECALL_AT, hits)}
        metrics |= {f"text_to_image_R@{k}": count / len(texts) for k, count in zip(RECALL_AT, hits[len(RECALL_AT):])}
        metrics["mean_R@1"] = (metrics["image_to_text_R@1"] + metrics["text_to_image_R@1"]) / 2
        return metrics

    def image_embeddings(self):
        """``(indices, embeddings, targets)`` batches of this rank's samples, with progress on rank 0."""
        loader = rank_loader(self.inputs.data, self.task, self.preprocess, self.rank, self.world_size)
        dummy = self.preprocess(Image.new("RGB", (64, 64)))[None]  # for the lockstep forwards of a rank out of data
        # on rank 0 (and a terminal); the task's result line follows in any case
        with progress_bar(desc=self.task.name, total=self.inputs.data.num_samples, unit="img",
                          show=self.rank == 0, leave=False) as progress:
            for batch in self.encoder.image_batches(loader, dummy):
                progress.update(len(batch[0]) * self.world_size)  # rank 0's share times the ranks: about all
                yield batch

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.all_texts(self.tokenizer(texts), dummy_tokens=self.tokenizer([""]))

    def check_not_empty(self, num_samples: int) -> None:
        if num_samples == 0:
            raise DataError(f"task {self.task.name}: no samples in {self.task.data_path}")


def _concat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` that gives ``empty`` for no parts (a rank may have no samples)."""
    return torch.cat(parts) if parts else empty
