"""Write WebDataset shards from any image-text samples, a CSV/TSV file, or an image folder.

Each sample in a shard is three tar members sharing one key:
``{key}.{jpg|png|webp}`` (the encoded image), ``{key}.txt`` (the caption) and
``{key}.json`` (``{"id": int, ...}``); labelled data adds ``{key}.cls`` (the class label as text).
Ids are dense, 0..n-1 in write order, so the training loss can keep per-sample tables indexed by id.

    python -m tuneclip_ds.data.shards --csv captions.tsv --out shards/
    python -m tuneclip_ds.data.shards --image-folder photos/ --out shards/   # foo.jpg + foo.txt
    python -m tuneclip_ds.data.shards --class-folder imagenet/train --out shards/   # imagenet/train/CLASS/*.jpg
"""

import argparse
import csv
import glob
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import webdataset as wds
from PIL import Image

from tuneclip_ds.errors import InputError
from tuneclip_ds.progress import progress_bar

logger = logging.getLogger("tuneclip_ds.data")

# PIL format -> tar extension; images in these formats are stored as they are, others re-encoded as PNG.
_STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # the images of a class folder (evaluation too)
CLASSNAMES_FILE = "classnames.txt"  # written beside labelled shards: a class name per line, in label order


@dataclass
class ImageTextSample:
    image: bytes  # encoded image
    image_format: str  # tar extension: "jpg", "png" or "webp"
    caption: str
    metadata: dict = field(default_factory=dict)  # extra fields for the sample's json
    label: Optional[int] = None  # a class label, written as the ``cls`` member (WebDataset's convention)


class DataError(InputError):
    """Data that cannot be used as it is: the message names the file and what to do."""


class ShardFormatError(DataError):
    """Shards without something every sample must have (an integer id, a class label): every sample would fail,
    so the pipeline stops instead of skipping them as corrupt one by one."""


class BadInputError(DataError):
    """An input image or caption that cannot be used; the message names the file."""


@dataclass
class ConversionResult:
    shards: list
    num_written: int
    num_skipped: int


def shard_path(out_dir: str, prefix: str, index: int) -> str:
    return os.path.join(out_dir, f"{prefix}-{index:06d}.tar")


def write_shards(
    samples: Iterable[ImageTextSample],
    out_dir: str,
    samples_per_shard: int,
    prefix: str = "train",
    total: Optional[int] = None,
    progress: bool = True,
) -> list:
    """Write samples into ``{out_dir}/{prefix}-000000.tar``, ... and return the shard paths.

    Refuses to write next to existing ``{prefix}-*.tar`` shards (stale shards would repeat ids).
    On any error the shards of this call are removed, so no partial corpus is left behind.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-*.tar")))
    if existing:
        raise DataError(
            f"{out_dir} already holds {len(existing)} '{prefix}-*.tar' shards (e.g. {existing[0]}): "
            "remove them or write to another directory"
        )
    paths, writer = [], None
    try:
        for sample_id, sample in enumerate(progress_bar(samples, show=progress, total=total, unit="sample")):
            if sample_id % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(shard_path(out_dir, prefix, len(paths)))
                writer = wds.TarWriter(paths[-1], encoder=False, mtime=0)  # fixed mtime: reproducible bytes
            writer.write(_tar_record(sample_id, sample))
    except BaseException:
        if writer is not None:
            writer.close()
        for path in paths:
            os.remove(path)
        raise
    if writer is not None:
        writer.close()
    return paths


def _tar_record(sample_id: int, sample: ImageTextSample) -> dict:
    record = {
        "__key__": f"{sample_id:09d}",
        sample.image_format: sample.image,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps({**sample.metadata, "id": sample_id}, sort_keys=True).encode("utf-8"),
    }
    if sample.label is not None:
        record["cls"] = str(sample.label).encode("utf-8")
    return record


def read_image_text(image_path: str, caption: Optional[str], caption_source: str) -> ImageTextSample:
    """Load one (image file, caption) pair, checking that the image decodes and the caption is not empty."""
    if caption is None or not caption.strip():
        raise BadInputError(f"no caption for {image_path} (expected one in {caption_source})")
    try:
        data = Path(image_path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode catches truncated files that Image.open alone accepts
            image_format = _STORED_FORMATS.get(image.format)
            if image_format is None:
                data, image_format = _encode_png(image), "png"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise BadInputError(f"cannot read image {image_path}: {exn}") from exn
    return ImageTextSample(data, image_format, caption.strip(), {"source": image_path})


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def csv_pairs(csv_path: str, image_column: str = "filepath", caption_column: str = "title", delimiter=None) -> list:
    """(image path, caption, caption source) per row; relative image paths are taken from the file's folder."""
    if delimiter is None:
        delimiter = "\t" if csv_path.lower().endswith(".tsv") else ","
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{csv_path}: no column {missing} among {reader.fieldnames}; "
                "name the columns with --image-column / --caption-column (and --delimiter if needed)"
            )
        return [
            (os.path.join(base, row[image_column]), row[caption_column], f"{csv_path} line {reader.line_num}")
            for row in reader
        ]


