"""Fixtures shared by the example-script tests."""

import pytest

from tl_align_hf.support.digits import write_digits_imagefolder

from .tiny_models import TINY_IMAGE_SIZE, write_tiny_checkpoint


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A digits image folder (train/validation) of 16 px images."""
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny ViT for 16 px digits and its image processor."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-vit")


@pytest.fixture(autouse=True)
def _restore_logging():
    """Tests that call scripts' `main` (which quiet the loggers for their run) leave the log levels as they were."""
    import logging

    from transformers.utils import logging as hf_logging

    verbosity, package_level = hf_logging.get_verbosity(), logging.getLogger("tl_align_hf").level
    yield
    hf_logging.set_verbosity(verbosity)
    logging.getLogger("tl_align_hf").setLevel(package_level)
