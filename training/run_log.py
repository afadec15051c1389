"""Where a training run reports: the console, ``train.log`` and TensorBoard.

Only the main process opens the log file and the TensorBoard writer; every process may echo to
the console through ``tqdm.write`` so progress bars stay intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import cv2
from tqdm import tqdm

from omnipose.model.skeleton import KeypointSpec
from omnipose.training.evaluate import EvalResult

LOG_FILE = "train.log"


class RunLog:
    """Console echo, the run's log file and an optional TensorBoard writer."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.writer: Any = None
        self._stream: IO[str] | None = None

    @property
    def tensorboard(self) -> bool:
        """Whether scalars and sample images are being recorded."""
        return self.writer is not None

    def open(self, output_dir: Path, tensorboard: bool) -> None:
        """Append to ``output_dir/train.log``; start TensorBoard events when asked."""
        output_dir.mkdir(parents=True, exist_ok=True)
        self._stream = open(output_dir / LOG_FILE, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def say(self, message: str) -> None:
        """One line to the console (when echoing) and to the log file (when open)."""
        if self.echo:
            tqdm.write(message)
        if self._stream is not None:
            self._stream.write(message + "\n")
            self._stream.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def samples(self, result: EvalResult, epoch: int, keypoints: KeypointSpec) -> None:
        """The validation samples ``result`` kept, drawn with their predicted poses."""
        if self.writer is None or not result.samples:
            return
        from omnipose.model.render import draw_poses

        for index, (image_rgb, poses) in enumerate(result.samples):
            canvas = draw_poses(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), poses, keypoints)
            rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
            self.writer.add_image(f"val/sample_{index}", rgb, epoch, dataformats="HWC")
