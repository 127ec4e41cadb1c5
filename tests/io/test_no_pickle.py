"""Nothing in the package pickles or unpickles, and nothing in tools/ unpickles: loading a pickle
runs whatever code the file names, so a checkpoint, a merger file or a cache could run commands.
Tensors are safetensors, the rest JSON (or npz without object arrays). tools/ may make a pickle
(pickle.dumps) to craft a file the package must refuse."""

import ast
import os

from support import ROOT

PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
WRITES = {  # make a pickle (tools/ may, to craft files the package must refuse)
    "pickle.dumps",
    "pickle.dump",
}
CALLS = {  # dotted name -> what it does with a pickle
    "paddle.load": "read",
    "paddle.save": "write",
    "paddle.framework.io.load": "read",
    "paddle.framework.io.save": "write",
    "paddle.static.load": "read",
    "paddle.static.save": "write",
    "torch.load": "read",
    "pd.read_pickle": "read",
    "pandas.read_pickle": "read",
}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_uses(source: str, filename: str = "<source>") -> list[tuple[str, str]]:
    """(kind, where and what) of every place in `source` that touches pickling: kind "import" (of a
    pickling module), "write" (makes a pickle: pickle.dumps, paddle.save), "read" (loads one:
    pickle.loads, paddle.load, np.load(allow_pickle=...), ...) or "use" (any other reference)."""
    found = []
    tree = ast.parse(source, filename)
    aliases = {}  # local name -> the dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module or ''}.{a.name}"
    seen = set()  # the function part of a classified call (ast.walk reaches it after the call)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLING_MODULES:
                    found.append(("import", f"{where}: import {a.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                full = f"{module}.{a.name}"
                if module.split(".")[0] in PICKLING_MODULES:
                    kind = "write" if full in WRITES else "read"
                    found.append((kind, f"{where}: from {module} import {a.name}"))
                elif full in CALLS or "pickle" in a.name.lower():
                    found.append(("use", f"{where}: from {module} import {a.name}"))
        elif isinstance(node, ast.Call):
            dotted = _dotted(node.func)
            head, _, rest = dotted.partition(".")
            full = ".".join(p for p in (aliases.get(head, head), rest) if p)
            kind = None
            if full in CALLS:
                kind = CALLS[full]
            elif full.split(".")[0] in PICKLING_MODULES:
                kind = "write" if full in WRITES else "read"
            if kind is not None:
                found.append((kind, f"{where}: {dotted}(...)"))
                seen.update(id(n) for n in ast.walk(node.func))
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(("read", f"{where}: {dotted}(..., allow_pickle=...)"))
        elif isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in seen:
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower() and name != "allow_pickle":
                found.append(("use", f"{where}: {name}"))
    return found


def _sources():
    for top in ("paddle_ernie5", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_the_package_and_tools_never_pickle():
    """The package: no pickling of any kind. tools/: may make pickles (to craft files that the
    package must refuse), never load one."""
    found = []
    for path, text in _sources():
        allowed = {"import", "write"} if path.startswith("tools") else set()
        found += [what for kind, what in pickle_uses(text, path) if kind not in allowed]
    assert found == []


def test_the_scan_finds_each_kind_of_use():
    cases = {
        "import pickle": {"import"},
        "import cloudpickle as cp": {"import"},
        "from pickle import loads": {"read"},
        "import pickle\npickle.loads(b)": {"import", "read"},
        "import pickle\np = pickle.Unpickler(f)": {"import", "read"},
        "import pickle\nb = pickle.dumps(x)": {"import", "write"},
        "import paddle\npaddle.load(p)": {"read"},
        "import paddle as pd\npd.save(x, p)": {"write"},
        "from paddle import load\nload(p)": {"use", "read"},
        "import numpy as np\nnp.load(p, allow_pickle=True)": {"read"},
        "import numpy as np\nnp.load(p, allow_pickle=flag)": {"read"},
        "x.pickle_state": {"use"},
    }
    for source, kinds in cases.items():
        assert {kind for kind, _ in pickle_uses(source)} == kinds, source
    clean = "import numpy as np\nnp.load(p, allow_pickle=False)\nnp.load(p)\n# pickle in a comment"
    assert pickle_uses(clean) == []
