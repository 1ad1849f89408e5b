"""Concept images from an object store or a web server, into the pod's cache.

Sources (`concept.images.uri`):
- `s3://bucket/prefix/`, `gs://bucket/prefix/`: every object under the prefix whose name ends in
  an image suffix (.png .jpg .jpeg .webp); other objects are skipped.
- `https://.../photos.zip`, `.tar.gz`, `.tgz`: an archive; its image members are taken.
- `https://.../photos.txt`: a manifest, one image URL per line (absolute, or relative to the
  manifest's own URL); blank lines and lines starting with `#` are ignored.
  (Web servers have no standard folder listing, so a bare https folder is refused.)

Caption files come along: an object or archive member `photo.txt` beside `photo.png` (the same
key but for the suffix) is written as the image's caption file (`00000.txt` beside `00000.png`;
captions.py reads it). A manifest lists images only, so its images have no caption files.

Object keys and archive member names are never used as local paths: the images are written as
`00000.png`, `00001.jpg`, ... in the sorted order of their keys, so `..`, absolute keys or
symlink members cannot reach outside the cache. Caps: at most `PJ_MAX_IMAGES` images (default
1000) of at most `PJ_MAX_IMAGE_BYTES` each (default 50 MB); more is bad input, not a silent cut.

The download goes into `<cache>/concept-images/<hash of the URI>/` (cache: `PJ_CACHE_DIR`, else
`$XDG_CACHE_HOME/personalization`, else `~/.cache/personalization`), through a temporary folder
that is renamed into place when complete, so a second call (or a second process) reuses it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional
from urllib.parse import urljoin

from personalize.captions import CAPTION_SUFFIX
from personalize.errors import TrainerInputError
from personalize.storage.locations import Location, open_location, with_retries

log = logging.getLogger("personalize.storage")

FIELD = "concept.images.uri"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".txt",)
MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES = "PJ_MAX_IMAGES", 1000
MAX_BYTES_ENV, DEFAULT_MAX_BYTES = "PJ_MAX_IMAGE_BYTES", 50_000_000
# An archive holds the images and little else; this bounds what a hostile one can make us read.
ARCHIVE_OVERHEAD = 4
# One downloaded image: where it came from (for messages), its suffix, its bytes, its caption file's bytes.
Download = tuple[str, str, bytes, Optional[bytes]]


def cache_root() -> Path:
    if os.environ.get("PJ_CACHE_DIR"):
        return Path(os.environ["PJ_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "personalization"


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainerInputError(f"{name}={value!r} is not a whole number") from None


class Caps:
    def __init__(self) -> None:
        self.max_images = _int_env(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES)
        self.max_bytes = _int_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)

    def check_count(self, n: int, uri: str) -> None:
        if n > self.max_images:
            raise TrainerInputError(f"{FIELD} {uri!r} holds {n} images, more than the cap of {self.max_images} ({MAX_IMAGES_ENV})")

    def check_size(self, size: int | None, where: str) -> None:
        if size is not None and size > self.max_bytes:
            raise TrainerInputError(f"{where} is {size} bytes, more than the cap of {self.max_bytes} ({MAX_BYTES_ENV})")


def image_suffix(name: str) -> str | None:
    """The image suffix of a key or URL (lowercase), or None when it does not name an image."""
    suffix = PurePosixPath(name.split("?", 1)[0]).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else None


def fetch_concept_images(uri: str) -> Path:
    """A local folder holding the images behind `uri` (downloaded once into the cache)."""
    folder = cache_root() / "concept-images" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if folder.is_dir():
        return folder
    location = open_location(uri, FIELD)
    tmp = folder.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        count = _download(location, tmp, Caps())
        if count == 0:
            raise TrainerInputError(f"{FIELD} {uri!r} holds no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: use its copy
            if not folder.is_dir():
                raise
        log.info("concept images: %d from %s", count, uri)
        return folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(location: Location, dest: Path, caps: Caps) -> int:
    if location.scheme != "https":
        return _write_all(dest, _listed_objects(location, caps))
    path = PurePosixPath(location.root.split("?", 1)[0]).name.lower()
    if path.endswith(ARCHIVE_SUFFIXES):
        return _write_all(dest, _archive_members(location, caps))
    if path.endswith(MANIFEST_SUFFIXES):
        return _write_all(dest, _manifest_images(location, caps))
    raise TrainerInputError(
        f"{FIELD} {location.uri!r}: an https source must be an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
        f"or a manifest of image URLs ({', '.join(MANIFEST_SUFFIXES)})"
    )


def _check_decodes(data: bytes, where: str) -> None:
    """A whole decode now, so that the error names the object, not a file in the cache."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise TrainerInputError(f"{where} is not a readable image ({type(err).__name__})") from None


