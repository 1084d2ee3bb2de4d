"""Training and evaluating a TEA-GLM projector on a node-classification instruction prompt.

The LM and the (pretrained) GNN stay frozen; only the linear projector from a node's GNN
representation to its K graph tokens is trained, with the LM's cross-entropy on the first token of
the class name that answers the prompt. Every prompt shares its beginning (chat header,
instruction, class list), so that prefix is run once and its keys/values are reused for every
batch (:class:`mmlens.core.replay.PrefixRunner`; exact up to float round-off,
``tests/test_tea_glm_reproduction.py`` checks it against the full forward of :class:`TeaGLM`).

Prompt (TEA-GLM style; the graph tokens stand where the node's graph is described)::

    <chat header> Classify a machine-learning paper into one of these categories: <7 classes>.
    Paper graph: <g1> .. <gK>
    Title: <title>
    Which category does this paper belong to? <end of turn> Category: <answer>

The text-only baseline is the same prompt without the graph tokens and the line that introduces them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mmlens.core.replay import PrefixRunner
from mmlens.models.tea_glm import TeaGLM
from mmlens.training.loop import Checkpoint, RowOrder, fit

_MARKER = "\u241fMMLENS\u241f"


@dataclass(frozen=True)
class PromptTemplate:
    """The node-classification prompt's pieces (``{classes}`` and ``{title}`` are filled in)."""

    instruction: str = "Classify a machine-learning paper into one of these categories: {classes}."
    graph_line: str = "\nPaper graph:"
    text: str = "\nTitle: {title}\nWhich category does this paper belong to?"
    answer_cue: str = "Category:"
    max_title_words: int = 16


class NodePrompts:
    """Token ids of the node-classification prompts for one tokenizer and class list.

    The answer to a prompt is ``" " + class_word``. A class is scored by the logit of its first
    token after the tokens that all answers share (the answer cue, which may merge with the space),
    so those first tokens must differ.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        class_words: list[str],
        graph_token_id: int,
        num_graph_tokens: int = 5,
        template: PromptTemplate = PromptTemplate(),
    ):
        self.tokenizer = tokenizer
        self.class_words = list(class_words)
        self.graph_token_id = graph_token_id
        self.num_graph_tokens = num_graph_tokens
        self.template = template
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
            )
            self.head, self.tail = rendered.split(_MARKER)
            self.tail += template.answer_cue
        else:
            self.head, self.tail = "", "\n" + template.answer_cue
        instruction = template.instruction.format(classes=", ".join(self.class_words))
        self._prefix = {
            True: tokenizer.encode(self.head + instruction + template.graph_line),
            False: tokenizer.encode(self.head + instruction),
        }
        answers = [tokenizer.encode(self.tail + " " + w, add_special_tokens=False) for w in self.class_words]
        cue_length = len(tokenizer.encode(self.tail, add_special_tokens=False))
        shared = 0
        while shared < cue_length and all(len(a) > shared + 1 and a[shared] == answers[0][shared] for a in answers):
            shared += 1
        self._answer_context = answers[0][:shared]
        first = [a[shared] for a in answers]
        if len(set(first)) != len(first):
            pieces = {w: tokenizer.convert_ids_to_tokens([t])[0] for w, t in zip(self.class_words, first)}
            raise ValueError(
                f"class words must start with different tokens to be scored by one logit; got {pieces}. "
                "Reword the classes (class_words) so their first tokens differ."
            )
        self.answer_ids = torch.tensor(first)
        candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, graph_token_id + 1)
        self.pad_id = next(t for t in candidates if t is not None and t != graph_token_id)
        for with_graph in (True, False):
            if graph_token_id in self._prefix[with_graph]:
                raise ValueError(
                    f"the graph placeholder id {graph_token_id} occurs in the prompt text; "
                    "pass a graph_token_id that the tokenizer never produces for it"
                )

    def prefix_ids(self, with_graph: bool = True) -> list[int]:
        """The shared beginning of every prompt (ends just before the graph tokens)."""
        return list(self._prefix[with_graph])

    def suffix_ids(self, title: str, with_graph: bool = True) -> list[int]:
        """The per-node rest: K placeholders (with_graph), the title, the question and the answer cue."""
        title = " ".join(title.split()[: self.template.max_title_words])
        text = self.tokenizer.encode(self.template.text.format(title=title), add_special_tokens=False)
        return ([self.graph_token_id] * self.num_graph_tokens if with_graph else []) + text + self._answer_context

    def batch(self, titles: list[str], with_graph: bool = True) -> dict[str, Tensor]:
        """Full prompts, right-padded: ``input_ids`` and ``attention_mask`` Long[b, seq]."""
        rows = [self.prefix_ids(with_graph) + self.suffix_ids(t, with_graph) for t in titles]
        return _right_pad(rows, self.pad_id)


def _right_pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def suffix_embeddings(
    model: TeaGLM, prompts: NodePrompts, titles: list[str], node_repr: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Input embeddings of the prompts' suffixes, graph tokens spliced in when ``node_repr``
    Float[b, gnn.out_dim] is given: ``(embeds Float[b, s, d], lengths Long[b])``."""
    with_graph = node_repr is not None
    padded = _right_pad([prompts.suffix_ids(t, with_graph) for t in titles], prompts.pad_id)
    device = model.projector.weight.device
    ids = padded["input_ids"].to(device)
    embeds = model.lm.get_input_embeddings()(ids)
    if with_graph:
        mask = ids == prompts.graph_token_id
        embeds = embeds.masked_scatter(mask[..., None], model.graph_tokens(node_repr.to(device)).to(embeds.dtype))
    return embeds, padded["attention_mask"].sum(1)


