"""Datasets where they live: WebDataset tar shards and Parquet tables as inputs.

Each image inside a container (and each video inside a shard) is one job whose `member` is a small
picklable descriptor, so that worker processes (and Ray workers) read the bytes themselves:
  ("tar", shard, member name, data offset, size)        read by one seek
  ("parquet", file, row group, row in group, column)    read by row group (cached per process)
Discovery lists containers (`tar_members`, `parquet_members`); `read_member` reads one member.
"""

from __future__ import annotations

import functools
import re
import tarfile
from pathlib import Path
from urllib.parse import quote

from visualize_patches import CONTAINER_EXTENSIONS, Job, ToolError, kind_by_name

PARQUET_HINT = "pip install pyarrow (or, in the tool's folder, pip install '.[parquet]')"
TAR_BLOCK = 512


def container_kind(path: Path) -> str | None:
    """'tar' or 'parquet' by extension, else None."""
    return CONTAINER_EXTENSIONS.get(path.suffix.lower())


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(text: str) -> list[str]:
    """WebDataset's brace notation: 'shards/{000..099}.tar' -> 100 names (zero padding kept),
    '{a,b}.tar' -> two; several braces multiply; text without braces is itself."""
    m = _RANGE.search(text)
    if m is not None:
        first, last = m.group(1), m.group(2)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        return [e for k in range(lo, hi + step, step)
                for e in expand_braces(f"{text[:m.start()]}{k:0{width}d}{text[m.end():]}")]
    m = _LIST.search(text)
    if m is not None:
        return [e for choice in m.group(1).split(",")
                for e in expand_braces(f"{text[:m.start()]}{choice}{text[m.end():]}")]
    return [text]