def _write_all(dest: Path, images: Iterator[Download]) -> int:
    """Write (source, suffix, bytes, caption bytes or None) as 00000<suffix> (+ 00000.txt), 00001<suffix>,
    ...: names never come from keys."""
    count = 0
    for where, suffix, data, caption in images:
        _check_decodes(data, where)
        (dest / f"{count:05d}{suffix}").write_bytes(data)
        if caption is not None:
            (dest / f"{count:05d}{CAPTION_SUFFIX}").write_bytes(caption)
        count += 1
    return count


def caption_key(image_key: str) -> str:
    """The key of an image's caption file: the same key with .txt instead of its suffix."""
    return image_key[: len(image_key) - len(PurePosixPath(image_key).suffix)] + CAPTION_SUFFIX


def _read_capped(location: Location, path: str, caps: Caps) -> bytes:
    """One object's bytes; refused when larger than the cap even if the listing did not say."""
    where = location.uri_of(path)

    def read() -> bytes:
        with location.fs.open(path, "rb") as f:
            return f.read(caps.max_bytes + 1)

    data = with_retries("download", read, where=where)
    caps.check_size(len(data), where)
    return data


def _listed_objects(location: Location, caps: Caps) -> Iterator[Download]:
    fs = location.fs
    bucket = f"{location.scheme}://{location.bucket}"
    with_retries("open", lambda: fs.ls(location.bucket, detail=False), where=f"{FIELD} {location.uri!r}: bucket {bucket}")
    found = with_retries("list", lambda: fs.find(location.root, detail=True), where=f"{FIELD} {location.uri!r}")
    images = sorted((path, info) for path, info in found.items()
                    if info.get("type", "file") == "file" and image_suffix(path))
    if not found:
        raise TrainerInputError(f"{FIELD} {location.uri!r}: the prefix holds no objects")
    caps.check_count(len(images), location.uri)
    for path, info in images:
        caps.check_size(info.get("size"), location.uri_of(path))
    files = {path for path, info in found.items() if info.get("type", "file") == "file"}
    for path, _ in images:
        caption = caption_key(path)
        yield (location.uri_of(path), image_suffix(path), _read_capped(location, path, caps),
               _read_capped(location, caption, caps) if caption in files else None)


def _archive_members(location: Location, caps: Caps) -> Iterator[Download]:
    limit = caps.max_bytes * ARCHIVE_OVERHEAD
    data = _read_capped_total(location, limit)
    name = location.root.lower()
    members: list[Download] = []
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                files = {i.filename: i for i in archive.infolist() if not i.is_dir()}
                infos = sorted((i for i in files.values() if image_suffix(i.filename)), key=lambda i: i.filename)
                caps.check_count(len(infos), location.uri)
                for info in infos:
                    caps.check_size(info.file_size, f"{location.uri} member {info.filename!r}")
                    caption = files.get(caption_key(info.filename))
                    members.append((f"{location.uri} member {info.filename!r}", image_suffix(info.filename),
                                    archive.read(info), archive.read(caption) if caption is not None else None))
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                # Regular files only: symlinks, hard links and devices are never followed or made.
                files = {m.name: m for m in archive.getmembers() if m.isfile()}
                infos = sorted((m for m in files.values() if image_suffix(m.name)), key=lambda m: m.name)
                caps.check_count(len(infos), location.uri)
                for info in infos:
                    caps.check_size(info.size, f"{location.uri} member {info.name!r}")
                    caption = files.get(caption_key(info.name))
                    members.append((f"{location.uri} member {info.name!r}", image_suffix(info.name),
                                    archive.extractfile(info).read(),
                                    archive.extractfile(caption).read() if caption is not None else None))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise TrainerInputError(f"{FIELD} {location.uri!r} is not a readable archive ({type(err).__name__})") from None
    yield from members


def _read_capped_total(location: Location, limit: int) -> bytes:
    def read() -> bytes:
        with location.fs.open(location.root, "rb") as f:
            return f.read(limit + 1)

    data = with_retries("download", read, where=location.uri)
    if len(data) > limit:
        raise TrainerInputError(f"{location.uri} is more than {limit} bytes (cap: {ARCHIVE_OVERHEAD} x {MAX_BYTES_ENV})")
    return data


def _manifest_images(location: Location, caps: Caps) -> Iterator[Download]:
    text = _read_capped_total(location, 1_000_000).decode("utf-8", errors="replace")
    urls = [urljoin(location.root, line.strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    for url in urls:
        if not url.startswith("https://"):
            raise TrainerInputError(f"{FIELD} {location.uri!r}: manifest line {url!r} is not an https URL")
        if not image_suffix(url):
            raise TrainerInputError(f"{FIELD} {location.uri!r}: manifest line {url!r} does not name an image file")
    caps.check_count(len(urls), location.uri)
    for url in urls:
        yield url, image_suffix(url), _read_capped(location, url, caps), None
