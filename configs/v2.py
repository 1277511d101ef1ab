"""ResMobileNet V2: the ResNet 7x7 + max-pool stem. Usage: python train.py --config configs/v2.py[:cpu|:accel]"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # config_flags loads this file by path; make base.py importable

from base import get_base_config


def get_config(preset=None):
    return get_base_config("v2", preset)
