"""Issue 21 item 2: the layers below the benchmark tool never import it (methods, hooks, models, kernels, the
selection rules); the analytic FLOPs accounting methods report lives in vtoolkit/models/flops.py."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BELOW_BENCH = ["vtoolkit/methods", "vtoolkit/hooks", "vtoolkit/models", "vtoolkit/kernels", "vtoolkit_core"]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_methods_do_not_import_bench():
    offenders = []
    for folder in BELOW_BENCH:
        for path in sorted((REPO / folder).rglob("*.py")):
            bad = sorted(m for m in _imports(path) if m == "vtoolkit.bench" or m.startswith("vtoolkit.bench."))
            if bad:
                offenders.append(f"{path.relative_to(REPO)}: {', '.join(bad)}")
    assert not offenders, "imports of vtoolkit.bench below it: " + "; ".join(offenders)


def test_bench_flops_is_the_shared_module():
    from vtoolkit.bench import flops as bench_flops
    from vtoolkit.models import flops

    assert bench_flops.llm_layer_flops is flops.llm_layer_flops and bench_flops.Shape is flops.Shape
