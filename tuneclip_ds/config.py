"""The experiment config: a typed dataclass tree loaded from YAML, with dotted overrides.

Every key is checked: an unknown key, a value of the wrong type or out of its range is a
``ConfigError`` that names the key and where it came from (the file, or the command-line override).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tuneclip_ds.errors import InputError


class ConfigError(InputError):
    """A config file or override that cannot be used as it is."""


@dataclass
class SyntheticConfig:
    """The generated corpus used when ``data.train_shards`` holds no shards yet."""

    num_samples: int = 4096
    samples_per_shard: int = 256
    image_size: int = 64
    difficulty: float = 0.3
    paraphrase: float = 0.0  # captions with synonyms and paraphrases (semantic duplicates), in [0, 1]
    seed: int = 0
    split: str = "train"  # the training split's name (and shard prefix): splits of other names are disjoint
    domain: Literal["standard", "shifted"] = "standard"  # the training split's scenery (shifted: unseen ones)
    val_shards: str = ""  # also write a held-out split here (for evaluation) when it has no shards
    val_samples: int = 512
    shifted_val_shards: str = ""  # ... and a held-out split of unseen scenery (distribution shift)


@dataclass
class ImageAugmentationConfig:
    """open_clip's AugmentationCfg fields over a preset (none: open_clip's training transform); unset: the
    preset's."""

    preset: Literal["none", "weak", "strong"] = "none"
    scale: Optional[tuple[float, float]] = None  # random resized crop's area range
    ratio: Optional[tuple[float, float]] = None  # its aspect ratios (use_timm)
    color_jitter: Optional[tuple[float, float, float, float]] = None  # brightness, contrast, saturation, hue
    color_jitter_prob: Optional[float] = None
    gray_scale_prob: Optional[float] = None
    blur_prob: Optional[float] = None  # Gaussian blur (sigma 0.1-2), ours
    re_prob: Optional[float] = None  # random erasing (use_timm)
    re_count: Optional[int] = None
    use_timm: Optional[bool] = None  # timm's create_transform instead of open_clip's


@dataclass
class TextAugmentationConfig:
    """Caption augmentation, drawn per (seed, epoch, sample id)."""

    multi_caption: bool = False  # a txt of several lines, or a json "captions" list: one caption per epoch
    delete: float = 0.0  # each word dropped with this probability (a caption keeps at least one)
    swap: float = 0.0  # swaps of two random words: this fraction of the caption's words
    stop_words: float = 0.0  # each English stop word dropped with this probability
    token_dropout: float = 0.0  # each token but start, end and padding dropped, after tokenising

    @property
    def active(self) -> bool:
        return self != TextAugmentationConfig()


@dataclass
class LabelsConfig:
    """Labelled training data (FLYP): each sample's caption is one of ``templates`` filled with the name of
    its class, drawn anew every epoch; the shards' own captions are not read."""

    classnames: str = ""  # "imagenet", "synthetic", a text file (a name per line, in label order) or a class folder
    templates: str = "openai"  # "openai", "simple", "synthetic", or a text file (a template per line, {} or {c})
    label_field: str = "cls"  # a tar member holding the label as text, else this key of the sample's json


@dataclass
class SourceConfig:
    """One of several training sources (data.sources), drawn from in proportion to its weight."""

    shards: str = ""  # a folder, a brace pattern or a '::'-joined list, as data.train_shards
    weight: float = 1.0
    num_samples: Optional[int] = None  # its ids lie in [0, num_samples); later sources' ids are offset by it


@dataclass
class DataConfig:
    train_shards: str = "data/synthetic/train"  # a folder, a brace pattern, or '::'-joined list
    synthetic: Optional[SyntheticConfig] = None  # generate into train_shards when it is empty
    labels: Optional[LabelsConfig] = None  # labelled shards: captions from class names and templates
    num_samples: Optional[int] = None  # corpus size, for epoch-based schedules (default: synthetic.num_samples)
    # DataLoader workers per rank; 0: read in the training process; null: automatic, this rank's CPUs less one
    # (at most 8), lowered to what the shards allow (every rank's every worker needs a shard of its own)
    num_workers: Optional[int] = None
    shuffle_buffer: int = 1000
    resampled: bool = False
    sources: list[SourceConfig] = field(default_factory=list)  # several sources mixed by weight (not train_shards)
    augmentation: ImageAugmentationConfig = field(default_factory=ImageAugmentationConfig)
    text_augmentation: TextAugmentationConfig = field(default_factory=TextAugmentationConfig)


