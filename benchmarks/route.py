"""The route a TrainConfig takes through esm2lite: which modules a run enters, and how often a call
goes against the import graph or back into a module that is still waiting further down the stack.

    python benchmarks/route.py                 # a tiny LoRA run, then a --resume of it
    results: benchmarks/results/route_cpu.json (before and after the persistence redesign)
    python benchmarks/route.py --mode full --json route.json

Every Python call between two esm2lite modules during `train_model` is traced (sys.setprofile);
the caller is the nearest esm2lite frame below the callee, so torch frames in between are skipped.

    modules entered   esm2lite modules with code run during train_model
    calls             cross-module call events (caller module != callee module), and distinct call
                      sites (caller function -> callee function)
    route             the call sites in the order they first run, as a path of modules (A B A C ...):
                      its steps, how many go up the import graph (into a module that imports the one
                      left), and how many return to a module the path had left (all; and those other
                      than the training loop's own module, which every call returns to)
    climbs            calls into a module the caller does not import, directly or transitively, at
                      module level: callbacks, lazy imports, reaching back up the import graph
    mutual pairs      two modules that call each other (A -> B and B -> A)
    re-entries        calls into a module that is already on the stack below the caller (A -> B -> A):
                      the route returns to a module it had left
    import cycles     strongly connected sets in the import graph, counting imports inside functions

Run it from any checkout: it measures the esm2lite that Python imports (PYTHONPATH=. for a copy).
"""

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def import_graph(package_dir: Path, kernels_dir: Path | None) -> tuple[dict, dict]:
    """-> ({module: modules it imports at module level}, {module: modules it imports anywhere})."""
    files = {".".join(("esm2lite", *p.relative_to(package_dir).with_suffix("").parts)): p
             for p in package_dir.rglob("*.py") if "kernels" not in p.relative_to(package_dir).parts}
    if kernels_dir is not None:
        files.update({f"esm2lite.kernels.{p.stem}": p for p in kernels_dir.glob("*.py")})
        files["esm2lite.kernels"] = kernels_dir / "__init__.py"
    files = {(m[: -len(".__init__")] if m.endswith(".__init__") else m): p for m, p in files.items()}
    top, anywhere = {}, {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        top[module], anywhere[module] = set(), set()
        for node in ast.walk(tree):
            for name in _imported(node, package):
                target = next((m for m in (name, name.rpartition(".")[0]) if m in files and m != module), None)
                if target:
                    anywhere[module].add(target)
                    if node in tree.body:
                        top[module].add(target)
    return top, anywhere


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(node, package: str) -> list[str]:
    """Dotted names an import statement may bind: "from .x import y" -> esm2lite.x.y (a module,
    or a name in esm2lite.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [f"{_resolve(node, package)}.{a.name}" for a in node.names]
    return []


def closure(graph: dict) -> dict:
    out = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        out[start] = seen
    return out


def cycles(graph: dict) -> list[list[str]]:
    reach = closure(graph)
    groups = {frozenset([m] + [n for n in reach[m] if m in reach.get(n, ())]) for m in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


class Tracer:
    """Every call between two esm2lite modules; the caller is the nearest esm2lite frame below."""

    def __init__(self, imports: dict):
        self.reach = closure(imports)
        self.calls, self.sites, self.climbs, self.reentries = Counter(), Counter(), Counter(), Counter()
        self.entered, self.route, self.seen = set(), [], set()

    @staticmethod
    def module(frame) -> str | None:
        name = frame.f_globals.get("__name__", "")
        return name if name == "esm2lite" or name.startswith("esm2lite.") else None

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        callee = self.module(frame)
        if callee is None:
            return
        self.entered.add(callee)
        stack, f = [], frame.f_back
        while f is not None:
            m = self.module(f)
            if m is not None:
                stack.append((m, f))
            f = f.f_back
        if not stack or stack[0][0] == callee:
            return
        caller, caller_frame = stack[0]
        site = (f"{caller}:{caller_frame.f_code.co_name}", f"{callee}:{frame.f_code.co_name}")
        self.calls[(caller, callee)] += 1
        self.sites[site] += 1
        if callee not in self.reach.get(caller, ()):
            self.climbs[site] += 1
        if any(m == callee for m, _ in stack[1:]):
            self.reentries[site] += 1
        if site not in self.seen:  # the route: call sites in the order they first run
            self.seen.add(site)
            for m in (caller, callee):
                if not self.route or self.route[-1] != m:
                    self.route.append(m)

    def report(self) -> dict:
        route = self.route
        ups = sum(1 for a, b in zip(route, route[1:]) if a in self.reach.get(b, ()))
        back = [m for i, m in enumerate(route) if m in route[: max(0, i - 1)]]
        return {"route": {"modules": len(set(route)), "steps": len(route) - 1, "climbs_up": ups,
                          "returns_to_a_module_left": len(back),
                          "returns_to_a_module_left_other_than_the_loop": sum(m != route[0] for m in back), "path": " ".join(m.split(".")[-1] for m in route)},
                "modules_entered": sorted(self.entered),
                "cross_module_calls": sum(self.calls.values()), "call_sites": len(self.sites),
                "mutual_pairs": sorted(f"{a} <-> {b}" for a, b in self.calls if a < b and (b, a) in self.calls),
                "climb_calls": sum(self.climbs.values()), "climb_sites": sorted(" -> ".join(s) for s in self.climbs),
                "reentry_calls": sum(self.reentries.values()),
                "reentry_sites": sorted(" -> ".join(s) for s in self.reentries)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="lora", choices=["lora", "full", "head"])
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    import esm2lite

    package = Path(esm2lite.__file__).parent
    kernels = package / "kernels" if (package / "kernels").is_dir() else package.parent / "kernels"
    top, anywhere = import_graph(package, kernels if kernels.is_dir() else None)
    report = {"esm2lite": str(package), "modules": len(top),
              "import_cycles_module_level": cycles(top), "import_cycles_any_level": cycles(anywhere)}
    with tempfile.TemporaryDirectory() as out:
        report["runs"] = run_both(args.mode, out, top)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def run_both(mode: str, out: str, imports: dict) -> dict:
    """A 6-step run ("fresh"); then, as if it had been killed after step 4 (step_6 and the summary
    removed), --resume to the end ("resume")."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import oracles
    import torch
    from esm2lite.training.loop import TrainConfig, train_model

    try:
        from esm2lite.data.records import records_from_pairs
    except ImportError:
        from esm2lite.data import records_from_pairs
    torch.set_num_threads(1)
    hf = oracles.make_hf_checkpoint(Path(out) / "hf", **oracles.TINY, seed=1)
    seqs = oracles.random_sequences(24, 10, 40, seed=0, with_mask=False)
    records = {"train": records_from_pairs([(s, len(s) / 40) for s in seqs[:16]]),
               "valid": records_from_pairs([(s, len(s) / 40) for s in seqs[16:]])}
    cfg = dict(checkpoint=hf, out=os.path.join(out, "run"), mode=mode, steps=6, batch_tokens=300, eval_every=2,
               save_every=2, log_every=1, seed=0)
    results = {}
    for name, resume in (("fresh", False), ("resume", True)):
        config = TrainConfig(**cfg)
        tracer = Tracer(imports)
        sys.setprofile(tracer)
        try:
            train_model(config, records=records, resume=resume)
        finally:
            sys.setprofile(None)
        results[name] = tracer.report()
        if name == "fresh":  # as if killed after step 4: keep step_4, drop what came later
            run = Path(cfg["out"])
            shutil.rmtree(run / "checkpoints" / "step_6")
            (run / "summary.json").unlink()
    return results


if __name__ == "__main__":
    main()
