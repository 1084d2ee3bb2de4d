"""Interop with TransformerLens (``TransformerBridge``) and nnsight (a second run backend).

TransformerLens hook-name aliases live in :mod:`mmlens.core.names`.

- :func:`unwrap_bridge` lets :class:`mmlens.HookedModel` wrap a TransformerLens 4.x
  ``TransformerBridge``: the bridge swaps its components into the HF model in place
  (``model.layers.0`` becomes a ``BlockBridge`` holding the ``LlamaDecoderLayer`` as
  ``_original_component``) and the components forward attribute access to the module they wrap, so
  our dotted module paths still resolve; we hook the bridge components themselves.
- :func:`no_torchvision_install` / :func:`boot_bridge` boot a bridge without letting TransformerLens
  ``pip install torchvision`` into the running interpreter.
- :func:`run_with_nnsight` runs the hook points and edits of :meth:`HookedModel.run` inside one
  ``nnsight`` trace, with results equal to the torch-hook backend.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmlens.core.adapter import get_module
from mmlens.core.cache import ActivationCache
from mmlens.core.edits import Edit
from mmlens.core.plan import CacheFilter, Hookable, Plan, RunResult


# -- TransformerLens TransformerBridge ----------------------------------------------------------------
def unwrap_bridge(model: Any, tokenizer: Any = None, processor: Any = None) -> tuple[Any, Any, Any]:
    """``(hf_model, tokenizer, processor)`` for a TransformerLens bridge; other models pass through.

    For a ``TransformerBridge`` the HF model is ``bridge.original_model`` (with the bridge's
    components swapped in; they run the HF numerics), and ``tokenizer`` / ``processor`` default to
    the bridge's own. Raises for a bridge in compatibility mode (its weights were folded and
    centred in place, so its activations are not the HF model's) and for bridges with no local
    torch module (vLLM, Inspect).
    """
    bridge_module = sys.modules.get("transformer_lens.model_bridge")
    if bridge_module is None or not isinstance(model, bridge_module.BridgeCore):
        return model, tokenizer, processor
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{type(model).__name__} has no local torch module to hook (remote driver); "
            "boot the model with TransformerBridge.boot_transformers(...) to use it with mmlens"
        )
    if getattr(model, "compatibility_mode", False):
        raise ValueError(
            "this TransformerBridge is in compatibility mode: enable_compatibility_mode() folded and centred "
            "the HF weights in place, so its activations are no longer the model's own; wrap a freshly booted "
            "bridge (never call enable_compatibility_mode() on a model you analyse with mmlens)"
        )
    return (
        model.original_model,
        model.tokenizer if tokenizer is None else tokenizer,
        getattr(model, "processor", None) if processor is None else processor,
    )


def _refuse_torchvision_install() -> bool:
    """Stands in for TransformerLens's ``_ensure_torchvision``: True if torchvision imports, else raise."""
    with contextlib.suppress(Exception):  # a broken torchvision counts as missing, as in TransformerLens
        import torchvision  # noqa: F401

        return True
    cause = sys.exc_info()[1]  # the processor-loading error TransformerLens is handling
    raise RuntimeError(
        f"TransformerLens could not load this model's processor ({cause!r}) and would now run "
        "`pip install torchvision` inside this interpreter, which replaces the CPU torch with a ~4.5 GB CUDA "
        "build; mmlens blocked it. Fix: boot with mmlens.core.backends.boot_bridge(model, tokenizer, processor=...) "
        "so TransformerLens finds a saved processor, or install a torchvision that matches your torch yourself"
    )


