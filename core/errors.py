"""Typed errors shown to users in ComfyUI's UI.

ComfyUI reports an exception as its qualified class name plus message, so each class names
the problem and each message says what was received, what is required and how to fix it.
Every error also derives from the builtin it specialises, so callers may catch either.
"""
from __future__ import annotations


class FlipbookError(Exception):
    """Base class of every error Flipbook raises on purpose."""


class SettingsMismatchError(FlipbookError, ValueError):
    """A sampling setting differs from what the chosen distilled variant was trained for."""


class InvalidSettingError(FlipbookError, ValueError):
    """A value is outside what the model or node supports (frames, size, motion scale…)."""


class UnsupportedCheckpointError(FlipbookError, ValueError):
    """A model file is not in a layout Flipbook knows, or is for another base family."""


class IncompatibleModelsError(FlipbookError, ValueError):
    """Two model files cannot be used together (e.g. an SDXL motion module on SD1.5)."""


class CorruptFileError(FlipbookError, ValueError):
    """A model file is truncated or not valid safetensors."""


class UnsafeFileError(FlipbookError, ValueError):
    """A pickle-based file (.ckpt/.pt/.bin) that Flipbook refuses to unpickle."""


class ModelFileNotFoundError(FlipbookError, FileNotFoundError):
    """A model file named in a node or workflow is not on disk."""


class ModelFileChangedError(FlipbookError, OSError):
    """A model file was replaced on disk after it was loaded, so its weights cannot be read again."""


class NonFiniteResultError(FlipbookError, ValueError):
    """Sampling or decoding produced NaN/inf (which would be saved as black frames)."""


class VideoWriteError(FlipbookError, OSError):
    """A video could not be written; nothing was left behind."""


class WorkflowError(FlipbookError, ValueError):
    """A workflow JSON cannot be run headless (unknown node, bad link, bad override)."""


class FilenamePrefixError(InvalidSettingError, VideoWriteError):
    """A filename_prefix no file can be saved under (leaves the output folder, NUL byte, too long).

    Also a VideoWriteError, which is what such prefixes raised before they were checked when queued.
    """
