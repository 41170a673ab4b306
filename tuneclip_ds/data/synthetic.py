"""A learnable synthetic image-text corpus of rendered shapes, written as WebDataset shards.

Each image shows a main shape (its shape and color are the sample's class label) with a
size and a position, on a plain or textured background, possibly with smaller distractor
shapes and pixel noise. Captions name these attributes with varied templates, so a tiny
CLIP learns them in a few hundred steps. ``CLASS_NAMES`` and ``ZEROSHOT_TEMPLATES`` serve
zero-shot evaluation.

``paraphrase`` (0..1) words captions like web text: synonyms ("crimson disc", "big box"), the size
left out, paraphrasing templates and shape counts, so that many pairs of a batch are semantic
duplicates (false negatives of a contrastive loss). The ``shifted`` domain draws the same
classes on unseen backgrounds, textures and sizes: a distribution-shift test split.

Sample ids are 0..n-1 within each split, so a held-out split reuses the train split's id
range: write each split to its own directory (or select shards by prefix).

    python -m tuneclip_ds.data.synthetic --out data/synthetic/train --num-samples 4096
    python -m tuneclip_ds.data.synthetic --out data/synthetic/val --num-samples 512 --split val
    python -m tuneclip_ds.data.synthetic --out data/synthetic/shifted --num-samples 512 --split val --domain shifted
"""

import argparse
import dataclasses
import io
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from tuneclip_ds.data.shards import ImageTextSample, write_shards

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
# Neutral backgrounds, so a color word always refers to a shape.
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128)}
TEXTURES = ("striped", "checkered")  # backgrounds are otherwise "plain"
SIZES = {"small": 0.3, "large": 0.5}  # shape extent as a fraction of the image side


@dataclass(frozen=True)
class Domain:
    """What the scenery looks like: backgrounds, textures (drawn with at least ``min_texture_probability``)
    and the main shape's sizes. The classes (shape and color) are the same in every domain."""

    backgrounds: dict
    textures: tuple
    sizes: dict
    min_texture_probability: float = 0.0


DOMAINS = {
    "standard": Domain(BACKGROUNDS, TEXTURES, SIZES),
    # Unseen in the standard domain: background colors, texture patterns and sizes.
    "shifted": Domain({"beige": (215, 200, 170), "slate": (70, 80, 90), "olive": (110, 110, 60)},
                      ("dotted", "diagonal"), {"small": 0.24, "large": 0.62}, min_texture_probability=0.5),
}
DISTRACTOR_SCALE = 0.2  # smaller than any main shape, so the main shape stays the visible subject
ROWS = ("top", "", "bottom")
COLUMNS = ("left", "", "right")

CLASS_NAMES = [f"{color} {shape}" for shape in SHAPES for color in COLORS]
# With paraphrase p, a word is replaced by one of its synonyms with probability p.
SYNONYMS = {
    "circle": ("disc", "round dot"), "square": ("box", "square block"), "triangle": ("three-sided shape",),
    "star": ("five-pointed star",), "cross": ("plus sign",),
    "red": ("crimson", "scarlet"), "green": ("emerald",), "blue": ("cobalt",), "yellow": ("golden",),
    "purple": ("violet",), "orange": ("tangerine",),
    "small": ("little", "tiny"), "large": ("big", "huge"),
}
COUNT_WORDS = ("one", "two", "three", "four", "five")
# Worded like the captions (no final period): a tiny text encoder only knows the captions' phrasing.
ZEROSHOT_TEMPLATES = ("a photo of a {}", "a {}", "a drawing of a {}")
# A difficulty level uses the first Difficulty.num_templates of these; the easiest leave the position out.
CAPTION_TEMPLATES = (
    "a photo of {main}{others}",
    "{main}{others} on {background} background",
    "{main} {where}{others}",
    "a drawing of {main} {where}{others} on {background} background",
    "an image of {main}{others}",
    "there is {main} {where}{others}",
)
# Drawn instead of CAPTION_TEMPLATES with probability paraphrase.
PARAPHRASE_TEMPLATES = (
    "{main} can be seen {where}{others}",
    "a picture showing {main}{others}",
    "{count}: {main}{others}",
    "{background} background with {main} {where}",
    "this is {main}{others}",
    "{main}{others}, {count} in total",
)