@contextmanager
def no_torchvision_install() -> Iterator[None]:
    """Within the block, a TransformerLens bridge boot cannot ``pip install torchvision``.

    TransformerLens 4.x (``model_bridge/sources/transformers/helpers.py``) installs torchvision on
    the fly when a multimodal model's processor fails to load; inside the block that step raises a
    ``RuntimeError`` that says how to fix the boot instead. Wrap any ``boot_transformers`` call in it.
    """
    from transformer_lens.model_bridge.sources.transformers import helpers

    original = helpers._ensure_torchvision
    helpers._ensure_torchvision = _refuse_torchvision_install
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def boot_bridge(hf_model: nn.Module, tokenizer: Any = None, *, processor: Any = None, **boot_kwargs: Any) -> Any:
    """Boot a TransformerLens ``TransformerBridge`` around an already-loaded HF model, safely.

    Handles the boot's traps: ``config.architectures`` is set when empty (models built from a
    config), the tokenizer/processor are saved to a temporary folder and the tokenizer reloaded
    from it (TransformerLens reloads it by ``name_or_path``), and the boot runs under
    :func:`no_torchvision_install`. Multimodal models need ``processor`` (else TransformerLens would
    try to install torchvision, which raises here). Note that booting switches the model to eager
    attention and swaps bridge components into it in place. ``boot_kwargs`` go to
    ``TransformerBridge.boot_transformers``.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("boot_bridge needs the model's tokenizer (or a processor that has one)")
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory(prefix="mmlens-bridge-") as folder, no_torchvision_install():
        hf_model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        return TransformerBridge.boot_transformers(
            folder,
            hf_model=hf_model,
            tokenizer=AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            **boot_kwargs,
        )


# -- nnsight backend --------------------------------------------------------------------------------
_Event = tuple[str, str]  # (module path, "input" | "output")

_ENVOYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HookedModel -> {kind: nnsight wrapper}
_ORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HookedModel -> {input keys: (order, calls)}


def _envoy(hm: Hookable, remote: bool | str = False) -> Any:
    """The nnsight wrapper of ``hm.model``, built once per HookedModel and kind.

    Local runs use ``nnsight.NNsight`` (any torch module); ``remote`` runs need a wrapper that nnsight
    can name on a server, ``nnsight.modeling.transformers.TransformersModel`` around the same module
    (its paths are the module's own). nnsight instruments every submodule's ``forward`` in place
    (inert outside a trace).
    """
    per_model = _ENVOYS.setdefault(hm, {})
    kind = "remote" if remote else "local"
    if kind not in per_model:
        if remote:
            from nnsight.modeling.transformers import TransformersModel

            per_model[kind] = TransformersModel(hm.model, tokenizer=hm.tokenizer)
        else:
            from nnsight import NNsight

            per_model[kind] = NNsight(hm.model)
    return per_model[kind]


def _check_remote(hm: Hookable, remote: bool | str) -> None:
    """Raise naming what NDIF execution lacks: an API key, or a model id the server can load."""
    if remote == "local" or not remote:
        return
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        raise RuntimeError(
            "remote=True sends the trace to NDIF, which needs an API key: set the NDIF_API_KEY environment "
            "variable or call nnsight.CONFIG.set_default_api_key(KEY); remote='local' runs nnsight's serverless "
            "simulation of the remote path here instead"
        )
    name = str(getattr(getattr(hm.model, "config", None), "name_or_path", "") or "")
    if not name or Path(name).expanduser().exists():
        raise RuntimeError(
            f"remote=True runs a model NDIF hosts, named by its Hugging Face id, but this model was loaded from "
            f"{name or 'a config (no name)'!r}; load it by hub id (mmlens.load_model('org/name')) to run it remotely"
        )


@contextmanager
def _remote_errors(remote: bool | str) -> Iterator[None]:
    """For a ``remote`` run: a failure to serialize the trace or to reach NDIF as a RuntimeError that
    names the host."""
    if not remote:
        yield
        return
    from nnsight import CONFIG

    host = "nnsight's local simulation" if remote == "local" else remote if isinstance(remote, str) else CONFIG.API.HOST
    try:
        yield
    except Exception as err:
        raise RuntimeError(
            f"remote execution ({host}) failed: {type(err).__name__}: {err}. A pickling error means the trace "
            "could not be serialized for the server (mmlens's hook plan holds the HookedModel; see docs/scale-out.md: "
            "use backend='nnsight' locally, or nnsight directly on the module paths mmlens resolves); otherwise check "
            "the network, NDIF_HOST, NDIF_API_KEY and that NDIF hosts this model"
        ) from err


def _execution_order(
    hm: Hookable, inputs: Mapping[str, Any], forward_kwargs: dict
) -> tuple[dict[_Event, int], Counter]:
    """Rank of every hook-point event in one forward, and how often each module ran.

    Recorded once per HookedModel and set of input keys (which modules run depends on which
    inputs are given, e.g. a LLaVA forward without its image inputs skips the vision tower) by a
    plain forward with hooks on every module a hook point uses.
    """
    per_model = _ORDERS.setdefault(hm, {})
    key = tuple(sorted(k for k, v in {**inputs, **forward_kwargs}.items() if v is not None))
    if key in per_model:
        return per_model[key]
    order: dict[_Event, int] = {}
    calls: Counter = Counter()

    def before(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[path] += 1
            order.setdefault((path, "input"), len(order))

        return hook

    def after(path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            order.setdefault((path, "output"), len(order))

        return hook

    paths = dict.fromkeys(
        p for hp in hm.hook_points.values() for p in (hp.site.module, hp.block, hp.mlp) if p is not None
    )
    handles = []
    try:
        for path in paths:
            module = get_module(hm.model, path, hm.adapter.name)
            handles += [module.register_forward_pre_hook(before(path)), module.register_forward_hook(after(path))]
        with torch.no_grad():
            hm.model(**inputs, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    per_model[key] = order, calls
    return order, calls


def _intervene(envoy: Any, plan: Plan, events: list[tuple[_Event, list]]) -> None:
    """The trace body: visit the events in execution order, reading and writing through the envoys."""
    import nnsight

    for (path, io), actions in events:
        node = envoy.get(path) if path else envoy
        if io == "output":
            new = plan._output_hook(actions)(node, (), node.output)
            if new is not None:
                node.output = new
        else:
            args, kwargs = node.inputs
            new = plan._input_hook(actions)(node, args, kwargs)
            if new is not None:
                node.inputs = new
    for value in plan.store.values():
        nnsight.save(value)


def run_with_nnsight(
    hm: Hookable,
    inputs: Mapping[str, Any],
    *,
    cache: CacheFilter = None,
    edits: Edit | list[Edit] = (),
    grad: bool = False,
    keep_grad: bool | None = None,
    remote: bool | str = False,
    **forward_kwargs: Any,
) -> RunResult:
    """:meth:`HookedModel.run` with ``backend="nnsight"``: the same hook points and edits, applied
    inside one ``nnsight`` trace of ``hm.model`` (the route to NDIF-style execution).

    Returns the same :class:`RunResult` as the torch backend: equal logits with no edits, equal
    cached tensors (``[batch, pos, d]``; per-head points ``[batch, pos, head, d_head]``), equal
    edited logits, and the same ``resid_mid`` write semantics. Cached tensors stay attached to the
    graph when ``keep_grad`` (default: ``grad``). The first run for a set of input keys costs one
    extra plain forward (nnsight must visit modules in execution order, which it records).
    Unsupported: a hook point whose module runs more than once per forward (nnsight sees its first
    call only; use ``backend="torch"``).

    ``remote`` goes to nnsight's ``trace(..., remote=...)``: ``True`` runs the trace on NDIF (needs
    ``NDIF_API_KEY`` and a model loaded by a hub id NDIF hosts; mmlens's code is shipped by value),
    ``"local"`` runs nnsight's serverless simulation of that path, a URL another NDIF host.
    """
    cache_names, edits_by_point, must_fire = hm._request(cache, edits)
    order, calls = _execution_order(hm, inputs, forward_kwargs)
    unreached = {
        n
        for n in [*cache_names, *edits_by_point]
        if (hm.hook_points[n].site.module, hm.hook_points[n].site.io) not in order
    }
    if unreached & must_fire:
        raise RuntimeError(
            f"hook points {sorted(unreached & must_fire)} were never reached in this forward (their "
            "modules did not run: is that modality's input missing?)"
        )
    spans = hm.adapter.spans(hm.model, inputs)
    store: dict[str, Tensor] = {}
    fired: set[str] = set()
    plan = Plan(
        hm,
        spans,
        {n for n in cache_names if n not in unreached},
        edits_by_point,
        store,
        fired,
        grad if keep_grad is None else keep_grad,
    )
    events = sorted(plan.events().items(), key=lambda item: order[item[0]])
    repeated = sorted({path for (path, _), _ in events if calls[path] > 1})
    if repeated:
        raise NotImplementedError(
            f"modules {repeated} run more than once per forward; the nnsight backend sees only "
            "their first call, so it cannot match the torch backend: use backend='torch'"
        )
    import nnsight

    _check_remote(hm, remote)
    envoy = _envoy(hm, remote)
    if remote:
        nnsight.register("mmlens")  # not installed on the server: ship its code with the trace
    where = {"remote": remote} if remote else {}
    with torch.set_grad_enabled(grad), _remote_errors(remote), envoy.trace(**inputs, **forward_kwargs, **where):
        _intervene(envoy, plan, events)
        output = nnsight.save(envoy.output)
    logits = output if isinstance(output, Tensor) else output.logits
    return RunResult(output=output, logits=logits, cache=ActivationCache(store, hm.hook_points, spans), spans=spans)
