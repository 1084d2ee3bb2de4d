"""The supported-architecture list, generated from the adapter tables and the model registry.

:func:`supported_rows` lists every model class mmlens wraps: each class named by a hand-written
table, and each class of a registry tiny model (``tiny-*``, built here on the CPU) that is wrapped by
an automatic adapter. :func:`supported_markdown` is the table the README and docs/supported.md hold
(``mmlens hooks --supported`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmlens.core.adapter import Adapter, find_adapter
from mmlens.data.loading import load_model, registry_names
from mmlens.hooks.auto import is_auto

"""Registry names built to find each tiny model's class (they build in well under a second)."""


@dataclass(frozen=True)
class Supported:
    """One supported model class: its adapter, whether that is a hand table or automatic, the
    registry's tiny models of the class, and the modalities the adapter knows."""

    model_class: str
    adapter: str
    kind: str
    registry: tuple[str, ...]
    modalities: tuple[str, ...]


def adapter_modalities(adapter: Adapter) -> tuple[str, ...]:
    """The modalities an adapter knows: those with input keys, else those of its stacks and points."""
    found = set(adapter.modality_inputs)
    found |= {s.modality for s in adapter.stacks if s.modality} | {p.modality for p in adapter.points if p.modality}
    return tuple(sorted(found))


def supported_rows() -> list[Supported]:
    """Every supported class, hand tables first (in lookup order), then automatic ones; each with the
    tiny registry models of that class."""
    tiny: dict[str, list[str]] = {}
    adapters: dict[str, Adapter] = {}
    for name in registry_names():
        if "tiny" in name:
            model = load_model(name).model
            cls = type(model).__name__
            tiny.setdefault(cls, []).append(name)
            adapters.setdefault(cls, find_adapter(model))
    rows: dict[str, Supported] = {}
    from mmlens.hooks import BUILT_IN  # the shipped tables only, not ones a session registered

    for adapter in BUILT_IN:
        for cls in adapter.architectures:
            if cls not in rows and adapters.get(cls, adapter) is adapter:
                rows[cls] = Supported(cls, adapter.name, "hand", tuple(tiny.get(cls, ())), adapter_modalities(adapter))
    for cls, adapter in adapters.items():
        if cls not in rows:
            kind = "auto" if is_auto(adapter) else "hand"
            rows[cls] = Supported(cls, adapter.name, kind, tuple(tiny[cls]), adapter_modalities(adapter))
    return sorted(rows.values(), key=lambda r: (r.kind != "hand", r.model_class))


def supported_markdown() -> str:
    """The supported classes as a Markdown table (what ``mmlens hooks --supported`` prints)."""
    lines = ["| model class | adapter | table | registry tiny model | modalities |", "|---|---|---|---|---|"]
    for row in supported_rows():
        registry = ", ".join(f"`{n}`" for n in row.registry) or "-"
        table = "hand-written" if row.kind == "hand" else "automatic"
        lines.append(f"| `{row.model_class}` | `{row.adapter}` | {table} | {registry} | {', '.join(row.modalities)} |")
    return "\n".join(lines) + "\n"