@dataclass(frozen=True)
class Difficulty:
    max_distractors: int  # extra smaller shapes of other classes
    texture_probability: float  # chance of a striped or checkered background
    noise_std: float  # gaussian pixel noise, on the 0..255 scale
    num_templates: int  # how many of CAPTION_TEMPLATES are used
    paraphrase: float = 0.0  # chance of a synonym per word and of a paraphrasing template

    @classmethod
    def from_level(cls, level: float) -> "Difficulty":
        """0: one shape on a plain background, two caption templates; 1: distractors, textures, noise, all templates."""
        if not 0 <= level <= 1:
            raise ValueError(f"difficulty must be in [0, 1], got {level}")
        return cls(
            max_distractors=round(2 * level),
            texture_probability=level,
            noise_std=20.0 * level,
            num_templates=2 + round((len(CAPTION_TEMPLATES) - 2) * level),
        )


DIFFICULTY_NAMES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    column: int


@dataclass
class Scene:
    main: SceneObject
    background: str
    texture: str
    distractors: list = field(default_factory=list)


def class_index(shape: str, color: str) -> int:
    return CLASS_NAMES.index(f"{color} {shape}")


def resolve_difficulty(difficulty, paraphrase: float = 0.0) -> Difficulty:
    """A Difficulty, a level in [0, 1] (number or numeric string) or one of DIFFICULTY_NAMES; a level gets
    the ``paraphrase`` rate."""
    if isinstance(difficulty, Difficulty):
        return difficulty
    if not 0 <= paraphrase <= 1:
        raise ValueError(f"paraphrase must be in [0, 1], got {paraphrase}")
    try:
        level = float(DIFFICULTY_NAMES.get(difficulty, difficulty))
    except (TypeError, ValueError):
        raise ValueError(f"difficulty must be a number in [0, 1] or one of {list(DIFFICULTY_NAMES)}, "
                         f"got {difficulty!r}") from None
    return dataclasses.replace(Difficulty.from_level(level), paraphrase=paraphrase)


def sample_scene(rng: np.random.Generator, difficulty: Difficulty, domain: Domain = DOMAINS["standard"]) -> Scene:
    cells = [(row, column) for row in range(3) for column in range(3)]
    cell_order = rng.permutation(len(cells))
    main = SceneObject(_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, domain.sizes), *cells[cell_order[0]])
    textured = rng.random() < max(difficulty.texture_probability, domain.min_texture_probability)
    texture = _pick(rng, domain.textures) if textured else "plain"
    scene = Scene(main, _pick(rng, domain.backgrounds), texture)
    for cell_index in cell_order[1 : 1 + rng.integers(difficulty.max_distractors + 1)]:
        shape, color = main.shape, main.color
        while (shape, color) == (main.shape, main.color):
            shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        scene.distractors.append(SceneObject(shape, color, "small", *cells[cell_index]))
    return scene


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[rng.integers(len(options))]


