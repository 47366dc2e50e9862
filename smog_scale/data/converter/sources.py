"""Find the images of an ImageNet-style source and give them class indices, for ``make_shards``.

Three layouts are detected from SOURCE:

- ``imagefolder``: ``SOURCE/<class>/<image>``; folders inside a class folder are walked too;
- ``val``: a flat folder of images plus a label file, either ImageNet's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``; the class is the first token) or plain ``filename class`` lines;
- ``archive``: the official training archive, an uncompressed tar of per-class tars, listed in
  place (no extraction): each image is a byte range of the archive file.

Every file met is accounted for: it becomes an image to convert, a skipped input (with a reason)
or an ignored non-image file.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
LABEL_FILE_NAME = "LOC_val_solution.csv"


class ConversionError(ValueError):
    """A problem with the user's source or output folder, shown to the user as is."""


@dataclass(frozen=True, slots=True)  # slots: ImageNet train plans 1.28M of them
class InputImage:
    """One image: bytes ``[offset, offset + size)`` of ``file``; ``origin`` names it in the report."""

    key: str
    label: int
    origin: str
    file: str
    offset: int
    size: int


@dataclass
class Inventory:
    """Everything found in SOURCE: the images to convert and the inputs that will not be."""

    layout: str
    classes: list[str]
    images: list[InputImage]
    skipped: list[dict[str, str]]
    ignored: list[dict[str, str]]
    empty_classes: list[str]
    labels_without_image: int = 0


