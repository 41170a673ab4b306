"""The fast tar member reader gives what webdataset gives, member for member, on every kind of tar file."""

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_expander, url_opener

from tuneclip_ds.data.shards import ImageTextSample, write_shards
from tuneclip_ds.data.tar_members import read_tar_members


def write_tar(path, members, tar_format=tarfile.PAX_FORMAT):
    """``members``: (name, data) for regular files, (name, data, tarfile type) for others."""
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data, *kind in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind[0] if kind else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return path


def samples(count, first_key=0):
    """Members of ``count`` samples (jpg + txt), of sizes that leave padding."""
    return [(f"{key:09d}.{ext}", f"{key} {ext}".encode() * (key % 300 + 1))
            for key in range(first_key, first_key + count) for ext in ("jpg", "txt")]


def member(path, index):
    with tarfile.open(path) as tar:
        return tar.getmembers()[index]


def cut_at(path, offset):
    path.write_bytes(path.read_bytes()[:offset])
    return path


def patch_header(path, index, field_offset, value, fix_checksum=True):
    """Write ``value`` into member ``index``'s header, with the checksum recomputed (or left stale)."""
    data = bytearray(path.read_bytes())
    start = member(path, index).offset
    data[start + field_offset:start + field_offset + len(value)] = value
    if fix_checksum:
        header = bytes(data[start:start + 512])
        data[start + 148:start + 156] = b"%06o\0 " % tarfile.calc_chksums(header)[0]
    path.write_bytes(bytes(data))
    return path


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def plain_shards(folder):
    items = [ImageTextSample(bytes(range(256)) * (i + 1), "png", f"caption {i}") for i in range(12)]
    return write_shards(items, folder, samples_per_shard=5, progress=False)


def three_formats(folder):
    return [write_tar(folder / f"{f}.tar", samples(3)) for f in
            (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)]


def ustar_prefix_name(folder):
    name = "d" * 90 + "/" + "e" * 90 + ".txt"  # too long for the name field: split into prefix and name
    return [write_tar(folder / "a.tar", [(name, b"x")] + samples(2), tarfile.USTAR_FORMAT)]


def long_names(folder):
    members = samples(1) + [("n" * 150 + ".txt", b"y")] + samples(2, 5)
    return [write_tar(folder / f"{f}.tar", members, f) for f in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)]


def non_ascii_name(folder):
    return [write_tar(folder / f"{f}.tar", samples(1) + [("caf\u00e9.txt", b"z")] + samples(1, 3), f)
            for f in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT)]


def other_member_types(folder):
    """One tar for each, since the first block read otherwise hands its whole tar to webdataset."""
    others = [("dir", b"", tarfile.DIRTYPE), ("link", b"", tarfile.SYMTYPE), ("__meta__", b"m"), ("__a__/b", b"m"),
              ("v7dir/", b"", tarfile.AREGTYPE)]  # an old-style directory: a file type, a trailing slash
    return [write_tar(folder / f"{n}.tar", samples(1, 10 * n) + [other] + samples(2, 10 * n + 4))
            for n, other in enumerate(others)]


def compressed(folder):
    tar = write_tar(folder / "a.tar", samples(3))
    looks_bzip2 = write_tar(folder / "b.tar", [("BZh91AY&SY.txt", b"a plain tar that tarfile takes for bzip2")])
    return [write_bytes(folder / "a.tar.gz", gzip.compress(tar.read_bytes())), looks_bzip2]


def truncated(folder):
    def tar(n):
        return write_tar(folder / f"{n}.tar", samples(4, 10 * n))

    second = member(tar(0), 1)
    return [cut_at(tar(0), second.offset_data + 5),  # in its data
            cut_at(tar(1), second.offset_data + second.size + 3),  # in its padding
            cut_at(tar(2), member(tar(2), 2).offset + 200),  # in a header
            cut_at(tar(3), member(tar(3), -1).offset_data + 512)]  # before the end-of-archive blocks


def damaged_headers(folder):
    return [patch_header(write_tar(folder / "a.tar", samples(2)), 0, 10, b"X", fix_checksum=False),  # at the start
            patch_header(write_tar(folder / "b.tar", samples(2, 5)), 2, 10, b"X", fix_checksum=False),  # later
            patch_header(write_tar(folder / "c.tar", samples(2, 9)), 1, 108, b"0000 9\0"),  # uid not a number
            patch_header(write_tar(folder / "d.tar", samples(2, 13)), 1, 108, b"\x80" + bytes(6) + b"\x07")]  # base 256


def empty_garbage_missing(folder):
    return [write_bytes(folder / "empty.tar", b""), write_bytes(folder / "garbage.tar", b"not a tar file" * 200),
            folder / "missing.tar"]


TAR_FILES = [plain_shards, three_formats, ustar_prefix_name, long_names, non_ascii_name, other_member_types,
             compressed, truncated, damaged_headers, empty_garbage_missing]


def members_and_warnings(read, paths):
    warnings = []

    def handler(exn):
        warnings.append(type(exn).__name__)
        return True

    return list(read([{"url": str(path)} for path in paths], handler)), warnings


def webdataset_members(sources, handler):
    return tar_file_expander(url_opener(sources, handler=handler), handler=handler)


@pytest.mark.parametrize("make_tars", TAR_FILES, ids=lambda make_tars: make_tars.__name__)
def test_members_are_webdatasets_member_for_member(tmp_path, make_tars):
    paths = make_tars(tmp_path)
    ours = members_and_warnings(read_tar_members, paths)
    assert ours == members_and_warnings(webdataset_members, paths)
    assert any("fname" in item for item in ours[0]) or make_tars is empty_garbage_missing
