# %%
# Before any work: what this stage will hold in memory on this device (pruning_utils/pipeline/memory_plan.py), the
# settings it runs with (RUN: offload mode, where the Grams live, how variants are built; 'auto' ones chosen so the
# plan fits) and advice when it does not fit. Only the model's config is read.
from IPython.display import Markdown, display

from pruning_utils.pipeline import memory_plan

RUN = memory_plan.choose(MODEL, "STAGE", globals())
display(Markdown(RUN.describe()))
