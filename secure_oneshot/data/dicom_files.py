"""DICOM pixel data to an 8-bit image, with the file's own rescale and window; nothing else from the header is kept.

What it does: reads one single-frame DICOM file with ``pydicom``, applies the modality rescale
(``RescaleSlope`` x stored value + ``RescaleIntercept``), then the file's VOI window (``WindowCenter`` /
``WindowWidth``, the first value when several are given) with the linear function of DICOM PS3.3 C.11.2.1.2.1,
or the image's own min..max when the file has no window; ``MONOCHROME1`` (bright = low) is inverted so that every
record reads bright = dense.  8-bit ``RGB`` images are taken as they are.

What it does not do: let a header value out.  Only the pixels come back; errors name the file and the exception's
type, never its text (pydicom's messages can quote element values), and pydicom's warnings and log lines are
silenced while the file is read.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["decode_dicom", "window_to_uint8"]

HINT = "run `secure-oneshot data check` to list every problem; export single-frame, uncompressed or JPEG-baseline DICOM"


def _first_number(value: Any) -> float | None:
    """A DS/IS element's value as one float (the first of a multi-valued one); None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    return float(value)


def window_to_uint8(values: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """Modality values to 0..255: the DICOM linear VOI function when a window is given (width >= 1), else min..max."""
    values = values.astype(np.float64)
    if center is not None and width is not None and width >= 1:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        scaled = ((values - (center - 0.5)) / max(width - 1, 1e-12) + 0.5) * 255.0
        scaled = np.where(values <= low, 0.0, np.where(values > high, 255.0, scaled))
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read(blob: bytes, shown: str) -> tuple[Any, np.ndarray]:
    import pydicom

    log = logging.getLogger("pydicom")
    level, propagate = log.level, log.propagate
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(io.BytesIO(blob))
                frames = _first_number(ds.get("NumberOfFrames"))
                if frames is not None and frames > 1:
                    raise DataError(f"{shown}: a multi-frame DICOM ({int(frames)} frames); one image per file", hint=HINT)
                pixels = np.asarray(ds.pixel_array)
            except DataError:
                raise
            except Exception as e:  # pydicom raises many types on bad files; their text may quote header values
                raise DataError(f"{shown}: not a readable DICOM image ({type(e).__name__})", hint=HINT) from None
    finally:
        log.setLevel(level)
        log.propagate = propagate
    return ds, pixels


def decode_dicom(blob: bytes, shown: str):  # type: ignore[no-untyped-def]
    """A PIL image ("L" or "RGB") from one DICOM file's pixel data."""
    from PIL import Image

    ds, pixels = _read(blob, shown)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2") and pixels.ndim == 2:
            slope = _first_number(ds.get("RescaleSlope"))
            intercept = _first_number(ds.get("RescaleIntercept"))
            values = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
            grey = window_to_uint8(values, _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth")))
            if photometric == "MONOCHROME1":
                grey = 255 - grey
            return Image.fromarray(grey, mode="L")
        if photometric == "RGB" and pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
            return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    except (TypeError, ValueError) as e:  # a malformed slope, intercept or window value
        raise DataError(f"{shown}: malformed rescale or window value ({type(e).__name__})", hint=HINT) from None
    raise DataError(f"{shown}: pixel layout not supported (photometric interpretation, {pixels.ndim}-D pixel array)",
                    hint="grey (MONOCHROME1/2) single-frame images or 8-bit RGB are supported")
