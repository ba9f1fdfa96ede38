"""The pass manager: order validation, check mode, errors and the report."""

from __future__ import annotations

import pytest

from passes import Cleanup
from qgraph import Graph, Pass, PassManager, PassResult
from qgraph.errors import GraphCheckError, PassError, PassOrderError

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