@dataclass
class ModelConfig:
    name: str = "ViT-B-16"  # any open_clip model name, or one shipped in tuneclip_ds/model_configs
    pretrained: str = ""  # local file or folder; empty: random initialisation
    tokenizer: str = ""  # a folder of Hugging Face tokenizer files; empty: from the pretrained folder or HF cache
    force_image_size: Optional[int] = None
    freeze_logit_scale: bool = False  # keep the temperature at the checkpoint's value (TuneCLIP's stage II)
    grad_checkpointing: bool = False  # recompute each tower's blocks in backward: less activation memory
    lock_image: bool = False  # freeze the image tower (LiT) ...
    lock_image_unlocked_groups: int = 0  # ... except its last N layer groups
    lock_text: bool = False  # freeze the text tower ...
    lock_text_unlocked_layers: int = 0  # ... except its last N layers


@dataclass
class LossConfig:
    name: Literal["infonce", "siglip", "gcl", "hgcl"] = "infonce"
    tile_size: int = 1024
    # hierarchical: blocks gathered within each node (LOCAL_WORLD_SIZE ranks), a ring across nodes (the flat
    # ring on one node); ring: every rank's block around all ranks
    topology: Literal["ring", "hierarchical"] = "hierarchical"
    # gcl / hgcl: per-sample estimators u with moving-average rate gamma (cosine from 1 to gamma_min)
    margin: float = 0.1  # hgcl's hinge margin m
    eps: float = 1e-14
    gamma_min: float = 0.8
    gamma_decay_epochs: float = 1.0
    label_smoothing: float = 0.0  # infonce: cross-entropy targets (1 - e) on the pair, e spread over the batch
    same_label_positives: bool = False  # labelled data: pairs of one class are positives, not negatives


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    implementation: Literal["torch", "deepspeed"] = "torch"  # torch.optim.AdamW or DeepSpeed's FusedAdam
    # Layer-wise rate decay (BEiT, FT-CLIP): in a tower of N blocks, the embeddings are layer 0, block k is
    # layer k + 1, the final norms and projections layer N + 1, and layer l trains at rate * decay^(N + 1 - l).
    layer_decay: float = 1.0  # 1: off
    image_layer_decay: Optional[float] = None  # one tower's own decay (default: layer_decay)
    text_layer_decay: Optional[float] = None
    # One tower's own base rate and weight decay (default: lr, weight_decay); the logit scale and bias
    # always train at lr without weight decay.
    image_lr: Optional[float] = None
    text_lr: Optional[float] = None
    image_weight_decay: Optional[float] = None
    text_weight_decay: Optional[float] = None


RECOVERABLE = ("m", "v", "u")  # osr.recover's choices


@dataclass
class OSRConfig:
    """TuneCLIP stage I (optimizer statistics recovery): training steps with the learning rate frozen
    at 0, so that Adam's moments and the loss's estimators recover while the weights stay unchanged."""

    steps: Optional[int] = None  # stage I length in optimizer steps ...
    epochs: Optional[float] = None  # ... or in epochs of the corpus; neither: no stage I
    until_converged: Optional[float] = None  # end early once ||m||, ||v|| (and mean u) change by less than this
    patience: int = 20  # ... (relative change per step) for this many steps in a row
    min_steps: int = 0  # never end early before this step
    # The statistics recovered in stage I that stage II starts from: m (Adam's exp_avg), v (exp_avg_sq),
    # u (the loss's per-sample estimators). One left out starts fresh (ablations; e.g. [v]: "v only").
    recover: list[str] = field(default_factory=lambda: list(RECOVERABLE))


WAIT_TIMEOUT_MINUTES = 240.0  # train.wait_timeout_minutes, and for python -m tuneclip_ds.eval


