"""The library messages known to be harmless here, silenced where they arise; everything else still reaches the user.

- transformers 5 builds a default ``SiglipTextConfig`` (vocabulary 32 000, CLIP's token ids 49 406 / 49 407) just to
  format a debug line for every SigLIP config it reads, and warns that those defaults are out of range.
- A vision tower loaded from a full CLIP/SigLIP checkpoint leaves the text tower's weights unused: transformers
  prints them as a table of UNEXPECTED keys. ``load_vision_tower`` checks the opposite case itself: a weight the
  tower needs and the checkpoint lacks is an error.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

_DEFAULT_SIGLIP_TEXT_IDS = ("(between 0 and 31999), got 49406.", "(between 0 and 31999), got 49407.")


class _DropDefaultSiglipTokenIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        endings = tuple(m + " This may result in unexpected behavior." for m in _DEFAULT_SIGLIP_TEXT_IDS)
        return not ("must be `None` or an integer within the vocabulary" in message and message.endswith(endings))


_FILTER = _DropDefaultSiglipTokenIds()


def install() -> None:
    """Idempotent: filters the messages above on transformers' own loggers."""
    logger = logging.getLogger("transformers.configuration_utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


@contextmanager
def quiet_transformers():
    """transformers' warnings off (errors still shown) for one call whose outcome is checked by the caller."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextmanager
def no_progress_bars():
    """transformers' loading and saving bars off, for models that load and save in well under a second."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
