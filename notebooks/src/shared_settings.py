# %%
# how every stage measures: final plots, memory and latency settings, sampling of the model's own text
PLOTS = paths.results_dir() / "plots"
PLOTS.mkdir(parents=True, exist_ok=True)
MEMORY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN)
LATENCY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN, new_tokens=DECODE_TOKENS, repeats=LATENCY_REPEATS)
SELFGEN = dict(temperature=SELFGEN_TEMPERATURE, top_p=SELFGEN_TOP_P)  # sampling of the model's own text
