"""Metrics over explanations: the multimodal desiderata and the perturbations they use."""
