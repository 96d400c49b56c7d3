"""Synthetic chest X-ray datasets in the exact on-disk layouts of CheXpert, Kaggle pneumonia,
NIH ChestX-ray14 and MIMIC-CXR-JPG.

No real data can be downloaded where cxrbench is tested, so it makes its own: radiograph-like
images whose findings are drawn from their labels (a learnable signal), with lesion masks in
`<out>/masks/` mirroring the image paths (ground truth for the explain job's localization score).
"""

from shards.synth.chexpert import ChexpertOptions, generate_chexpert
from shards.synth.common import SynthSummary
from shards.synth.mimic import MimicOptions, generate_mimic
from shards.synth.nih import NihOptions, generate_nih
from shards.synth.pneumonia import PneumoniaOptions, generate_pneumonia

__all__ = ["ChexpertOptions", "MimicOptions", "NihOptions", "PneumoniaOptions", "SynthSummary",
           "generate_chexpert", "generate_mimic", "generate_nih", "generate_pneumonia"]
