"""From physical sensor values to contract cubes; xarray and numpy in and out, no torch, no network.

* :mod:`~stembed.preprocess.prepare`: masking, clipping and scaling into contract cubes (``prepare_s2``,
  ``prepare_s1``), same-day merging and S1-to-S2 date matching;
* :mod:`~stembed.preprocess.s2_radiometry`: Sentinel-2 L2A digital numbers -> reflectance (BOA offset)
  and the sen2nbar BRDF c-factor;
* :mod:`~stembed.preprocess.cloud_mask`: which S2 pixels are clear (``CloudMask``, ``SCLMask``).

The names below are re-exported so callers write ``from stembed.preprocess import prepare_s2``.
"""

from stembed.preprocess.cloud_mask import CloudMask, SCLMask, load_cloud_mask
from stembed.preprocess.prepare import (
    SCL_MASKED_DEFAULT,
    mask_s2,
    match_s1_to_s2,
    merge_same_day,
    prepare_s1,
    prepare_s2,
    valid_date_fraction,
)
from stembed.preprocess.s2_radiometry import BOA_ADD_OFFSET, boa_add_offset, dn_to_reflectance, nbar_c_factor

__all__ = [
    "BOA_ADD_OFFSET",
    "SCL_MASKED_DEFAULT",
    "CloudMask",
    "SCLMask",
    "boa_add_offset",
    "dn_to_reflectance",
    "load_cloud_mask",
    "mask_s2",
    "match_s1_to_s2",
    "merge_same_day",
    "nbar_c_factor",
    "prepare_s1",
    "prepare_s2",
    "valid_date_fraction",
]
