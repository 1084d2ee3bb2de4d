"""ActivationCache: what a run recorded, indexable by name, by (name, layer) and by modality span."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmlens.core.adapter import HookPoint
from mmlens.core.names import from_transformer_lens_name, nearest_names, unknown_hook_error
from mmlens.core.spans import ModalitySpans, Selector


@dataclass
class Named:
    """A tensor with named axes and optional coordinate labels per axis.

    ``dims`` names every axis of ``values`` (e.g. ``("layer", "batch", "pos", "d_model")``);
    ``coords`` maps an axis name to its labels (e.g. the hook names of the ``layer`` axis).
    """

    values: Tensor
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.dims) != self.values.dim():
            raise ValueError(
                f"{len(self.dims)} axis names {self.dims} for a tensor of shape {tuple(self.values.shape)}"
            )

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.dims, self.values.shape))

    def axis(self, name: str) -> int:
        if name not in self.dims:
            raise KeyError(f"no axis {name!r}; axes are {self.dims}")
        return self.dims.index(name)

    def __repr__(self) -> str:
        return f"Named({', '.join(f'{d}={n}' for d, n in self.shape.items())}, dtype={self.values.dtype})"


class ActivationCache(Mapping):
    """Activations recorded by a run, keyed by canonical hook name.

    Index with a full name (``cache["lm.blocks.3.resid_post"]``), a ``(name, layer)`` pair with
    the short name of a block point (``cache["resid_post", -1]``, ``cache["vision.resid_post", 0]``;
    negative layers count from the last block), and optionally a modality span as the last element
    (``cache["resid_post", 3, "image"]`` -> ``[batch, n_image, d]``).
    """

    def __init__(self, data: dict[str, Tensor], hook_points: Mapping[str, HookPoint], spans: ModalitySpans | None):
        self._data = data
        self._points = hook_points
        self.spans = spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._data

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} hook points, spans={self.spans!r})"

    def resolve(self, name: str, layer: int | None = None) -> str:
        """The full hook name for ``name`` (full or short) and ``layer``."""
        if layer is None:
            if name in self._points:
                return name
            alias = from_transformer_lens_name(name)
            if alias in self._points:
                return alias
            raise unknown_hook_error(name, list(self._points))
        prefix, kind = name.rsplit(".", 1) if "." in name else ("lm", name)
        layers = sorted({hp.layer for hp in self._points.values() if hp.prefix == prefix and hp.kind == kind})
        if not layers:
            raise unknown_hook_error(f"{prefix}.blocks.{layer}.{kind}", list(self._points))
        n = len(layers)
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range for {prefix!r} with {n} blocks")
        return f"{prefix}.blocks.{layer % n}.{kind}"

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, str):
            return self.get(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
            raise TypeError("index a cache with a hook name, (name, layer), or (name, layer, span)")
        name, rest = key[0], list(key[1:])
        layer = rest.pop(0) if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool) else None
        at = rest.pop(0) if rest else None
        if rest:
            raise TypeError(f"too many index elements in {key!r}")
        return self.get(name, layer, at)

    def get(self, name: str, layer: int | None = None, at: Selector = None, row: int | None = None) -> Tensor:
        """The recorded activation, optionally restricted to positions ``at``.

        With ``at``, returns ``[batch, n, ...]`` when every row selects the same number of
        positions; with ``row``, returns that row's ``[n, ...]`` (works for ragged layouts).
        """
        full = self.resolve(name, layer)
        if full not in self._data:
            recorded = list(self._data)
            raise KeyError(
                f"{full!r} was not recorded in this run (recorded: {nearest_names(full, recorded)}); "
                "add it to the run's cache= filter"
            )
        act = self._data[full]
        if at is None:
            return act if row is None else act[row]
        if not self._points[full].fused_positions or self.spans is None:
            raise ValueError(
                f"{full!r} does not index the fused sequence, so span {at!r} does not apply; "
                "index its positions directly"
            )
        mask = self.spans.mask(at)
        if row is not None:
            return act[row][mask[row]]
        positions = self.spans.positions(at)
        index = positions.view(*positions.shape, *([1] * (act.dim() - 2))).expand(-1, -1, *act.shape[2:])
        return act.gather(1, index.to(act.device))

    def stack(self, name: str, at: Selector = None) -> Named:
        """Stack a block point over layers: ``Named`` with dims ``(layer, *axes, ...)``: ``(layer, batch,
        pos, d)``, or ``(layer, item, d)`` for points laid out ``[items, d]`` (``HookPoint.axes``).

        ``name`` is a short block-point name (``"resid_post"``, ``"vision.resid_post"``) or a glob
        over full names (``"lm.blocks.*.attn_out"``).
        """
        if "*" in name or "?" in name:
            names = [n for n in self._data if fnmatch.fnmatchcase(n, name)]
        else:
            prefix, kind = name.rsplit(".", 1) if "." in name else ("lm", name)
            names = [
                n for n, hp in self._points.items() if hp.prefix == prefix and hp.kind == kind and hp.layer is not None
            ]
        names = [n for n in names if n in self._data]
        if not names:
            raise KeyError(f"no recorded activations match {name!r}; recorded: {nearest_names(name, list(self._data))}")
        names.sort(key=lambda n: self._points[n].layer if self._points[n].layer is not None else -1)
        values = torch.stack([self.get(n, at=at) for n in names])
        hp = self._points[names[0]]
        lead = ("layer", *hp.axes)  # e.g. (layer, batch, pos) or, for [nodes, d] points, (layer, item)
        rest = ("head", "d_head") if hp.heads else ("d",) * (values.dim() - len(lead))
        dims = (*lead, *rest)[: values.dim()]
        return Named(values, dims, {"layer": [self._points[n].layer for n in names], "hook": names})
