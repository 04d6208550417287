"""Recovery: LoRA training and merge (peft), training data, the accelerate launch entry point."""
