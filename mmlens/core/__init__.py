"""The wrapped model: spans, adapter types, names, edits, the activation cache, the hooked model, backends."""
