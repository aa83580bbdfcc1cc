"""The frames of the WebSocket protocol: JPEGs in, JPEGs out.

A frame's size is read from its header (`jpeg_size`) before it is decoded: a small file can
declare a huge image, whose decoding would take seconds.
"""

from __future__ import annotations

import cv2
import numpy as np

JPEG_QUALITY = 90
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from a JPEG's start-of-frame header, without decoding it; None when no
    start-of-frame segment comes before the image data (not a readable JPEG)."""
    i = 2  # after FF D8
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    return None


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """RGB uint8 frame of a JPEG, or None when OpenCV cannot decode it."""
    frame_bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if frame_bgr is None else cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)


def encode_jpeg(frame_hwc: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame_hwc, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok, "OpenCV failed to encode a uint8 RGB frame as JPEG"
    return buf.tobytes()