@dataclass
class TrainConfig:
    # The length of fine-tuning (stage II, after any stage I), exactly one of:
    steps: Optional[int] = None  # optimizer steps,
    samples: Optional[int] = None  # samples seen (global batch x steps),
    epochs: Optional[float] = None  # or epochs of the corpus (needs its size)
    batch_size: int = 32  # per rank, per micro-step
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: float = 1.0  # 0 disables clipping
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    deepspeed_config: Optional[str] = None  # a JSON file; default: ds_configs/ by zero_stage/offload
    on_nonfinite_loss: Literal["skip", "stop"] = "stop"
    max_skipped_steps: int = 10  # with "skip": stop after this many non-finite steps in a row
    # How long the other ranks wait while rank 0 works alone (converting a checkpoint for another world size,
    # loading the model for ZeRO-3, writing the synthetic corpus, pruning checkpoints): over a gloo group of
    # their own, outside the training collectives and their shorter timeout (NCCL's watchdog).
    wait_timeout_minutes: float = WAIT_TIMEOUT_MINUTES


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between saves; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    save_at_end: bool = True
    # "": start fresh; "latest": the run's newest complete checkpoint (an error if none);
    # "auto": latest if there is one, else start fresh (for requeued jobs); or a checkpoint path
    resume: str = ""


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training, on every rank, with the best checkpoint kept."""

    tasks: str = ""  # a suite YAML (see configs/eval/); empty: no evaluation during training
    every: int = 0  # stage-II steps between evaluations; they also run when stage II starts and at the end
    at_steps: list[int] = field(default_factory=list)  # also after these steps of stage II (e.g. [1, 2, 5])
    select: str = ""  # the result that picks the best checkpoint, e.g. imagenet/top1 or average; empty: none
    mode: Literal["max", "min"] = "max"
    # The weights evaluated: the model's, their EMA (ema.decay; results named ema/...), or both.
    weights: Literal["model", "ema", "both"] = "model"


@dataclass
class EMAConfig:
    """An exponential moving average of the weights over stage II, kept in fp32 and sharded like the optimizer
    (tuneclip_ds/optim/ema.py). It equals the weights until stage-II step ``start_step``; from there, after
    every ``every``-th step: ema <- decay_t * ema + (1 - decay_t) * weights."""

    decay: Optional[float] = None  # in [0, 1), e.g. 0.999; null: no EMA
    every: int = 1  # stage-II steps between updates
    start_step: int = 0  # the stage-II step of the first update; the EMA copies the weights until then
    warmup: bool = False  # decay_t = min(decay, (1 + t) / (10 + t)), t = updates so far: early weights fade fast
    device: Literal["same", "cpu"] = "same"  # "same": where the fp32 masters are; "cpu": in CPU memory


@dataclass
class LogConfig:
    every: int = 10  # steps between progress lines and TensorBoard scalars
    timing: bool = True  # rank 0 logs where a step's time goes (time/*: data, forward, loss, ...)


@dataclass
class Config:
    run_name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/run_name
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    osr: OSRConfig = field(default_factory=OSRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment file, apply ``a.b=value`` overrides, validate everything."""
    raw: dict = {}
    origins = Origins("<defaults>")
    if path is not None:
        raw = _read_yaml(Path(path))
        origins = Origins(str(path), {key: str(path) for key in _dotted_keys(raw)})
    for item in overrides:
        origins.record(_apply_override(raw, item), f"override {item}")
    config = _build(Config, raw, prefix="", origins=origins)
    if _switched_off(raw.get("eval"), "tasks"):
        config.eval.select = ""  # no evaluation (e.g. `eval.tasks=` on the command line): nothing to select by
    _check(config, origins)
    return config


def load_model_config(path: str | Path) -> ModelConfig:
    """The model section of a config file alone (a run's saved config.yaml): readable when keys of other
    sections have changed since the run was launched."""
    raw = _read_yaml(Path(path)).get("model") or {}
    return _build(ModelConfig, raw, prefix="model.", origins=Origins(str(path)))