@dataclass(frozen=True)
class ProjectorTrainConfig:
    """Projector training: Adam on the first-answer-token cross-entropy, LM and GNN frozen.

    ``match_embedding_norm`` rescales the projector's initial weights so that the graph tokens'
    mean norm equals that of the LM's token embeddings (a default ``nn.Linear`` init gives soft
    tokens several times larger, which the frozen LM reads as noise).
    """

    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    match_embedding_norm: bool = True
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25

    def to_dict(self) -> dict:
        return asdict(self)


def train_projector(
    model: TeaGLM,
    prompts: NodePrompts,
    node_repr: Tensor,
    titles: list[str],
    labels: Tensor,
    train_idx: Tensor,
    config: ProjectorTrainConfig,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model.projector`` on the nodes ``train_idx``; returns the loss per step (nats).

    Args:
        node_repr: Float[n_nodes, gnn.out_dim], the frozen GNN's output for every node.
        titles: node titles; labels: Long[n_nodes] class indices (into ``prompts.class_words``).
        checkpoint: a file to save to every ``checkpoint_every`` steps (atomically) and to resume
            from (:class:`~mmlens.training.loop.Checkpoint`; refused when the config differs in
            more than ``steps``/``checkpoint_every``); a resumed run ends with the same weights as
            an uninterrupted one.
    """
    runner = PrefixRunner(model.lm, prompts.prefix_ids(True))
    answer_ids = prompts.answer_ids.to(node_repr.device)
    if config.match_embedding_norm:  # a resumed run then loads its projector over this
        with torch.no_grad():
            target = model.lm.get_input_embeddings().weight.norm(dim=-1).mean()
            current = model.graph_tokens(node_repr[train_idx[:256]]).norm(dim=-1).mean()
            model.projector.weight.mul_(target / current)
            model.projector.bias.mul_(target / current)

    def step(rows: Tensor, index: int) -> Tensor:
        pick = train_idx[rows]
        embeds, lengths = suffix_embeddings(model, prompts, [titles[i] for i in pick.tolist()], node_repr[pick])
        logits = runner.answer_logits(embeds, lengths)
        return F.cross_entropy(logits.float(), answer_ids[labels[pick].to(answer_ids.device)])

    saved = (
        None
        if checkpoint is None
        else Checkpoint(
            checkpoint,
            {"projector": model.projector},
            every=config.checkpoint_every,
            identity={k: v for k, v in config.to_dict().items() if k not in ("steps", "checkpoint_every")},
        )
    )
    model.projector.train()
    order = RowOrder(len(train_idx), config.batch_size, torch.Generator().manual_seed(config.seed), replacement=True)
    result = fit(
        step,
        model.projector.parameters(),
        steps=config.steps,
        lr=config.lr,
        weight_decay=config.weight_decay,
        order=order,
        checkpoint=saved,
        progress=progress,
        desc="projector",
    )
    model.projector.eval()
    return result.history["loss"]


@torch.no_grad()
def classify_nodes(
    model: TeaGLM,
    prompts: NodePrompts,
    node_repr: Tensor | None,
    titles: list[str],
    nodes: Tensor,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "classify",
) -> Tensor:
    """Class scores Float[len(nodes), n_classes] (log-softmax over the classes' first-token logits)
    for the prompts of ``nodes``; ``node_repr=None`` gives the text-only baseline."""
    with_graph = node_repr is not None
    runner = PrefixRunner(model.lm, prompts.prefix_ids(with_graph))
    answer_ids = prompts.answer_ids.to(model.projector.weight.device)
    scores = []
    for start in tqdm(range(0, len(nodes), batch_size), desc=desc, disable=not progress):
        chunk = nodes[start : start + batch_size]
        embeds, lengths = suffix_embeddings(
            model, prompts, [titles[i] for i in chunk.tolist()], node_repr[chunk] if with_graph else None
        )
        scores.append(runner.answer_logits(embeds, lengths)[:, answer_ids].float().log_softmax(-1).cpu())
    return torch.cat(scores)
