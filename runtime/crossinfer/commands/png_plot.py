"""Line charts as PNG files without a plotting library: a tiny rasteriser into a numpy array
(lines, dots, a 3x5 pixel font) and the PNG encoder from the standard library (zlib, struct).
Enough for benchmark figures; matplotlib is not a dependency of crossinfer."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# 3x5 glyphs, rows top to bottom; text is upper-cased before drawing.
_FONT = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# .## ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "/": "..# ..# .#. #.. #..",
    "-": "... ... ### ... ...", "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.",
    ":": "... .#. ... .#. ...", " ": "... ... ... ... ...", "%": "#.# ..# .#. #.. #.#",
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
}  # fmt: skip

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (210, 210, 210)
BLUE: Color = (31, 119, 180)
ORANGE: Color = (230, 110, 20)


@dataclass(frozen=True)
class Panel:
    """One chart: ``values[i]`` plotted at the category ``x_labels[i]``, from y = 0 up."""

    title: str
    x_labels: Sequence[str]
    values: Sequence[float]
    color: Color = BLUE


class Canvas:
    """An RGB image, ``pixels[y, x]``, with the origin at the top left."""

    def __init__(self, width: int, height: int) -> None:
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        h, w, _ = self.pixels.shape
        x0, x1 = max(min(x0, x1), 0), min(max(x0, x1), w - 1)
        y0, y1 = max(min(y0, y1), 0), min(max(y0, y1), h - 1)
        if x0 <= x1 and y0 <= y1:
            self.pixels[y0 : y1 + 1, x0 : x1 + 1] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int) -> None:
        # Stamp a square every half pixel along the segment: crude, but thick and gap-free.
        steps = max(int(2 * math.hypot(x1 - x0, y1 - y0)), 1)
        r = width // 2
        for t in np.linspace(0.0, 1.0, steps + 1):
            x, y = round(x0 + t * (x1 - x0)), round(y0 + t * (y1 - y0))
            self.rect(x - r, y - r, x + r, y + r, color)

    def text(self, x: int, y: int, text: str, color: Color, scale: int = 2) -> None:
        """Draw ``text`` with its top-left corner at (x, y); unknown characters are blanks."""
        for i, char in enumerate(text.upper()):
            rows = _FONT.get(char, _FONT[" "]).split()
            for row, bits in enumerate(rows):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        px, py = x + (4 * i + col) * scale, y + row * scale
                        self.rect(px, py, px + scale - 1, py + scale - 1, color)

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return (4 * len(text) - 1) * scale


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (at least 1e-9)."""
    value = max(value, 1e-9)
    base = 10 ** math.floor(math.log10(value))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= value)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def draw_panel(canvas: Canvas, panel: Panel, left: int, top: int, width: int, height: int) -> None:
    """One chart into the box at (left, top): title, axes, y ticks, x labels, line and dots."""
    canvas.text(left + (width - Canvas.text_width(panel.title)) // 2, top + 6, panel.title, BLACK)
    x0, x1 = left + 70, left + width - 20  # the plot area
    y0, y1 = top + 30, top + height - 36
    y_max = _nice_max(max(panel.values, default=1.0))
    for k in range(5):
        tick = round(y1 - (y1 - y0) * k / 4)
        canvas.rect(x0, tick, x1, tick, GREY)
        label = _fmt(y_max * k / 4)
        canvas.text(x0 - 8 - Canvas.text_width(label), tick - 5, label, BLACK)
    canvas.rect(x0, y0, x0 + 1, y1, BLACK)
    canvas.rect(x0, y1, x1, y1 + 1, BLACK)
    count = len(panel.values)
    points = []
    for i, (label, value) in enumerate(zip(panel.x_labels, panel.values, strict=True)):
        x = x0 + (x1 - x0) * (i + 0.5) / max(count, 1)
        y = y1 - (y1 - y0) * value / y_max
        points.append((x, y))
        canvas.text(round(x) - Canvas.text_width(label) // 2, y1 + 10, label, BLACK)
    for (xa, ya), (xb, yb) in zip(points, points[1:], strict=False):
        canvas.line(xa, ya, xb, yb, panel.color, 3)
    for x, y in points:
        canvas.rect(round(x) - 4, round(y) - 4, round(x) + 4, round(y) + 4, panel.color)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` ([height, width, 3] uint8), filter 0 on every row."""
    height, width, _ = pixels.shape
    rows = np.concatenate(
        [np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1
    )

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def save_panels(path: str, panels: Sequence[Panel], x_title: str) -> None:
    """Panels side by side, the shared x-axis title below, written to ``path`` as PNG."""
    panel_w, panel_h = 520, 340
    canvas = Canvas(panel_w * len(panels), panel_h + 30)
    for i, panel in enumerate(panels):
        draw_panel(canvas, panel, i * panel_w, 0, panel_w, panel_h)
    canvas.text(
        (canvas.pixels.shape[1] - Canvas.text_width(x_title)) // 2, panel_h + 6, x_title, BLACK
    )
    with open(path, "wb") as f:
        f.write(encode_png(canvas.pixels))
