"""Class labels, class names and prompt templates: shared by zero-shot evaluation (a classifier from the
class names) and training on labelled data (a caption from a sample's label, FLYP).

Class names come from a built-in list (``imagenet``: open_clip's 1000 names; ``synthetic``), a folder
(its sorted sub-folder names: the labels an image folder gets) or a text file (a name per line, in label
order). Templates come from a built-in list (``openai``: the 80 OpenAI ImageNet prompts; ``simple``;
``synthetic``) or a text file (a template per line, the class name at ``{}`` or ``{c}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Union

from tuneclip_ds.config import ConfigError
from tuneclip_ds.data.shards import ShardFormatError, class_folder_names

Template = Union[str, Callable[[str], str]]


class LabelError(ShardFormatError):
    """A sample without a usable class label: the message names the sample and where the label was looked for."""


def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _synthetic_classnames() -> list[str]:
    from tuneclip_ds.data.synthetic import CLASS_NAMES

    return list(CLASS_NAMES)


def _openai_templates() -> list[Template]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def _simple_templates() -> list[Template]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES)


def _synthetic_templates() -> list[Template]:
    from tuneclip_ds.data.synthetic import ZEROSHOT_TEMPLATES

    return list(ZEROSHOT_TEMPLATES)


BUILTIN_CLASSNAMES = {"imagenet": _imagenet_classnames, "synthetic": _synthetic_classnames}
BUILTIN_TEMPLATES = {"openai": _openai_templates, "simple": _simple_templates, "synthetic": _synthetic_templates}


def read_classnames(spec: str, owner: str) -> list[str]:
    """The class names ``spec`` names (a built-in, a folder of class sub-folders or a text file); ``owner``
    starts error messages (``task imagenet``, ``data.labels``)."""
    if spec in BUILTIN_CLASSNAMES:
        return BUILTIN_CLASSNAMES[spec]()
    path = _expand(spec)
    if path.is_dir():
        return class_folder_names(path, owner)
    return _lines(path, spec, owner, "classnames", list(BUILTIN_CLASSNAMES), "an existing text file or class folder")


def read_templates(spec: str, owner: str) -> list[Template]:
    """The templates ``spec`` names (a built-in or a text file), each with a slot for the class name."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]()
    templates = _lines(_expand(spec), spec, owner, "templates", list(BUILTIN_TEMPLATES), "an existing text file")
    without_slot = [t for t in templates if "{}" not in t and "{c}" not in t]
    if without_slot:
        raise ConfigError(f"{owner}: template {without_slot[0]!r} in {spec} has no {{}} or {{c}} "
                          "where the class name goes")
    return templates


def fill_template(template: Template, classname: str) -> str:
    """open_clip templates are callables; text-file templates use {} or clip_benchmark's {c}."""
    return template(classname) if callable(template) else template.format(classname, c=classname)


def _expand(spec: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(spec)))


def _lines(file: Path, spec: str, owner: str, key: str, builtins: list[str], other: str) -> list[str]:
    if not file.is_file():
        raise ConfigError(f"{owner}: {key}={spec!r} is neither a built-in ({', '.join(builtins)}) nor {other}")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{owner}: {key} file {spec} is empty")
    return lines


def read_label(members: dict, field: str, where: str) -> int:
    """The class label of a sample given as tar members by extension: the member ``field`` as text
    (WebDataset's ``cls``), else the key ``field`` of its json. ``where`` names the sample in errors."""
    if field in members:
        value = members[field].decode("utf-8").strip()
    else:
        metadata = json.loads(members["json"]) if "json" in members else {}
        if field not in metadata:
            raise LabelError(f"{where} has no label: no '{field}' member and no '{field}' field in its json "
                             "(label_field names the member or json field that holds the label)")
        value = metadata[field]
    if isinstance(value, bool) or not str(value).lstrip("-").isdigit():  # not 2.5, true, "cat"
        raise LabelError(f"{where} has label {value!r} in its '{field}', not an integer class index")
    return int(value)
