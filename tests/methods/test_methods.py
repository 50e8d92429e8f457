"""The attribution-method interface: dispatch by name, what an absent method costs, clean detach."""

from __future__ import annotations

import logging

import pytest
import torch

from daamkit import AggregationConfig, Trace, TraceError, UnsupportedPipelineError, trace
from daamkit.errors import InputError
from daamkit.methods import METHODS, AttributionMethod, ConceptMethod, DaamMethod
from daamkit.testing.pipelines import tiny_sd

CONCEPTS = ["dog", "tree", "sky"]


def run(pipe, prompt="a red dog on a bench", **kw):
    if hasattr(pipe, "transformer"):
        kw.setdefault("max_sequence_length", 16)
    return pipe(prompt, num_inference_steps=2, height=32, width=48,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def pipe_hooks(pipe):
    mods = [pipe.transformer] + [getattr(pipe, e) for e in ("text_encoder", "text_encoder_2", "text_encoder_3")
                                 if getattr(pipe, e, None) is not None]
    return [hook_count(m) for m in mods]


def test_registry_and_interface_are_exported():
    assert METHODS["daam"] is DaamMethod and METHODS["concept"] is ConceptMethod
    assert all(issubclass(cls, AttributionMethod) and cls.name == name for name, cls in METHODS.items())
    assert "cross" in DaamMethod.aliases
    with pytest.raises(TypeError):
        AttributionMethod()  # abstract: heat_maps must be implemented


def test_dispatch_by_name_and_alias(sd3):
    with trace(sd3, concepts=CONCEPTS) as tc:
        run(sd3)
        assert tc.method_names == ["daam", "concept"]
        assert tc.method("cross") is tc.method("daam")
        default, daam, cross = tc.heat_maps(0), tc.heat_maps(0, method="daam"), tc.heat_maps(0, method="cross")
        concept = tc.heat_maps(0, method="concept")
    torch.testing.assert_close(default.maps, daam.maps, rtol=0, atol=0)
    torch.testing.assert_close(cross.maps, daam.maps, rtol=0, atol=0)
    assert daam.words == cross.words and "dog" in daam.words
    assert concept.meta["method"] == "concept" and concept.words == CONCEPTS


def test_unknown_method_lists_the_available_ones(sd3):
    with trace(sd3, concepts=CONCEPTS) as tc:
        run(sd3)
        with pytest.raises(InputError, match="unknown attribution method 'nonexistent'") as err:
            tc.heat_maps(0, method="nonexistent")
    assert all(repr(n) in str(err.value) for n in ("daam", "cross", "concept"))
    with trace(sd3) as tc:
        run(sd3)
        with pytest.raises(ValueError) as err:  # InputError is a ValueError
            tc.heat_maps(0, method="nonexistent")
        assert "'daam'" in str(err.value) and "concept" not in str(err.value)
        with pytest.raises(TraceError, match=r"concepts=\[\.\.\.\]"):  # known, but not asked for
            tc.heat_maps(0, method="concept")


def test_a_trace_without_concepts_installs_no_concept_hooks(sd3):
    before = hook_count(sd3.transformer)
    with trace(sd3) as tc:
        plain = hook_count(sd3.transformer) - before
        assert plain == len(tc.capture.hooks.handles)  # the family capture's hooks and nothing else
        assert "concept" not in tc.method_names and tc._concept_capture is None
        assert all(not m.hooks.handles for m in tc._methods.values())
    with trace(sd3, concepts=CONCEPTS) as tc:
        with_concepts = hook_count(sd3.transformer) - before
        concept = tc.method("concept")
        # one pre-hook on the transformer, five per joint block (block pre/post, to_k, to_v, to_out)
        assert with_concepts - plain == len(concept.hooks.handles) == 1 + 5 * len(sd3.transformer.transformer_blocks)
    assert hook_count(sd3.transformer) == before


@pytest.mark.parametrize("failing", [DaamMethod, ConceptMethod])
def test_every_hook_comes_off_when_a_method_detach_raises(sd3, monkeypatch, failing):
    ref = run(sd3)
    before = pipe_hooks(sd3)  # after a first run: transformers may add hooks of its own on first use
    handlers = list(logging.getLogger("diffusers").handlers)

    def broken_detach(self):
        raise RuntimeError(f"{self.name} detach failed")

    monkeypatch.setattr(failing, "detach", broken_detach)
    with pytest.raises(RuntimeError, match="detach failed"):
        with trace(sd3, concepts=CONCEPTS) as tc:
            run(sd3)
    assert pipe_hooks(sd3) == before
    assert logging.getLogger("diffusers").handlers == handlers
    assert not tc._active
    monkeypatch.undo()
    with trace(sd3) as tc:  # the pipeline can be traced again and is unchanged
        out = run(sd3)
        tc.heat_maps(0)
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=0, atol=0)


