"""The layout as a contract: dependencies point one way (cli -> pipeline -> bank -> dpseg),
pipeline/ has one folder per concern, and a shared helper has one definition."""

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["dpseg", "bank", "pipeline", "cli"]  # each may import only those before it


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_dependencies_point_one_way():
    wrong = []
    for i, layer in enumerate(LAYERS):
        above = set(LAYERS[i + 1 :])
        for path in sorted((ROOT / layer).rglob("*.py")):
            bad = _imports(path) & above
            if bad:
                wrong.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert wrong == []


def test_pipeline_modules_do_not_share_a_prefix_with_a_sibling():
    for folder in [ROOT / "pipeline", *(p for p in (ROOT / "pipeline").iterdir() if p.is_dir())]:
        if folder.name == "__pycache__":
            continue
        names = [p.stem for p in folder.iterdir() if p.suffix == ".py" and p.stem != "__init__"]
        names += [p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"]
        prefixes = Counter(n.split("_")[0] for n in names if "_" in n)
        shared = {p for p, count in prefixes.items() if count > 1 or p in names}
        assert not shared, (folder, sorted(shared))


def test_shared_helpers_have_one_definition():
    defined = Counter()
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef):
                    defined[node.name] += 1
                elif isinstance(node, ast.Assign):
                    defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    names = ["parse_classes", "bank_encoder_info", "resolve_device", "load_params", "git_commit", "sync"]
    assert {n: defined[n] for n in names} == dict.fromkeys(names, 1)
    assert defined["SED_REFERENCE"] == 1
