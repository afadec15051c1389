"""Paths of real photos the tests use: ultralytics ships two with people in them."""

from __future__ import annotations

from pathlib import Path

import ultralytics

ASSETS = Path(ultralytics.__file__).resolve().parent / "assets"
BUS_JPG = ASSETS / "bus.jpg"  # 810 x 1080, four people standing, one partly cut off
ZIDANE_JPG = ASSETS / "zidane.jpg"  # 1280 x 720, two people close up