@dataclass
class Origins:
    """Where each key's value came from, for messages: the config file, or the override that set the key
    or a section above it."""

    file: str  # the YAML file, or "<defaults>" without one
    set_by: dict[str, str] = field(default_factory=dict)  # dotted key -> the file or "override KEY=VALUE"

    def record(self, key: str, origin: str) -> None:
        """``key`` (and everything under it) now comes from ``origin``."""
        self.set_by = {k: v for k, v in self.set_by.items() if not k.startswith(key + ".")}
        self.set_by[key] = origin

    def of(self, *keys: str) -> str:
        """The origins of ``keys`` that were set, joined; the file when none was."""
        found = []
        for origin in map(self._origin, keys):
            if origin is not None and origin not in found:
                found.append(origin)
        return " and ".join(found) or self.file

    def _origin(self, key: str) -> str | None:
        """Who set ``key`` or the nearest section above it; None: nobody (the default value)."""
        parts = key.split("[")[0].split(".")  # optim.betas[1] was set as optim.betas
        for length in range(len(parts), 0, -1):
            section = ".".join(parts[:length])
            if section in self.set_by:
                return self.set_by[section]
        return None

    def error(self, message: str, *keys: str) -> ConfigError:
        return ConfigError(f"{self.of(*keys)}: {message}")


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in raw.items():
        keys.append(prefix + str(name))
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _apply_override(raw: dict, item: str) -> str:
    """Set ``key.sub=value`` in ``raw``; returns the dotted key."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {name} is not a section")
    node[leaf] = yaml.safe_load(text) if text.strip() else None
    return key.strip()


def _switched_off(section: Any, key: str) -> bool:
    """``section`` sets ``key`` empty on purpose (unset keys keep their defaults)."""
    return isinstance(section, dict) and key in section and section[key] in (None, "")


def _build(cls: type, raw: Any, prefix: str, origins: Origins):
    if not isinstance(raw, dict):
        key = prefix.rstrip(".")
        raise origins.error(f"'{key or 'top level'}' must be a mapping, got {raw!r}", key)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        keys = [prefix + k for k in unknown]
        raise origins.error(f"unknown key {', '.join(keys)} (known in this section: {', '.join(fields)})", *keys)
    values = {name: _convert(hints[name], _null_as_empty(fields[name], raw[name]), prefix + name, origins)
              for name in raw}
    return cls(**values)


def _null_as_empty(spec: dataclasses.Field, value: Any) -> Any:
    """For the string keys that an empty value switches off (eval.tasks, model.pretrained, ...), null means
    empty too: the value of an empty override such as ``eval.tasks=``."""
    return "" if value is None and spec.default == "" else value


def _convert(hint: Any, value: Any, key: str, origins: Origins) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, key + ".", origins)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, origins)
    if origin is Literal:
        if value not in args or isinstance(value, bool):  # True == 1 would pass for stage 1
            raise origins.error(f"{key} must be one of {list(args)}, got {value!r}", key)
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise origins.error(f"{key} must be a list, got {value!r}", key)
        return [_convert(args[0], v, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise origins.error(f"{key} must be a list of {len(args)} values, got {value!r}", key)
        return tuple(_convert(a, v, f"{key}[{i}]", origins) for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise origins.error(f"{key} must be of type {hint.__name__}, got {value!r}", key)
    return value


@dataclass(frozen=True)
class Range:
    """The finite numbers from ``low`` to ``high`` (each excluded when ``low_open``, ``high_open``)."""

    low: float
    high: float = math.inf
    high_open: bool = False
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above_low and below_high

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
BETA = Range(0, 1, high_open=True)  # Adam's moving-average rates
LAYER_DECAY = Range(0, 1, low_open=True)  # 0 would leave the lower layers untrained; above 1 they outrun the top


def _ranged_values(config: Config) -> dict[str, tuple[float | None, Range]]:
    """Every number with a valid range (torch's AdamW refuses a negative lr, eps or weight decay and betas
    outside [0, 1)), by key; None: not set."""
    optim, train, osr = config.optim, config.train, config.osr
    return {
        "optim.lr": (optim.lr, AT_LEAST_0),
        "optim.weight_decay": (optim.weight_decay, AT_LEAST_0),
        "optim.betas[0]": (optim.betas[0], BETA),
        "optim.betas[1]": (optim.betas[1], BETA),
        "optim.eps": (optim.eps, AT_LEAST_0),
        "optim.warmup_steps": (optim.warmup_steps, AT_LEAST_0),
        "optim.min_lr_ratio": (optim.min_lr_ratio, FRACTION),
        "optim.layer_decay": (optim.layer_decay, LAYER_DECAY),
        "optim.image_layer_decay": (optim.image_layer_decay, LAYER_DECAY),
        "optim.text_layer_decay": (optim.text_layer_decay, LAYER_DECAY),
        "optim.image_lr": (optim.image_lr, AT_LEAST_0),
        "optim.text_lr": (optim.text_lr, AT_LEAST_0),
        "optim.image_weight_decay": (optim.image_weight_decay, AT_LEAST_0),
        "optim.text_weight_decay": (optim.text_weight_decay, AT_LEAST_0),
        "loss.gamma_min": (config.loss.gamma_min, FRACTION),
        "loss.label_smoothing": (config.loss.label_smoothing, Range(0, 1, high_open=True)),
        **_augmentation_ranges(config.data),
        "data.num_workers": (config.data.num_workers, AT_LEAST_0),
        "train.steps": (train.steps, AT_LEAST_0),
        "train.samples": (train.samples, AT_LEAST_0),
        "train.epochs": (train.epochs, AT_LEAST_0),
        "train.grad_clip": (train.grad_clip, AT_LEAST_0),
        "train.max_skipped_steps": (train.max_skipped_steps, AT_LEAST_0),
        "train.wait_timeout_minutes": (train.wait_timeout_minutes, POSITIVE),
        "osr.steps": (osr.steps, AT_LEAST_0),
        "osr.epochs": (osr.epochs, AT_LEAST_0),
        "osr.until_converged": (osr.until_converged, AT_LEAST_0),
        "osr.min_steps": (osr.min_steps, AT_LEAST_0),
        "checkpoint.every": (config.checkpoint.every, AT_LEAST_0),  # 0: only at the end
        "eval.every": (config.eval.every, AT_LEAST_0),  # 0: at the start of stage II and the end only
        "ema.decay": (config.ema.decay, BETA),  # 1 would never move from the starting weights
        "ema.start_step": (config.ema.start_step, AT_LEAST_0),
        "train.batch_size": (train.batch_size, AT_LEAST_1),
        "train.grad_accum": (train.grad_accum, AT_LEAST_1),
        "log.every": (config.log.every, AT_LEAST_1),
        "loss.tile_size": (config.loss.tile_size, AT_LEAST_1),
        "checkpoint.keep_last": (config.checkpoint.keep_last, AT_LEAST_1),
        "osr.patience": (osr.patience, AT_LEAST_1),
        "ema.every": (config.ema.every, AT_LEAST_1),
    }


def _augmentation_ranges(data: DataConfig) -> dict[str, tuple[float | None, Range]]:
    image, text = data.augmentation, data.text_augmentation
    ranges = {f"data.text_augmentation.{name}": (getattr(text, name), FRACTION)
              for name in ("delete", "swap", "stop_words", "token_dropout")}
    ranges |= {f"data.augmentation.{name}": (getattr(image, name), FRACTION)
               for name in ("color_jitter_prob", "gray_scale_prob", "blur_prob", "re_prob")}
    for index, bound in enumerate(image.scale or ()):
        ranges[f"data.augmentation.scale[{index}]"] = (bound, Range(0, 1, low_open=True))
    for index, source in enumerate(data.sources):
        ranges[f"data.sources[{index}].weight"] = (source.weight, POSITIVE)
        ranges[f"data.sources[{index}].num_samples"] = (source.num_samples, AT_LEAST_1)
    return ranges


def _check_data(data: DataConfig, origins: Origins) -> None:
    if data.sources:
        _check_sources(data, origins)
    image = data.augmentation
    timm_only = [name for name in ("ratio", "re_prob", "re_count") if getattr(image, name) is not None]
    if timm_only and not image.use_timm:
        raise origins.error(f"data.augmentation.{timm_only[0]} is used by timm's transform only: set "
                            "data.augmentation.use_timm: true (open_clip's own transform ignores it)",
                            f"data.augmentation.{timm_only[0]}")


def _check_sources(data: DataConfig, origins: Origins) -> None:
    if "data.train_shards" in origins.set_by or data.synthetic is not None:
        raise origins.error("data.sources replaces data.train_shards (and data.synthetic): set one or the other",
                            "data.sources", "data.train_shards")
    for index, source in enumerate(data.sources):
        if not source.shards:
            raise origins.error(f"data.sources[{index}].shards is empty: a folder of shards, a brace pattern or a "
                                "'::'-joined list", "data.sources")
        if source.num_samples is None and len(data.sources) > 1:
            raise origins.error(f"data.sources[{index}].num_samples is missing: with several sources each one's ids "
                                "must lie in [0, num_samples), so that offsetting them keeps them distinct",
                                "data.sources")


def _check(config: Config, origins: Origins) -> None:
    for key, (value, valid) in _ranged_values(config).items():
        if value is not None and value not in valid:
            raise origins.error(f"{key} must be {valid}, got {value!r}", key)
    _check_data(config.data, origins)
    train = config.train
    if [train.steps, train.samples, train.epochs].count(None) != 2:
        raise origins.error("set exactly one of train.steps, train.samples and train.epochs",
                            "train.steps", "train.samples", "train.epochs")
    if config.osr.steps is not None and config.osr.epochs is not None:
        raise origins.error("set at most one of osr.steps and osr.epochs", "osr.steps", "osr.epochs")
    recover = config.osr.recover
    if any(name not in RECOVERABLE for name in recover) or len(set(recover)) != len(recover):
        raise origins.error(f"osr.recover must list each of {list(RECOVERABLE)} at most once, got {recover!r}",
                            "osr.recover")
    if config.loss.label_smoothing and config.loss.name != "infonce":
        raise origins.error(f"loss.label_smoothing applies to loss.name=infonce, not {config.loss.name}",
                            "loss.label_smoothing", "loss.name")
    _check_labels(config, origins)
    if config.eval.select and not config.eval.tasks:
        raise origins.error(f"eval.select={config.eval.select!r} needs eval.tasks (a suite YAML)", "eval.select")
    _check_evaluated_weights(config, origins)
    if corpus_size(config) is None:
        for needs_corpus_size, what, key in [
            (config.loss.name in ("gcl", "hgcl"), f"loss.name={config.loss.name} schedules gamma in epochs",
             "loss.name"),
            (train.epochs is not None, "train.epochs is set", "train.epochs"),
            (config.osr.epochs is not None, "osr.epochs is set", "osr.epochs"),
        ]:
            if needs_corpus_size:
                raise origins.error(f"{what}: set data.num_samples (the number of samples in data.train_shards)",
                                    key, "data.num_samples", "data.synthetic")
    if train.offload_optimizer and train.zero_stage == 0:
        raise origins.error("train.offload_optimizer needs train.zero_stage 1, 2 or 3",
                            "train.offload_optimizer", "train.zero_stage")


def _check_labels(config: Config, origins: Origins) -> None:
    labels = config.data.labels
    if labels is not None and not labels.classnames:
        raise origins.error("data.labels.classnames is missing: imagenet, synthetic, a text file with a class name "
                            "per line in label order, or a class folder (its sub-folder names)", "data.labels")
    if config.loss.same_label_positives and labels is None:
        raise origins.error("loss.same_label_positives needs labelled data: set data.labels (class names, templates)",
                            "loss.same_label_positives", "data.labels")


EMA_RESULTS = "ema/"  # the prefix of the EMA's evaluation results


def _check_evaluated_weights(config: Config, origins: Origins) -> None:
    """Evaluating the EMA (eval.weights ema or both) needs one, and eval.select must name a result of the weights
    evaluated."""
    weights, select = config.eval.weights, config.eval.select
    if weights != "model" and config.ema.decay is None and config.eval.tasks:
        raise origins.error(f"eval.weights={weights} evaluates the EMA of the weights: set ema.decay (e.g. 0.999)",
                            "eval.weights", "ema.decay")
    names_ema = select.startswith(EMA_RESULTS)
    if select and weights != "both" and names_ema != (weights == "ema"):
        fix = ("set eval.weights=ema or both" if names_ema
               else f"select {EMA_RESULTS}{select} (the EMA's result) or set eval.weights=both")
        raise origins.error(f"eval.select={select!r} names a result of the {'EMA' if names_ema else 'model'}, which "
                            f"eval.weights={weights} does not evaluate: {fix}", "eval.select", "eval.weights")


def corpus_size(config: Config) -> int | None:
    if config.data.num_samples is not None:
        return config.data.num_samples
    if config.data.sources and all(source.num_samples for source in config.data.sources):
        return sum(source.num_samples for source in config.data.sources)
    return config.data.synthetic.num_samples if config.data.synthetic is not None else None


def to_dict(config: Config) -> dict:
    """A plain, YAML-friendly dict (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
