"""Encoder classifiers (BERT family): adapter, surgery, checkpoints, tasks, importance, variants, ONNX export."""
