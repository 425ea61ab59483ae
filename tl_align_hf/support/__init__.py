"""Support code for the example scripts, outside the TL-Align method itself.

The method (aligner, attention routing, aligned models, mixing, collator, loss, config, trainer) is the top-level
package. What lives here serves the examples and the trainer around it: loading and checking image datasets
(:mod:`.data`), the training and evaluation transforms sized from the image processor (:mod:`.transforms`), the
bundled digits set (:mod:`.digits`), safe checkpoints and the resume record (:mod:`.checkpoints`), the model card
and Hub push (:mod:`.model_card`), the accuracy metric (:mod:`.metrics`), and the parts of the paper's training
recipe that are not TL-Align (:mod:`.optim`, :mod:`.sampler`, :mod:`.ema`, :mod:`.recipes`). The names below
are the documented helpers the examples use.
"""

from ..settings import check_label_smoothing, training_settings
from .checkpoints import LoopRecord, check_one_run_per_launch, check_writable, disk_full_error
from .data import label_maps, load_image_dataset, prepare_image_dataset
from .digits import default_digits_dir, write_digits_imagefolder
from .metrics import ACCURACY_METRIC_PATH, compute_accuracy_metrics
from .model_card import model_card, push_checkpoint_to_hub, tl_align_model_card
from .recipes import set_drop_path_rate
from .sampler import RepeatedAugmentationSampler
from .transforms import (
    AUGMENTATIONS,
    DEIT_RECIPE,
    default_image_processor,
    deit_augmentation,
    interpolation_kwargs,
    make_transforms,
    processor_resolution_differs,
)

__all__ = [
    "ACCURACY_METRIC_PATH",
    "AUGMENTATIONS",
    "DEIT_RECIPE",
    "LoopRecord",
    "RepeatedAugmentationSampler",
    "check_label_smoothing",
    "check_one_run_per_launch",
    "check_writable",
    "compute_accuracy_metrics",
    "default_digits_dir",
    "default_image_processor",
    "deit_augmentation",
    "disk_full_error",
    "interpolation_kwargs",
    "label_maps",
    "load_image_dataset",
    "make_transforms",
    "model_card",
    "prepare_image_dataset",
    "processor_resolution_differs",
    "push_checkpoint_to_hub",
    "set_drop_path_rate",
    "tl_align_model_card",
    "training_settings",
    "write_digits_imagefolder",
]
