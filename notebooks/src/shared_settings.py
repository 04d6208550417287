# %%
# how every stage measures: final plots, memory and latency settings, sampling of the model's own text
PLOTS = paths.results_dir() / "plots"
PLOTS.mkdir(parents=True, exist_ok=True)
MEMORY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN) if PEAK_MEMORY else None
LATENCY = dict(batch_size=LATENCY_BATCH, seq_len=LATENCY_SEQ_LEN, new_tokens=DECODE_TOKENS, repeats=LATENCY_REPEATS)
# sampling of the model's own text
SELFGEN = dict(temperature=SELFGEN_TEMPERATURE, top_p=SELFGEN_TOP_P, batch_size=SELFGEN_BATCH)
