"""Methods over a wrapped model: logit lens, layer evolution, patching, explainers, circuits."""
