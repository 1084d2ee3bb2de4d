"""Synthetic multimodal tasks whose ground-truth modality dependence is known, and models trained on
them in-process (cached by configuration hash), for scoring explainers against the truth:

- :mod:`.tasks` / :mod:`.training`: image + text classification tasks and FusionTransformers
  (:func:`train_fusion`);
- :mod:`.graph_tasks` / :mod:`.graph_training`: graph + text tasks on stochastic-block-model
  graphs with planted communities, and a GraphSAGE + text fusion model
  (:class:`mmlens.models.graph_text.GraphTextFusion`);
- :mod:`.vlm`: a LLaVA around the real TinyStories-656K whose vision side is trained to name a
  rendered shape's colour or shape (:func:`mmlens.synthetic.vlm.train_vlm`).

The benchmark itself: ``python -m mmlens.analyses.synthetic_benchmark``."""

from .tasks import KINDS, TASKS, VOCAB, TaskData, bayes_accuracy, make_task
from .training import LEARNED_THRESHOLD, TrainedModel, train_fusion

__all__ = ["KINDS", "LEARNED_THRESHOLD", "TASKS", "TaskData", "TrainedModel", "VOCAB", "bayes_accuracy", "make_task",
           "train_fusion"]
