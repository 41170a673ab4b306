"""Evaluation tasks and suites: what to evaluate, read from a YAML file.

A suite file lists tasks, optional defaults shared by them, and named averages::

    defaults: {batch_size: 128, num_workers: 4}
    tasks:
      - name: imagenet
        kind: classification
        data: ${EVAL_DATA}/imagenet/val   # image folder (a sub-folder per class) or WebDataset shards
        classnames: imagenet              # imagenet | synthetic | a text file | a class folder | omitted: the
                                          # data's folder names
        templates: openai                 # openai | simple | synthetic | a text file
      - name: mscoco
        kind: retrieval
        data: ${EVAL_DATA}/wds_mscoco_captions/test
    averages:
      average: all                        # or a list of task names

Data paths expand ``~`` and environment variables; relative paths are taken from the
working directory. Every key is checked: an unknown key or a wrong type is a
``ConfigError`` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from tuneclip_ds.config import ConfigError, Origins, _build
# Template and fill_template are used from here too (the runner): evaluation's names for them.
from tuneclip_ds.data.labels import Template, fill_template, read_classnames, read_templates  # noqa: F401

# The main metric of each task kind: the one suite averages use.
MAIN_METRIC = {"classification": "top1", "retrieval": "mean_R@1"}


@dataclass
class EvalTask:
    name: str  # results are keyed "{name}/{metric}"
    kind: Literal["classification", "retrieval"]
    data: str  # classification: image folder or shards; retrieval: shards (one caption per line of txt)
    # class names: "imagenet", "synthetic", a text file (a name per line, in label order) or a class folder (its
    # sub-folder names); None: the folder names of the data
    classnames: Optional[str] = None
    templates: str = "openai"  # "openai", "simple", "synthetic", or a text file (a template per line, {} or {c})
    label_field: str = "cls"  # shards: a tar member holding the label as text, else this key of the sample's json
    batch_size: int = 64
    num_workers: int = 2  # DataLoader workers per rank

    @property
    def main_metric(self) -> str:
        return MAIN_METRIC[self.kind]

    @property
    def data_path(self) -> str:
        return os.path.expanduser(os.path.expandvars(self.data))


@dataclass
class Suite:
    tasks: list[EvalTask]
    averages: dict[str, list[str]] = field(default_factory=dict)  # result key -> task names (main metrics averaged)


_SUITE_KEYS = ("tasks", "defaults", "averages")


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file: structure and values (``check_suite`` and ``evaluate`` check the data)."""
    source = str(path)
    raw = _read_mapping(path)
    unknown = sorted(set(raw) - set(_SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {', '.join(unknown)} (known: {', '.join(_SUITE_KEYS)})")
    defaults = raw.get("defaults") or {}
    _build(EvalTask, {"name": "", "kind": "classification", "data": "", **_mapping(defaults, "defaults", source)},
           prefix="defaults.", origins=Origins(source))  # checks the defaults' keys and types under their own name
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: 'tasks' must be a non-empty list of tasks")
    tasks = [_task(entry, defaults, f"tasks[{i}].", source) for i, entry in enumerate(entries)]
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{source}: task names must be unique, repeated: {', '.join(duplicates)}")
    averages = _averages(raw.get("averages") or {}, names, source)
    return Suite(tasks, averages)


def _read_mapping(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"suite file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"suite file {path} is not valid YAML: {error}") from None
    return _mapping(raw, "top level", str(path))


def _mapping(value, where: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
    return value


def _task(entry, defaults: dict, prefix: str, source: str) -> EvalTask:
    entry = _mapping(entry, prefix.rstrip("."), source)
    merged = {**defaults, **entry}
    required = [f.name for f in dataclasses.fields(EvalTask) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in merged]
    if missing:
        raise ConfigError(f"{source}: {prefix}{missing[0]} is missing (every task needs {', '.join(required)})")
    task = _build(EvalTask, merged, prefix=prefix, origins=Origins(source))
    if task.batch_size < 1 or task.num_workers < 0:
        raise ConfigError(f"{source}: {prefix}batch_size must be at least 1 and num_workers at least 0, "
                          f"got {task.batch_size} and {task.num_workers}")
    return task


def _averages(raw, task_names: list[str], source: str) -> dict[str, list[str]]:
    averages = {}
    for name, members in _mapping(raw, "averages", source).items():
        members = task_names if members == "all" else members
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{source}: averages.{name} must be 'all' or a non-empty list of task names, "
                              f"got {members!r}")
        unknown = [m for m in members if m not in task_names]
        if unknown:
            raise ConfigError(f"{source}: averages.{name} names unknown task {', '.join(unknown)} "
                              f"(tasks: {', '.join(task_names)})")
        averages[str(name)] = members
    return averages


# ---------------------------------------------------------------- class names and templates


def classnames_of(task: EvalTask) -> list[str]:
    """The task's class names (see ``tuneclip_ds.data.labels``; ``classnames: None`` is the data reader's job)."""
    return read_classnames(task.classnames, f"task {task.name}")


def templates_of(task: EvalTask) -> list[Template]:
    return read_templates(task.templates, f"task {task.name}")
