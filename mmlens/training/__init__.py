"""Training: one fit loop and one cache of trained weights (:mod:`mmlens.training.loop`), and the
models mmlens trains itself with them (synthetic fusion and graph-text classifiers, the synthetic
VLM, TEA-GLM's GNN and projector)."""
