"""Synthetic chest X-ray datasets in the exact on-disk layouts of CheXpert and Kaggle pneumonia.

No real data can be downloaded where cxrbench is tested, so it makes its own: radiograph-like
images whose findings are drawn from their labels (a learnable signal), with lesion masks in
`<out>/masks/` mirroring the image paths (ground truth for the explain job's localization score).
"""

from shards.synth.chexpert import ChexpertOptions, generate_chexpert
from shards.synth.common import SynthSummary
from shards.synth.pneumonia import PneumoniaOptions, generate_pneumonia

__all__ = ["ChexpertOptions", "PneumoniaOptions", "SynthSummary", "generate_chexpert", "generate_pneumonia"]