def render_scene(scene: Scene, image_size: int, noise_std: float, rng: np.random.Generator,
                 domain: Domain = DOMAINS["standard"]) -> Image.Image:
    image = Image.fromarray(_background(domain.backgrounds[scene.background], scene.texture, image_size))
    draw = ImageDraw.Draw(image)
    for obj in scene.distractors:
        _draw_shape(draw, obj, DISTRACTOR_SCALE, image_size, rng)
    _draw_shape(draw, scene.main, domain.sizes[scene.main.size], image_size, rng)  # last: drawn on top
    if noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise_std, (image_size, image_size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def _background(color: tuple, texture: str, size: int) -> np.ndarray:
    base = np.array(color, dtype=np.int16)
    shade = base + (40 if base.mean() < 128 else -40)
    rows, columns = np.indices((size, size))
    period = max(2, size // 8)
    if texture == "striped":
        pattern = (rows // (period // 2)) % 2 == 1
    elif texture == "checkered":
        pattern = (rows // period + columns // period) % 2 == 1
    elif texture == "dotted":
        pattern = (rows % period < period // 3) & (columns % period < period // 3)
    elif texture == "diagonal":
        pattern = ((rows + columns) // (period // 2)) % 2 == 1
    else:
        pattern = np.zeros((size, size), dtype=bool)
    return np.where(pattern[..., None], shade, base).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, scale: float, image_size: int, rng) -> None:
    radius = scale * image_size / 2
    jitter = image_size / 12
    # Cell center plus jitter, clamped so the whole shape stays in the image.
    cx, cy = [
        float(np.clip((index + 0.5) * image_size / 3 + rng.uniform(-jitter, jitter), radius, image_size - radius))
        for index in (obj.column, obj.row)
    ]
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx + x * radius, cy + y * radius) for x, y in _UNIT_POLYGONS[obj.shape]], fill=fill)


def _star(points: int, inner: float) -> list:
    angles = np.pi * np.arange(2 * points) / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


_ARM = 0.35  # half-width of the cross's arms
_UNIT_POLYGONS = {  # vertices for a shape of radius 1 centered at the origin (y down)
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (0.87, 0.6), (-0.87, 0.6)],
    "star": _star(5, inner=0.45),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
              (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


def caption_scene(scene: Scene, difficulty: Difficulty, rng: np.random.Generator) -> str:
    main = scene.main
    if difficulty.paraphrase > 0 and rng.random() < difficulty.paraphrase:
        template = _pick(rng, PARAPHRASE_TEMPLATES)
    else:
        template = CAPTION_TEMPLATES[rng.integers(difficulty.num_templates)]
    background = scene.background if scene.texture == "plain" else f"{scene.texture} {scene.background}"

    def words(*names: str) -> str:
        return " ".join(_synonym(name, difficulty.paraphrase, rng) for name in names)

    count = len(scene.distractors) + 1
    size = () if difficulty.paraphrase > 0 and rng.random() < difficulty.paraphrase else (main.size,)
    return template.format(
        main=_with_article(words(*size, main.color, main.shape)),
        where=_where(main.row, main.column),
        background=_with_article(background),
        others="".join(f" and {_with_article(words(obj.color, obj.shape))}" for obj in scene.distractors),
        count=f"{COUNT_WORDS[count - 1]} shape{'s' if count > 1 else ''}",
    )


def _synonym(word: str, paraphrase: float, rng: np.random.Generator) -> str:
    if paraphrase > 0 and word in SYNONYMS and rng.random() < paraphrase:
        return _pick(rng, SYNONYMS[word])
    return word


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(row: int, column: int) -> str:
    name = " ".join(part for part in (ROWS[row], COLUMNS[column]) if part)
    if not name:
        return "in the center"
    return f"on the {name}" if row == 1 else f"at the {name}"


def synthetic_sample(index: int, image_size: int, difficulty: Difficulty, seed: int, split: str,
                     domain: str = "standard") -> ImageTextSample:
    """Sample ``index`` of a split: a function of (seed, split, domain, index) only, whatever the sharding."""
    stream = [seed, zlib.crc32(split.encode()), index] + ([] if domain == "standard" else [zlib.crc32(domain.encode())])
    rng = np.random.default_rng(stream)
    scenery = DOMAINS[domain]
    scene = sample_scene(rng, difficulty, scenery)
    image = render_scene(scene, image_size, difficulty.noise_std, rng, scenery)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: exact colors at tiny sizes; fast
    main = scene.main
    metadata = {
        "label": class_index(main.shape, main.color),
        "class_name": f"{main.color} {main.shape}",
        "shape": main.shape,
        "color": main.color,
        "size": main.size,
        "position": _where(main.row, main.column),
        "background": scene.background,
        "texture": scene.texture,
        "num_distractors": len(scene.distractors),
    }
    return ImageTextSample(buffer.getvalue(), "png", caption_scene(scene, difficulty, rng), metadata)


def write_synthetic_corpus(out_dir: str, num_samples: int, samples_per_shard: int, image_size: int = 64,
                           difficulty=0.0, seed: int = 0, split: str = "train", progress: bool = True,
                           paraphrase: float = 0.0, domain: str = "standard") -> list:
    """Write ``{out_dir}/{split}-000000.tar``, ...; returns the shard paths. Ids are 0..num_samples-1."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {list(DOMAINS)}, got {domain!r}")
    settings = resolve_difficulty(difficulty, paraphrase)
    samples = (synthetic_sample(index, image_size, settings, seed, split, domain) for index in range(num_samples))
    return write_shards(samples, out_dir, samples_per_shard, prefix=split, total=num_samples, progress=progress)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--difficulty", default="easy", help=f"a level in [0, 1] or one of {list(DIFFICULTY_NAMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="split name, also the shard name prefix (e.g. val)")
    parser.add_argument("--paraphrase", type=float, default=0.0, help="synonym and paraphrase rate in [0, 1]")
    parser.add_argument("--domain", default="standard", choices=list(DOMAINS), help="scenery (shifted: unseen)")
    args = parser.parse_args(argv)
    shards = write_synthetic_corpus(args.out, args.num_samples, args.samples_per_shard, args.image_size,
                                    args.difficulty, args.seed, args.split, paraphrase=args.paraphrase,
                                    domain=args.domain)
    print(f"wrote {args.num_samples} {args.split} samples in {len(shards)} shards to {args.out}")


if __name__ == "__main__":
    main()
