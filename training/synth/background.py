"""Random backgrounds and whole-image lighting effects for synthetic images.

Backgrounds layer gradients, noise, stripes, checks and blurred shapes, often with a floor below a
horizon, so that the network cannot tell people from background by texture alone.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from omnipose.training.synth.body import random_colour


@lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred, size-normalised pixel coordinates, shared by every texture of one image size."""
    scale = float(max(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return (xs - width / 2) / scale, (ys - height / 2) / scale


def _directional(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Coordinate along a random direction, about -0.7..0.7 across the image."""
    xs, ys = _pixel_grid(height, width)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One random texture layer (H, W, 3) float32 in 0..255."""
    kind = rng.choice(["noise", "stripes", "checker", "shapes", "gradient"])
    c1, c2 = random_colour(rng), random_colour(rng)
    if kind == "noise":
        cells = int(rng.integers(2, 40))
        channels = 3 if rng.random() < 0.3 else 1
        small = rng.random((cells, cells, channels), dtype=np.float32)
        mix = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        mix = np.clip(mix.reshape(height, width, channels), 0.0, 1.0)
        return c1 + mix * (c2 - c1)
    if kind == "stripes":
        period = rng.uniform(3.0, 40.0) / max(height, width)
        wave = np.sin(_directional(rng, height, width) * (2.0 * math.pi / period))
        mix = (wave > rng.uniform(-0.5, 0.5)).astype(np.float32) if rng.random() < 0.5 else (
            0.5 + 0.5 * wave)  # fmt: skip
        return c1 + mix[..., None] * (c2 - c1)
    if kind == "checker":
        size = rng.uniform(4.0, 48.0) / max(height, width)
        xs, ys = _pixel_grid(height, width)
        angle = rng.uniform(0.0, math.pi / 2)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        across = ys * math.cos(angle) - xs * math.sin(angle)
        mix = (np.floor(along / size) + np.floor(across / size)) % 2
        return c1 + mix.astype(np.float32)[..., None] * (c2 - c1)
    if kind == "shapes":
        layer = np.empty((height, width, 3), np.float32)
        layer[:] = c1
        for _ in range(int(rng.integers(3, 16))):
            colour = tuple(float(c) for c in random_colour(rng))
            cx, cy = (int(v) for v in rng.integers(0, (width, height)))
            size = int(rng.integers(3, max(height, width) // 3))
            shape = rng.integers(4)
            if shape == 0:
                cv2.circle(layer, (cx, cy), size, colour, -1, cv2.LINE_AA)
            elif shape == 1:
                cv2.rectangle(layer, (cx, cy), (cx + size, cy + int(rng.integers(3, size + 4))),
                              colour, -1)  # fmt: skip
            elif shape == 2:
                end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                cv2.line(layer, (cx, cy), end, colour, int(rng.integers(1, 8)), cv2.LINE_AA)
            else:
                axes = (size, int(rng.integers(2, size + 3)))
                angle = float(rng.uniform(0, 180))
                cv2.ellipse(layer, (cx, cy), axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        sigma = rng.uniform(0.0, 4.0)
        return cv2.GaussianBlur(layer, (0, 0), sigma) if sigma > 0.5 else layer
    ramp = np.clip(_directional(rng, height, width) * rng.uniform(0.7, 2.0) + 0.5, 0.0, 1.0)
    return c1 + ramp[..., None] * (c2 - c1)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Layered textures (gradients, noise, stripes, checks, blurred shapes) with a floor region."""
    image = _texture(rng, height, width)
    for _ in range(int(rng.integers(0, 3))):
        layer = _texture(rng, height, width)
        image = image + rng.uniform(0.2, 0.8) * (layer - image)
    if rng.random() < 0.5:  # a floor below a horizon, seen in most photos of people
        horizon = rng.uniform(0.3, 0.85) * height
        ys = np.arange(height, dtype=np.float32)[:, None, None]
        blend = np.clip((ys - horizon) / rng.uniform(1.0, 8.0), 0.0, 1.0)
        image = image + blend * (_texture(rng, height, width) - image)
    if rng.random() < 0.4:  # depth of field
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.7, 2.5))
    return image.astype(np.float32)


def apply_global_lighting(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, colour cast, a directional light falloff, sensor noise and blur."""
    height, width = image.shape[:2]
    out = image.astype(np.float32)
    falloff = 1.0 + rng.uniform(-0.6, 0.6) * _directional(rng, height, width)
    out *= falloff[..., None]
    mean = float(out.mean())
    out = (out - mean) * rng.uniform(0.65, 1.3) + mean + rng.uniform(-35.0, 35.0)
    out *= rng.uniform(0.85, 1.15, 3).astype(np.float32)
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.1))
    sigma = rng.uniform(0.0, 7.0)
    if sigma > 1.0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
