"""Training: the models mmlens trains itself (synthetic fusion models, the synthetic VLM, TEA-GLM's encoder and projector)."""
