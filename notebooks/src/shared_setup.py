# %%
import warnings

import torch

from pruning_utils import paths
from pruning_utils.pipeline.hub_login import login_for

warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(SEED)
OUT = paths.ablation_dir()
print("Hugging Face login:", login_for(MODEL))  # gated hub models (Llama): HF_TOKEN, or a Kaggle / Colab secret