def _safe_member_name(name: str) -> str | None:
    """The member's path as a relative output path, or None if it would leave its folder."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def tar_members(shard: Path) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str]], int]:
    """List a shard without reading its members' data: ([(relative name, kind, member)],
    [(relative name or '', reason)], other members skipped). The listing stops at damage: members
    listed but cut off fail when read, an unlistable tail is one failure named after the shard."""
    found, failed, skipped = [], [], 0
    try:
        size = shard.stat().st_size
        tar = tarfile.open(shard, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        return [], [("", f"{shard}: not a readable tar shard ({exc})")], 0
    end = 0  # where the listed part of the shard ends
    info_name = None  # the last member listed
    with tar:
        while True:
            try:
                info = tar.next()
            except (OSError, tarfile.TarError) as exc:
                end_text = f"byte {end}" if info_name is None else f"{info_name} (byte {end})"
                failed.append(("", f"{shard}: truncated or damaged after {end_text}; the members after it "
                                   f"cannot be listed ({exc})"))
                end = size
                break
            if info is None:
                break
            info_name = info.name
            end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
            if not info.isreg():
                continue
            kind = kind_by_name(info.name)
            if kind is None:
                skipped += 1
                continue
            name = _safe_member_name(info.name)
            if name is None:
                failed.append((info.name, f"{shard}/{info.name}: member name leaves the shard's folder, not read"))
            else:  # images, and videos (read from a private copy: apt_vis.video.video_source)
                found.append((name, kind, ("tar", str(shard), info.name, info.offset_data, info.size)))
    if end < size:  # what follows the last listed member must be the end-of-archive zero blocks
        with open(shard, "rb") as f:
            f.seek(end)
            tail = f.read()
        if tail.strip(b"\0"):
            end_text = f"byte {end}" if info_name is None else f"{info_name} (byte {end})"
            failed.append(("", f"{shard}: truncated or damaged after {end_text}; the members after it "
                               f"cannot be listed ({len(tail)} bytes left unread)"))
    return found, failed, skipped


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ModuleNotFoundError:
        raise ToolError(f"reading Parquet files needs pyarrow: {PARQUET_HINT}") from None
    return pyarrow


def _image_column(schema, wanted: str | None, path: Path) -> tuple[str, bool]:
    """(column, is a struct with a bytes field)."""
    pa = _pyarrow()

    def binary(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    def struct_bytes(t) -> bool:
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and binary(t.field("bytes").type)

    if wanted is not None:
        if wanted not in schema.names:
            raise ToolError(f"{path}: no column {wanted!r} (--image-column); columns: {', '.join(schema.names)}")
        t = schema.field(wanted).type
        if not (binary(t) or struct_bytes(t)):
            raise ToolError(f"{path}: column {wanted!r} is {t}, not binary nor a struct with a bytes field")
        return wanted, struct_bytes(t)
    for field in schema:
        if binary(field.type) or struct_bytes(field.type):
            return field.name, struct_bytes(field.type)
    raise ToolError(f"{path}: no image column (binary, or a struct with a bytes field); name one with --image-column")


def _id_name(value, row: int, used: set[str]) -> str:
    """An output folder name for one row: its id made safe as one path component, unique."""
    text = "" if value is None else str(value)
    name = quote(text, safe=" !#$&'()+,;=@[]^_`{}~") if text else f"row{row}"
    if name.startswith("."):
        name = "%2E" + name[1:]
    if name in used:
        name = f"{name}@row{row}"
    used.add(name)
    return name


def parquet_members(path: Path, image_column: str | None = None,
                    id_column: str | None = None) -> list[tuple[str, str, tuple]]:
    """[(id, 'image', member)] for every row of a Parquet file, reading ids only (not images)."""
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
        schema = pf.schema_arrow
        column, is_struct = _image_column(schema, image_column, path)
        if id_column is not None:
            if id_column not in schema.names:
                raise ToolError(f"{path}: no column {id_column!r} (--id-column); columns: {', '.join(schema.names)}")
            id_read = id_column
        elif is_struct and schema.field(column).type.get_field_index("path") >= 0:
            id_read = f"{column}.path"
        else:
            id_read = None
        found, used, row = [], set(), 0
        for group in range(pf.num_row_groups):
            count = pf.metadata.row_group(group).num_rows
            ids = [None] * count
            if id_read is not None:
                table = pf.read_row_group(group, columns=[id_read])
                values = table.column(0)
                if id_read != id_column:  # the struct's path field
                    values = values.combine_chunks().field("path") if count else values
                ids = values.to_pylist()
            for k in range(count):
                found.append((_id_name(ids[k], row, used), "image", ("parquet", str(path), group, k, column)))
                row += 1
    except ToolError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise ToolError(f"{path}: not a readable Parquet file ({exc})") from None
    return found


@functools.lru_cache(maxsize=1)
def _row_group(file: str, group: int, column: str):
    pa = _pyarrow()
    return pa.parquet.ParquetFile(file).read_row_group(group, columns=[column]).column(0)


def read_member(job: Job) -> bytes:
    """The encoded bytes of a job's member (its image inside a shard or table); ToolError
    naming the job's path for every way that fails."""
    member = job.member
    if member[0] == "tar":
        _, shard, _, offset, size = member
        try:
            with open(shard, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise ToolError(f"{job.path}: cannot read shard ({exc.strerror or exc})") from None
        if len(data) < size:
            raise ToolError(f"{job.path}: shard is truncated ({len(data)} of {size} bytes there)")
        return data
    if member[0] == "parquet":
        _, file, group, row, column = member
        pa = _pyarrow()
        try:
            value = _row_group(file, group, column)[row]
        except (OSError, pa.ArrowException) as exc:
            raise ToolError(f"{job.path}: cannot read row group {group} ({exc})") from None
        if pa.types.is_struct(value.type):
            value = value["bytes"] if value.is_valid else None
        data = None if value is None else value.as_py()
        if not data:
            raise ToolError(f"{job.path}: no image bytes (null or empty)")
        return data
    raise ToolError(f"{job.path}: unknown member kind {member[0]!r}")


def container_jobs(path: Path, image_column: str | None,
                   id_column: str | None) -> tuple[list[tuple[str, str, tuple]], list[tuple[str, str]], int]:
    """(members as (name inside, kind, member), failures as (name inside or '', reason), skipped)."""
    if container_kind(path) == "tar":
        return tar_members(path)
    return parquet_members(path, image_column, id_column), [], 0
