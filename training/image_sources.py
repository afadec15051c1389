"""Image sources of the training and evaluation data sets: a folder or a zip archive read in place.

Images are read in their STORED pixel order (EXIF orientation ignored), because COCO and MPII
label keypoints on the stored pixels. A missing or unreadable image raises :class:`DataError`
naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from omnipose.training.records import DataError

IMREAD_STORED_ORDER = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class ImageSource:
    """Reads RGB images by file name from a folder or a zip archive."""

    def read_bytes(self, file_name: str) -> bytes:
        raise NotImplementedError

    def location(self, file_name: str) -> str:
        """Human-readable path of one image, for error messages."""
        raise NotImplementedError

    def read_rgb(self, file_name: str) -> np.ndarray:
        """The image in STORED pixel order: EXIF orientation is ignored, because COCO and MPII
        label keypoints on the stored pixels (as the published training and evaluation read)."""
        data = self.read_bytes(file_name)
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), IMREAD_STORED_ORDER)
        if image is None:
            raise DataError(
                f"cannot decode image {self.location(file_name)} (corrupt or not an image)"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FolderImages(ImageSource):
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def location(self, file_name: str) -> str:
        return str(self.directory / file_name)

    def read_bytes(self, file_name: str) -> bytes:
        try:
            return (self.directory / file_name).read_bytes()
        except OSError as error:
            location = self.location(file_name)
            raise DataError(f"cannot read image {location}: {error.strerror}") from None


class ZipImages(ImageSource):
    """Images read straight from a zip archive, without extraction.

    The archive handle is opened lazily in each process (a ``ZipFile`` shared across a fork
    would interleave seeks), and dropped when pickled for spawned workers. Members may sit under
    a top-level folder (``train2017/000...jpg`` in the official archives) or at the root.
    """

    def __init__(self, archive: Path) -> None:
        self.archive = Path(archive)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._members: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"archive": self.archive}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["archive"])

    def location(self, file_name: str) -> str:
        return f"{self.archive}:{file_name}"

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (OSError, zipfile.BadZipFile) as error:
                raise DataError(f"cannot open image archive {self.archive}: {error}") from None
            self._pid = os.getpid()
            members: dict[str, str] = {}
            for name in self._zip.namelist():
                if name.endswith("/"):
                    continue
                members.setdefault(name, name)
                if "/" in name:
                    members.setdefault(name.split("/", 1)[1], name)
            self._members = members
        return self._zip

    def read_bytes(self, file_name: str) -> bytes:
        archive = self._open()
        member = self._members.get(file_name)
        if member is None:
            raise DataError(f"cannot read image {self.location(file_name)}: not in the archive")
        try:
            return archive.read(member)
        except (OSError, zipfile.BadZipFile, RuntimeError) as error:
            raise DataError(f"cannot read image {self.location(file_name)}: {error}") from None


def open_image_source(directory: Path) -> ImageSource:
    """``DIR`` as a folder if it exists, else ``DIR.zip``."""
    directory = Path(directory)
    if directory.is_dir():
        return FolderImages(directory)
    archive = directory.parent / f"{directory.name}.zip"
    if archive.is_file():
        return ZipImages(archive)
    raise DataError(f"image folder {directory} not found (nor an archive {archive})")