def folder_pairs(folder: str) -> list:
    """(image path, caption, caption file) for every image under ``folder``, its caption in the same-named .txt."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a directory")
    images = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    pairs = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8") if caption_file.is_file() else None
        pairs.append((str(image), caption, str(caption_file)))
    return pairs


def convert_pairs(pairs: list, out_dir: str, samples_per_shard: int, prefix: str, skip_bad: bool,
                  labels: Optional[list] = None) -> ConversionResult:
    """Write (image path, caption, caption source) pairs as shards, with a class label each if ``labels``;
    bad pairs raise, or are counted with skip_bad."""
    counts = {"written": 0, "skipped": 0}

    def readable_samples():
        for index, pair in enumerate(pairs):
            try:
                sample = read_image_text(*pair)
                sample.label = None if labels is None else labels[index]
            except BadInputError as exn:
                if not skip_bad:
                    raise
                counts["skipped"] += 1
                logger.warning("skipping: %s", exn)
                continue
            counts["written"] += 1
            yield sample

    shards = write_shards(readable_samples(), out_dir, samples_per_shard, prefix, total=len(pairs))
    return ConversionResult(shards, counts["written"], counts["skipped"])


def csv_to_shards(csv_path, out_dir, samples_per_shard=1000, prefix="train", image_column="filepath",
                  caption_column="title", delimiter=None, skip_bad=False) -> ConversionResult:
    pairs = csv_pairs(csv_path, image_column, caption_column, delimiter)
    return convert_pairs(pairs, out_dir, samples_per_shard, prefix, skip_bad)


def image_folder_to_shards(folder, out_dir, samples_per_shard=1000, prefix="train", skip_bad=False) -> ConversionResult:
    return convert_pairs(folder_pairs(folder), out_dir, samples_per_shard, prefix, skip_bad)


def class_folder_names(root: Path, owner: str) -> list[str]:
    """The sorted sub-folder names of an image folder: class ``i`` is the ``i``-th."""
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not names:
        raise DataError(f"{owner}: {root} has no class sub-folders (an image folder has one per class)")
    return names


def class_folder_items(root, owner: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(image path, label)`` of an image folder (a sub-folder per class, images at any
    depth under it), in sample order: sorted class folders, then each one's sorted image paths. ``owner``
    starts error messages."""
    if not os.path.isdir(root):
        raise DataError(f"{owner}: {root} is not a directory")
    class_names = class_folder_names(Path(root), owner)
    items = []
    for label, name in enumerate(class_names):
        images = sorted(str(p) for p in Path(root, name).rglob("*") if p.suffix.lower() in CLASS_FOLDER_SUFFIXES)
        if not images:
            raise DataError(f"{owner}: class folder {os.path.join(root, name)} has no images "
                            f"({', '.join(CLASS_FOLDER_SUFFIXES)}); remove it or add its images")
        items.extend((image, label) for image in images)
    return class_names, items


def class_folder_to_shards(folder, out_dir, samples_per_shard=1000, prefix="train", skip_bad=False) -> ConversionResult:
    """Labelled shards from an image folder: each sample's label as the ``cls`` member and its class name as
    caption, and ``classnames.txt`` (the sub-folder names, in label order) beside the shards. Ids follow
    ``class_folder_items``'s order: sorted class folders, then sorted image paths."""
    class_names, items = class_folder_items(folder, f"--class-folder {folder}")
    pairs = [(path, class_names[label], folder) for path, label in items]
    result = convert_pairs(pairs, out_dir, samples_per_shard, prefix, skip_bad, labels=[label for _, label in items])
    Path(out_dir, CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="CSV/TSV file of image path + caption (.tsv means tab-separated)")
    source.add_argument("--image-folder", help="folder of images, each with a same-named .txt caption")
    source.add_argument("--class-folder", help="folder with a sub-folder of images per class: labelled shards")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="train", help="shard names: {prefix}-000000.tar, ...")
    parser.add_argument("--image-column", default="filepath")
    parser.add_argument("--caption-column", default="title")
    parser.add_argument("--delimiter", default=None, help="CSV delimiter (default: tab for .tsv, else comma)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images / missing captions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.csv:
            result = csv_to_shards(args.csv, args.out, args.samples_per_shard, args.prefix,
                                   args.image_column, args.caption_column, args.delimiter, args.skip_bad)
        elif args.image_folder:
            result = image_folder_to_shards(args.image_folder, args.out, args.samples_per_shard, args.prefix,
                                            args.skip_bad)
        else:
            result = class_folder_to_shards(args.class_folder, args.out, args.samples_per_shard, args.prefix,
                                            args.skip_bad)
    except (ValueError, OSError) as exn:  # bad input, missing file, existing shards
        sys.exit(f"error: {exn}")
    print(f"wrote {result.num_written} samples in {len(result.shards)} shards to {args.out}"
          f" (skipped {result.num_skipped} bad)")
    if args.class_folder:
        print(f"class names in label order: {os.path.join(args.out, CLASSNAMES_FILE)} (for data.labels.classnames)")


if __name__ == "__main__":
    main()
