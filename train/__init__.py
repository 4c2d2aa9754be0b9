"""LLaMA in Flax and its training: model, checkpoints, Hugging Face and EasyLM interop, generation,
sharding, the data loader and the Ray Train driver."""
