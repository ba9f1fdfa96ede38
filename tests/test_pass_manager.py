"""The pass manager (order validation, check mode, errors, the report) and the declared pipeline's facts and order."""

from __future__ import annotations

from pathlib import Path

import pytest

from passes import ALL_PASSES, Cleanup
from qgraph import Graph, Pass, PassManager, PassResult
from qgraph.compile import compile_model
from qgraph.errors import GraphCheckError, PassError, PassOrderError
from qgraph.pipeline.facts import DECODE_ATTENTION_FUSED, FACTS, KV_RETAINED, NO_DEAD_NODES, STATIC_SHAPES, observe
from qgraph.pipeline.manager import validate_order
from qgraph.pipeline.optimize import optimize
from qgraph.pipeline.options import DEFAULT_PREFILL_SEQ_LEN, Options
from qgraph.pipeline.registry import build_passes
from qgraph.pipeline.stages import PIN, REWRITE, SLOTS, compile_pipeline, default_pipeline
from qgraph.targets import TARGETS, get_target
from qgraph.targets.cpu import CpuTarget

TEXT = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    a = Relu (x)
    dead = Neg (x)
    y = Abs (a)
}
"""


class Produce(Pass):
    name = "produce-fact"
    produces = ("fact_a",)

    def run(self, graph: Graph) -> PassResult:
        return PassResult(graph, False)


class Consume(Pass):
    name = "consume-fact"
    requires = ("fact_a",)

    def run(self, graph: Graph) -> PassResult:
        return PassResult(graph, False, {"seen": 1})


class NegateRelu(Pass):
    """A correct rewrite: Relu(x) -> Neg(Neg(Relu(x))) (adds two nodes)."""

    name = "negate-relu"

    def run(self, graph: Graph) -> PassResult:
        n = 0
        for relu in graph.nodes_by_op("Relu"):
            out = relu.outputs[0]
            neg1 = graph.add_node("Neg", [out], prefix=self.name, after=relu)
            neg2 = graph.add_node("Neg", [neg1.outputs[0]], prefix=self.name, after=neg1)
            for consumer in list(out.outputs):
                if consumer not in (neg1,):
                    consumer.inputs[consumer.inputs.index(out)] = neg2.outputs[0]
            n += 1
        return PassResult(graph, n > 0, {"relu": n})


class BreakOrder(Pass):
    """A broken rewrite: it leaves the nodes out of topological order."""

    name = "break-order"

    def run(self, graph: Graph) -> PassResult:
        graph.gs.nodes.reverse()
        return PassResult(graph, True)


class Crash(Pass):
    name = "crash"

    def run(self, graph: Graph) -> PassResult:
        raise ValueError("boom")


def test_order_is_validated_before_anything_runs() -> None:
    ran = []

    class Spy(Pass):
        name = "spy"

        def run(self, graph: Graph) -> PassResult:
            ran.append(1)
            return PassResult(graph, False)

    with pytest.raises(PassOrderError, match=r"'consume-fact' requires 'fact_a' \(produced by produce-fact, which must come first\)"):
        PassManager([Spy(), Consume(), Produce()]).run(Graph.parse(TEXT))
    assert ran == []
    with pytest.raises(PassOrderError, match="no pass in the pipeline produces it"):
        PassManager([Consume()]).validate()
    PassManager([Consume()], initial_facts=["fact_a"]).validate()
    PassManager([Produce(), Consume()]).validate()


def test_report_records_counts_stats_and_prints_a_table() -> None:
    graph, report = PassManager([NegateRelu(), Cleanup(), Produce()], check=True).run(Graph.parse(TEXT))
    r = report["negate-relu"]
    assert (r.modified, r.stats, r.nodes_before, r.nodes_after, r.checked) == (True, {"relu": 1}, 3, 5, True)
    c = report["cleanup"]
    assert (c.modified, c.stats, c.nodes_after) == (True, {"removed": 1}, 4)
    assert report["produce-fact"].modified is False
    assert all(rec.seconds >= 0 for rec in report.records)
    table = report.table()
    assert "negate-relu" in table and "3 -> 5" in table and "relu=1" in table and "removed=1" in table
    assert table.splitlines()[0].split() == ["#", "pass", "changed", "nodes", "time", "ms", "stats"]
    assert '"nodes_after": 5' in report.to_json()
    assert graph.op_counts() == {"Relu": 1, "Neg": 2, "Abs": 1}


def test_check_mode_names_the_pass_that_broke_the_graph() -> None:
    with pytest.raises(GraphCheckError, match=r"after pass 'break-order': .*before it is produced"):
        PassManager([NegateRelu(), BreakOrder(), Cleanup()], check=True).run(Graph.parse(TEXT))
    # Without check mode the same pipeline runs (cleanup re-sorts the graph).
    graph, _ = PassManager([NegateRelu(), BreakOrder(), Cleanup()]).run(Graph.parse(TEXT))
    graph.check()


def test_a_crashing_pass_is_named_with_what_ran_before() -> None:
    with pytest.raises(PassError, match=r"pass 'crash' failed: ValueError: boom \(passes run before it: negate-relu\)"):
        PassManager([NegateRelu(), Crash()]).run(Graph.parse(TEXT))


def test_cleanup_is_a_no_op_on_a_clean_graph() -> None:
    graph, _ = PassManager([Cleanup()]).run(Graph.parse(TEXT))
    _, report = PassManager([Cleanup()]).run(graph)
    assert report["cleanup"].modified is False and report["cleanup"].stats == {}


# ----------------------------------------------------------------------------- the declared pipeline and its facts

RAW = Path(__file__).parent / "data" / "optimum-gpt2-2l" / "model.onnx"


def test_every_pass_declares_its_facts_from_the_vocabulary() -> None:
    for name, cls in ALL_PASSES.items():
        assert cls.produces, f"{name} declares nothing it produces"
        for kind in ("requires", "produces", "invalidates"):
            unknown = set(getattr(cls, kind)) - FACTS
            assert not unknown, f"{name}.{kind} names {sorted(unknown)}, which qgraph/pipeline/facts.py does not define"


@pytest.mark.parametrize("target", TARGETS)
def test_every_declared_pipeline_is_in_a_valid_order(target: str) -> None:
    opts = Options.resolve(seq_len=DEFAULT_PREFILL_SEQ_LEN)
    for pinned in (False, True):
        validate_order(build_passes(default_pipeline(pinned), opts))
    impl = get_target(target)
    rewrite, specialize = compile_pipeline(impl, rewrite=True)
    assert rewrite == list(REWRITE) and set(specialize) >= set(PIN)
    validate_order(build_passes([*rewrite, *specialize], opts))  # from a raw export
    _, specialize = compile_pipeline(impl, rewrite=False)
    validate_order(build_passes(specialize, opts), {KV_RETAINED})  # from an optimized graph
    assert set(impl.slots) <= {s.name for s in SLOTS}


def test_a_misordered_built_in_pipeline_is_refused_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cpu target's slots with fuse-decode-attention moved before the passes whose facts it needs.
    monkeypatch.setattr(CpuTarget, "slots", {"legalize": ("fuse-decode-attention", "fuse-attention"), "final": ()})
    ran: list[str] = []
    monkeypatch.setattr(PassManager, "run", lambda self, graph, report=None: ran.append("run"))
    said: list[str] = []
    with pytest.raises(PassOrderError) as e:
        compile_model(RAW, "cpu", tmp_path / "art", prefill_seq_len=4, ctx_len=32, progress=said.append)
    assert "pass #9 'fuse-decode-attention' requires 'attention_fused' (produced by fuse-attention, which must come first)" in str(e.value)
    assert "'shapes_simplified' (produced by simplify-shapes, which must come first)" in str(e.value)
    assert ran == [] and said == [] and not list(tmp_path.iterdir())


def test_a_graph_brings_the_facts_its_interface_shows() -> None:
    raw = Graph.load(RAW)
    assert observe(raw) == set()
    optimize(raw, ctx_len=16)
    assert observe(raw) == {KV_RETAINED}
    optimize(raw, ctx_len=16, batch_size=1, seq_len=1)
    assert observe(raw) == {KV_RETAINED, STATIC_SHAPES}
    # So a pass list that starts where the graph is needs no pass that made it so.
    report = optimize(raw, ["fuse-attention", "simplify-shapes", "fuse-decode-attention"])
    assert report["fuse-decode-attention"].stats.get("decode_attention") == 2
    assert {KV_RETAINED, STATIC_SHAPES, DECODE_ATTENTION_FUSED} <= set(report.facts) and NO_DEAD_NODES not in report.facts
    # A raw export shows none of them.
    with pytest.raises(PassOrderError, match=r"'fuse-decode-attention' requires 'kv_retained' \(no pass in the pipeline produces it\)"):
        optimize(Graph.load(RAW), ["fuse-decode-attention"])