@dataclass
class _Scan:
    """What a layout scanner finds, before classes get their indices."""

    declared: list[str] = field(default_factory=list)  # class names known even when they hold no image
    # per image: (class name, relative name for the key, origin, file, offset, size)
    found: list[tuple[str, str, str, str, int, int]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    labels_without_image: int = 0

    def skip(self, origin: str, reason: str) -> None:
        self.skipped.append({"path": origin, "reason": reason})

    def ignore(self, origin: str, reason: str) -> None:
        self.ignored.append({"path": origin, "reason": reason})


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def detect_layout(source: Path, has_labels: bool = False) -> str:
    """Return ``"archive"``, ``"val"`` or ``"imagefolder"`` for SOURCE, or raise naming the path.

    A folder with class folders is an ImageFolder tree (stray images beside them are skipped) unless a
    label file was given; a folder with images and no class folders is a flat validation folder.
    """
    if not source.exists():
        raise ConversionError(f"{source}: no such file or folder")
    if source.is_file():
        if tarfile.is_tarfile(source):
            return "archive"
        raise ConversionError(f"cannot detect the layout of {source}: a file, but not a tar of per-class tars")
    entries = [e for e in os.scandir(source) if not e.name.startswith(".")]
    has_images = any(e.is_file() and _is_image_name(e.name) for e in entries)
    has_folders = any(e.is_dir() for e in entries)
    if has_images and (has_labels or not has_folders):
        return "val"
    if has_folders:
        return "imagefolder"
    raise ConversionError(
        f"cannot detect the layout of {source}: it holds neither images (a flat validation folder) "
        "nor class folders (an ImageFolder tree)"
    )


def read_labels(path: Path) -> dict[str, str]:
    """Map image file stem -> class name from a ``LOC_val_solution.csv`` or a ``filename class`` file."""
    labels: dict[str, str] = {}
    lines = path.read_text().splitlines()
    is_csv = bool(lines) and lines[0].replace(" ", "").startswith("ImageId,PredictionString")
    for lineno, line in enumerate(lines[1:] if is_csv else lines, start=2 if is_csv else 1):
        if not line.strip():
            continue
        parts = line.split(",", 1) if is_csv else line.rsplit(None, 1)
        tokens = parts[1].split() if len(parts) == 2 else []
        if not tokens or not parts[0].strip():
            raise ConversionError(f"{path}:{lineno}: cannot read a file name and a class from {line!r}")
        labels[os.path.splitext(os.path.basename(parts[0].strip()))[0]] = tokens[0]
    return labels


def read_class_list(path: Path) -> list[str]:
    """Class names in index order, one per line (the ``classes.txt`` a conversion writes)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ConversionError(f"{path}: the class list is empty or names a class twice")
    return names


def _find_label_file(source: Path, labels: Path | None) -> Path:
    candidates = [labels] if labels else [source / LABEL_FILE_NAME, source.parent / LABEL_FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConversionError(
        f"{source} is a flat folder of images and needs a label file: pass --labels FILE "
        f"(looked for {', '.join(str(c) for c in candidates)})"
    )


def _scan_imagefolder(root: Path, scan: _Scan) -> None:
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_file() and _is_image_name(entry.name):
            scan.skip(entry.path, "an image outside any class folder")
            continue
        if entry.name.startswith(".") or not entry.is_dir():
            scan.ignore(entry.path, "hidden folder" if entry.is_dir() else "not inside a class folder")
            continue
        scan.declared.append(entry.name)
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not _is_image_name(name):
                    scan.ignore(path, "not an image file")
                    continue
                rel = os.path.relpath(path, root)
                scan.found.append((entry.name, rel, path, path, 0, os.path.getsize(path)))


def _scan_val(root: Path, label_file: Path, scan: _Scan) -> None:
    labels = read_labels(label_file)
    scan.declared.extend(sorted(set(labels.values())))
    seen = set()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        stem = os.path.splitext(entry.name)[0]
        if not entry.is_file():
            scan.ignore(entry.path, "folder inside a flat image folder")
        elif not _is_image_name(entry.name):
            scan.ignore(entry.path, "not an image file")
        elif stem not in labels:
            scan.skip(entry.path, f"no label in {label_file}")
        else:
            seen.add(stem)
            scan.found.append((labels[stem], entry.name, entry.path, entry.path, 0, entry.stat().st_size))
    scan.labels_without_image = len(labels.keys() - seen)


def _open_uncompressed_tar(archive: Path) -> tarfile.TarFile:
    """The archive opened for random access; a compressed tar cannot be read in place."""
    try:
        return tarfile.open(archive, mode="r:")
    except tarfile.ReadError as exc:
        raise ConversionError(f"{archive}: not an uncompressed tar of per-class tars ({exc})") from exc


def _scan_archive(archive: Path, scan: _Scan) -> None:
    with _open_uncompressed_tar(archive) as outer, open(archive, "rb") as reader:
        for member in outer:
            origin = f"{archive}:{member.name}"
            if not member.isfile():
                continue
            if not member.name.endswith(".tar"):
                scan.ignore(origin, "not a per-class tar")
                continue
            class_name = os.path.basename(member.name)[: -len(".tar")]
            scan.declared.append(class_name)
            try:
                _scan_class_tar(reader, archive, member, class_name, scan)
            except tarfile.TarError as exc:
                scan.skip(origin, f"unreadable class tar: {exc}")


def _scan_class_tar(
    reader: io.BufferedReader, archive: Path, member: tarfile.TarInfo, class_name: str, scan: _Scan
) -> None:
    """List one inner tar in place; its member offsets come out as offsets into the archive file."""
    end = member.offset_data + member.size
    archive_file = str(archive)
    reader.seek(member.offset_data)
    with tarfile.open(fileobj=reader, mode="r:") as inner:  # leaves ``reader`` open
        for item in inner:
            if item.offset >= end:  # an inner tar without its end marker: stop at its boundary
                break
            origin = f"{archive}:{member.name}/{item.name}"
            if not item.isfile():
                continue
            if item.offset_data + item.size > end:
                scan.skip(origin, "runs past the end of its class tar")
            elif not _is_image_name(item.name):
                scan.ignore(origin, "not an image file")
            else:
                name = f"{class_name}/{os.path.basename(item.name)}"
                scan.found.append((class_name, name, origin, archive_file, item.offset_data, item.size))


def _sorted_classes(names: set[str]) -> list[str]:
    """Sort class names; all-integer names (``filename 65`` label files) sort numerically."""
    return sorted(names, key=int) if names and all(n.isdigit() for n in names) else sorted(names)


def _sample_key(name: str, taken: set[str]) -> str:
    """A unique ``__key__`` from a relative path: no extension and no dots (webdataset splits on them)."""
    stem = os.path.splitext(name)[0].replace(".", "_")
    key, n = stem, 1
    while key in taken:
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return key


def scan_source(source: Path, labels: Path | None = None, classes: list[str] | None = None) -> Inventory:
    """Detect SOURCE's layout and list its images, indexed by sorted class name or by ``classes``.

    A class that holds no image keeps its index and is listed in ``empty_classes``; an image whose
    class is not in ``classes`` is skipped.
    """
    layout, scan = detect_layout(source, labels is not None), _Scan()
    if labels is not None and layout != "val":
        raise ConversionError(f"--labels applies to a flat folder of images, but {source} is an {layout}")
    if layout == "archive":
        _scan_archive(source, scan)
    elif layout == "val":
        _scan_val(source, _find_label_file(source, labels), scan)
    else:
        _scan_imagefolder(source, scan)
    names = classes or _sorted_classes(set(scan.declared) | {found[0] for found in scan.found})
    index = {name: i for i, name in enumerate(names)}
    images: list[InputImage] = []
    taken: set[str] = set()
    for class_name, name, origin, file, offset, size in scan.found:
        if class_name not in index:
            scan.skip(origin, f"class {class_name!r} is not in the class list")
            continue
        images.append(InputImage(_sample_key(name, taken), index[class_name], origin, file, offset, size))
    used = {image.label for image in images}
    empty = [name for i, name in enumerate(names) if i not in used]
    return Inventory(layout, names, images, scan.skipped, scan.ignored, empty, scan.labels_without_image)
