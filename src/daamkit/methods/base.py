"""The interface every attribution method implements: one class per way of turning what a traced
pipeline computed into per-word maps.

A :class:`~daamkit.trace.Trace` does the pipeline-level bookkeeping once, for all its methods: the
family capture's denoiser pre-hook (which step runs, which batch rows are the conditional / negative
branch, Flux's separate negative call), the token ids the text encoders saw and diffusers'
truncation warning. A method adds only what it needs on top of that and builds a
:class:`~daamkit.heatmap.GlobalHeatMap` from it. Methods that a trace was not asked for are not
constructed, so they install no hooks and hold no memory.

Lifecycle, driven by the Trace (a method never calls these on itself):

1. ``__init__(...)``: the method's own options, validated here (raise ``ValueError``/``InputError``).
   The trace checks ``families`` right after and raises ``UnsupportedPipelineError`` with
   ``requirement`` when the pipeline's family is not served.
2. ``attach(trace)`` on ``__enter__``, before the family capture's hooks go in: install the method's
   own hooks, putting every handle into ``self.hooks``.
3. ``start_generation(trace)`` each time a pipeline call starts (``trace.generation`` is the new
   one): reset per-generation state such as running sums.
4. While the denoiser runs: ``on_attention(trace, layer, probs, branch)`` for every text-image
   attention call of a selected step, if ``"cross_attention"`` is in ``captures``.
5. ``heat_maps(trace, i, **options)`` when the user asks ``tc.heat_maps(i, method=name)``.
6. ``detach()`` on ``__exit__``, also after an exception. Whatever ``detach`` does or raises, the
   trace then removes everything in ``self.hooks``, so a method's hooks never outlive its trace.

What a method consumes is declared in ``captures``. ``"cross_attention"`` is what the family capture
already computes (softmax of image queries x text keys, per layer and branch) and is routed to
``on_attention``; any other need (a side stream, self-attention probabilities, the queries
themselves) is met by the method's own hooks in ``attach``, reading ``trace.capture.denoiser`` and
asking ``trace.branch_rows(batch)`` which rows to use. Should several methods come to share such a
need, it belongs in the family capture as a further stream name with its own callback here.

Adding a method in one file, ``methods/mine.py``::

    class MyMethod(AttributionMethod):  # docstring: what the maps mean, where they come from
        name = "mine"
        captures = frozenset({"cross_attention"})

        def start_generation(self, trace): self.sum = None
        def on_attention(self, trace, layer, probs, branch): ...   # fold probs into self.sum
        def heat_maps(self, trace, i, **options): ...               # -> GlobalHeatMap

then list it in ``METHODS`` (``methods/__init__.py``) and hand an instance to the trace
(``Trace(pipe, config, methods=[MyMethod(...)])``, or a ``trace()`` keyword that builds it);
``tc.heat_maps(i, method="mine")`` dispatches to it. Methods live below ``trace.py``: they may use
the trace object they are given but never import ``daamkit.trace`` at run time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from daamkit.capture.base import HookSet, ImageQueries, LayerInfo, QueryChunk

if TYPE_CHECKING:
    from daamkit.capture.sdpa import JointCall
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace

#: Streams the family capture can route to a method (see ``AttributionMethod.captures``).
#: ``"joint_attention"``: the q and k of every joint (text + image) attention call of a traced layer at
#: a selected step, routed to ``on_joint_attention(trace, layer, call)`` (a
#: :class:`~daamkit.capture.sdpa.JointCall`); only joint-attention transformers make such calls.
#: ``"image_queries"``: the generated image's queries of every text-image attention call of a traced layer
#: at a selected step, as the model attended with them, routed to ``on_image_queries(trace, layer,
#: queries)`` (an :class:`~daamkit.capture.base.ImageQueries`), for methods that bring keys of their own.
CAPTURE_STREAMS = frozenset({"cross_attention", "joint_attention", "image_queries"})


class AttributionMethod(ABC):
    """One attribution method on one trace; see the module docstring for the lifecycle."""

    #: The name users pass as ``tc.heat_maps(i, method=name)``.
    name: ClassVar[str]
    #: Other names accepted for this method (kept for existing callers).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Which of ``CAPTURE_STREAMS`` the trace should route to this method.
    captures: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``on_attention`` takes a call's image queries in chunks (``chunk``); the trace chunks
    #: large calls (videos) only when every attention method does.
    chunks: ClassVar[bool] = False
    #: Model families (``trace.capture.family``) the method works on; None: all of them.
    families: ClassVar[tuple[str, ...] | None] = None
    #: What the method needs, said when the pipeline's family is not in ``families``.
    requirement: ClassVar[str] = ""
    #: Said when ``method=name`` is asked of a trace that was not given this method.
    not_enabled: ClassVar[str] = ""

    def __init__(self) -> None:
        self.hooks = HookSet()

    @classmethod
    def for_images(cls, words: Sequence[Sequence[str]]) -> AttributionMethod:
        """An instance for one pipeline call whose image ``i`` is about ``words[i]`` (an evaluation's
        scene nouns and colours, say); methods that map words given to them rather than the prompt's
        own (OVAM, concepts) take these. The default is ``cls()``: a method with required options
        overrides this to say how it is built for such a comparison."""
        return cls()

    def attach(self, trace: Trace) -> None:  # noqa: B027 - optional: most methods need no hooks of their own
        """Install this method's own hooks (handles into ``self.hooks``)."""

    def detach(self) -> None:
        """Remove this method's hooks; the trace removes ``self.hooks`` afterwards in any case."""
        self.hooks.remove()

    def start_generation(self, trace: Trace) -> None:  # noqa: B027 - optional for stateless methods
        """A new pipeline call started (``trace.generation``): reset per-generation state."""

    def wants(self, trace: Trace, layer: LayerInfo, image_tokens: int) -> bool:
        """Whether ``on_attention`` (``on_image_queries``) would use ``layer``'s probabilities (queries) at
        the current step (its image sequence has ``image_tokens`` positions per frame). A method that
        selects layers says no to the others, and the capture then skips them unless another method
        wants them."""
        return True

    def on_attention(  # noqa: B027
        self, trace: Trace, layer: LayerInfo, probs: torch.Tensor, branch: str, chunk: QueryChunk | None = None
    ) -> None:
        """probs: (B, heads, N image queries, T text keys) of ``layer`` for the images of ``branch``,
        at step ``trace.generation.step``; only called when ``"cross_attention"`` is in ``captures``.
        A video's queries are frame-major; ``chunk`` (only for methods with ``chunks``) says which
        of them ``probs`` holds."""

    def on_joint_attention(self, trace: Trace, layer: LayerInfo, call: JointCall) -> None:  # noqa: B027
        """One joint attention call's q and k (only when ``"joint_attention"`` is in ``captures``)."""

    def on_image_queries(self, trace: Trace, layer: LayerInfo, queries: ImageQueries) -> None:  # noqa: B027
        """One call's image queries for one branch (only when ``"image_queries"`` is in ``captures``)."""

    @abstractmethod
    def heat_maps(self, trace: Trace, i: int, **options: Any) -> GlobalHeatMap:
        """The maps of image ``i`` of the latest generation. ``options`` are the keyword arguments of
        :meth:`Trace.heat_maps` (``prompt``, ``branch``, ``steps``, ``layers``, ``heads``); a method
        ignores those that have no meaning for it."""


def jsonable(obj: Any) -> Any:
    """Options as JSON-safe values for a heat map's ``meta`` (tuples and ranges become lists)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, range, set)):
        return [jsonable(v) for v in obj]
    return obj