class _Counting(AttributionMethod):
    """A sibling method as a new one would be written: it consumes the cross-attention stream."""

    name = "counting"
    captures = frozenset({"cross_attention"})

    def __init__(self):
        super().__init__()
        self.generations, self.calls, self.attached = 0, 0, False

    def attach(self, trace):
        self.attached = True

    def start_generation(self, trace):
        self.generations += 1
        self.calls = 0

    def on_attention(self, trace, layer, probs, branch):
        assert probs.dim() == 4 and branch in ("cond", "negative")
        self.calls += 1

    def heat_maps(self, trace, i, **options):
        return trace.heat_maps(i, method="daam", **{k: v for k, v in options.items() if k != "method"})


def test_a_new_method_receives_the_same_callbacks(clip_tokenizer_dir):
    pipe = tiny_sd(clip_tokenizer_dir)
    method = _Counting()
    with Trace(pipe, AggregationConfig(), methods=[method]) as tc:
        run(pipe)
        run(pipe)
        assert method.attached and method.generations == 2
        assert method.calls == 2 * len(tc.layers)  # every layer, both steps, cond branch only
        torch.testing.assert_close(tc.heat_maps(0, method="counting").maps, tc.heat_maps(0).maps)


def test_methods_declare_what_they_need(sd3, clip_tokenizer_dir):
    class Unknown(_Counting):
        name = "unknown"
        captures = frozenset({"self_attention"})

    class JointOnly(_Counting):
        name = "joint-only"
        families = ("sd3", "flux")
        requirement = "joint-only maps need a joint-attention transformer"

    with pytest.raises(InputError, match="self_attention"):
        Trace(sd3, AggregationConfig(), methods=[Unknown()])
    with pytest.raises(UnsupportedPipelineError, match="joint-only maps need"):
        Trace(tiny_sd(clip_tokenizer_dir), AggregationConfig(), methods=[JointOnly()])
    with pytest.raises(InputError, match="already belong"):
        Trace(sd3, AggregationConfig(), methods=[DaamMethod()])

    class Shadowing(_Counting):
        name = "shadowing"
        aliases = ("cross",)

    with pytest.raises(InputError, match=r"\['cross'\] already belong"):
        Trace(sd3, AggregationConfig(), methods=[Shadowing()])


def test_readme_method_table_names_the_families_each_method_accepts():
    """README's "Which method runs on which family" table against the methods' own ``families``."""
    import re
    from pathlib import Path

    from daamkit.methods.concept import ConceptMethod
    from daamkit.methods.ovam import OvamMethod
    from daamkit.methods.refined import RefinedMethod
    from daamkit.methods.relations import ImageRelationMethod, TextRelationMethod

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| method | families |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        method, families = (cell.strip() for cell in line.strip("|").split("|"))
        # a cell names families as words; parentheses only explain them
        rows[method] = set(re.findall(r"[a-z0-9_]+", re.sub(r"\(.*?\)", "", families)))
    expected = {
        "`ovam`": OvamMethod,
        "`concept`": ConceptMethod,
        "`refined`": RefinedMethod,
        "relation `image->image`": ImageRelationMethod,
        "relation `text->text`": TextRelationMethod,
    }
    for method, cls in expected.items():
        assert rows.get(method) == set(cls.families), (method, rows.get(method), cls.families)
