# %%
import warnings

import torch

from pruning_utils import paths

warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(SEED)
OUT = paths.ablation_dir()
