"""The commands in README.md, docs/*.md and launch/README.md name things that exist.

Every command line of their code blocks (indented or fenced; backslash continuations joined) and
of their inline code that starts with `python` or `pip` is checked without running it:
* `python -m ddpm_jax.X`: the module exists, and each `--flag` is one that it defines (read from
  one `--helpfull` (absl) or `--help` (argparse) per module);
* `--config FILE` exists, and each `--config.a.b=V` key is a field of that config (of
  configs/default.py when the config comes from the work directory);
* `python SCRIPT.py --flag`: the script exists and defines the flag;
* `benchmarks/*.sh`, `launch/*` scripts exist, pass `bash -n`, and take the sub-command given
  where they dispatch on one (`case "${1:-}" in`);
* `pip install` extras exist: ours in pyproject.toml, others' in the installed package's metadata.
Upper-case words (CONFIG.py, DIR, KEY=VALUE) are placeholders and are not checked.
Python code blocks that import ddpm_jax modules: the modules and their attributes exist.
Also: the README's test command is the one .ci/run runs, and docs/code-layout.md lists every
module with the imports it really has.
"""

import ast
import functools
import glob
import importlib
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO
from test_imports import import_graph

SCRIPT = re.compile(r"(\./)?(benchmarks|launch)/[\w./-]+")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]{1,}\b")


def doc_files(root=REPO):
    return [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md"))),
            os.path.join(root, "launch", "README.md")]


def code_blocks(text: str) -> list[str]:
    """The fenced and indented code blocks of a markdown text."""
    blocks, current, fenced, previous_blank = [], None, False, True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                blocks.append("\n".join(current))
                current, fenced = None, False
            else:
                current, fenced = [], True
            continue
        if fenced:
            current.append(line)
        elif current is not None and (line.startswith("    ") or not line.strip()):
            current.append(line[4:])
        elif current is None and previous_blank and line.startswith("    ") and line.strip():
            current = [line[4:]]
        else:
            if current is not None:
                blocks.append("\n".join(current))
            current = None
        previous_blank = not line.strip()
    if current is not None:
        blocks.append("\n".join(current))
    return blocks


def inline_spans(text: str) -> list[str]:
    """Inline code that is a command (`python ...`, `pip ...`) or a --config.KEY override."""
    spans = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", "\n".join(
        line for line in text.splitlines() if not line.startswith("    ")))
    return [s for s in spans if re.match(r"(python3? |pip |--config\.)", s)]


def command_lines(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def is_python_code(block: str) -> bool:
    try:
        ast.parse(block)
    except SyntaxError:
        return False
    return bool(re.search(r"^\s*(from|import) ", block, re.M))


@functools.cache
def module_flags(module: str) -> frozenset[str]:
    """The flags `python -m ddpm_jax.<module>` defines, from its own help text."""
    source = open(os.path.join(REPO, "ddpm_jax", f"{module}.py")).read()
    help_flag = "--help" if "argparse" in source else "--helpfull"
    result = subprocess.run([sys.executable, "-m", f"ddpm_jax.{module}", help_flag], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    names = set()  # (absl's --helpfull exits 1 after printing them)
    for negatable, name in re.findall(r"^\s+(?:-\w+,\s*)?--(\[no\])?([\w-]+)", result.stdout, re.M):
        names |= {name, f"no{name}"} if negatable else {name}
    assert names, result.stdout[-2000:] + result.stderr[-2000:]
    return frozenset(names | {"help"})


@functools.cache
def config_keys(config_file: str) -> frozenset[str]:
    """Every dotted field of the config that `config_file` (a path under REPO) returns."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    name = os.path.splitext(os.path.relpath(config_file, REPO))[0].replace(os.sep, ".")
    config = importlib.import_module(name).get_config()

    def walk(node, prefix):
        for key in node.keys():
            value = node[key]
            yield prefix + key
            if hasattr(value, "keys"):
                yield from walk(value, f"{prefix}{key}.")

    return frozenset(walk(config, ""))


def is_placeholder(text: str) -> bool:
    return bool(PLACEHOLDER.search(text))


def check_config_override(key: str, config_file: str) -> list[str]:
    if is_placeholder(key):
        return []
    keys = config_keys(config_file)
    if key.endswith(".*"):
        return [] if key[:-2] in keys else [f"no config group {key[:-2]!r}"]
    return [] if key in keys else [f"--config.{key}: no such key in "
                                   f"{os.path.relpath(config_file, REPO)}"]


def check_script(tokens: list[str]) -> list[str]:
    """A shell script (benchmarks/, launch/) with its arguments."""
    path = os.path.join(REPO, tokens[0].removeprefix("./"))
    if not os.path.exists(path):
        return [f"{tokens[0]}: no such file"]
    if os.path.isdir(path) or not re.search(r"\.(sh|sbatch)$", path):
        return []
    result = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    if result.returncode != 0:
        return [f"{tokens[0]}: bash -n: {result.stderr.strip()}"]
    source = open(path).read()
    dispatch = re.search(r'^case "\$\{?1(:-)?\}?" in\n(.*?)^esac', source, re.M | re.S)
    if dispatch and len(tokens) > 1:
        labels = {w.strip() for line in re.findall(r"^\s*([\w| -]+)\)", dispatch.group(2), re.M)
                  for w in line.split("|")}
        if tokens[1] not in labels:
            return [f"{tokens[0]}: no sub-command {tokens[1]!r} (has {sorted(labels)})"]
    return []


def our_extras() -> set[str]:
    """The extras pyproject.toml defines (tomllib is Python 3.11+; we support 3.10)."""
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def check_pip(tokens: list[str]) -> list[str]:
    problems = []
    for token in tokens[2:]:
        match = re.fullmatch(r"([\w.-]+)\[([\w,-]+)\]", token)
        if not match:
            continue
        package, extras = match.group(1), match.group(2).split(",")
        if package == ".":
            defined = our_extras()
        else:
            try:
                defined = set(importlib.metadata.metadata(package).get_all("Provides-Extra") or [])
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here: nothing to compare with
        problems += [f"pip install {token}: {package} has no extra {e!r}" for e in extras
                     if e not in defined]
    return problems


def check_python(tokens: list[str]) -> list[str]:
    """`python -m ddpm_jax.X ...` or `python SCRIPT.py ...`."""
    args = tokens[1:]
    if args[:1] == ["-m"] and len(args) > 1 and args[1].startswith("ddpm_jax."):
        module = args[1].removeprefix("ddpm_jax.")
        if not os.path.exists(os.path.join(REPO, "ddpm_jax", f"{module}.py")):
            return [f"python -m ddpm_jax.{module}: no such module"]
        known, flag_args, script = module_flags(module), args[2:], None
    elif args[:1] == ["-m"] or args[:1] == ["-c"] or not args:
        return []  # another package's module (pytest) or inline code
    else:
        script = os.path.join(REPO, args[0])
        if not os.path.exists(script):
            return [f"python {args[0]}: no such file"]
        source, flag_args = open(script).read(), args[1:]
        known = set(re.findall(r"""["']--([\w-]+)["']""", source)) | set(
            re.findall(r"""DEFINE_\w+\(\s*["']([\w-]+)["']""", source))
    problems, config_file = [], os.path.join(REPO, "configs", "default.py")
    for i, arg in enumerate(flag_args):  # --config FILE: the file its overrides are checked against
        value = flag_args[i + 1] if arg == "--config" and i + 1 < len(flag_args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if script is None and value is not None and not is_placeholder(value):
            path = os.path.join(REPO, value.split(":")[0])
            if not os.path.exists(path):
                return [f"--config {value}: no such file"]
            if not value.endswith("from_workdir.py"):
                config_file = path
    for arg in flag_args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if script is None and name.startswith("config."):
            problems += check_config_override(name.removeprefix("config."), config_file)
        elif name not in known:
            where = f"ddpm_jax.{module}" if script is None else args[0]
            problems.append(f"--{name}: not a flag of {where}")
    return problems


def _unbracket(token: str) -> str:
    """`[--workdir` -> `--workdir`, `DIR]` -> `DIR` (a synopsis' options); `.[test]` stays."""
    token = token.removeprefix("[")
    while token.endswith("]") and token.count("]") > token.count("["):
        token = token[:-1]
    return token


def check_command(line: str) -> list[str]:
    """The problems of one command line, [] when it is fine or is not one we check."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        return [f"{line!r}: {e}"]
    tokens = [t for t in map(_unbracket, tokens) if t and t != "..."]
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the command
    if tokens[:1] in (["sbatch"], ["bash"], ["!python"]):
        tokens = tokens[1:] if tokens[0] != "!python" else ["python", *tokens[1:]]
    if not tokens:
        return []
    if tokens[0] in ("python", "python3"):
        return check_python(tokens)
    if tokens[0] == "pip" and tokens[1:2] == ["install"]:
        return check_pip(tokens)
    if tokens[0].startswith("--config."):  # an override quoted on its own
        return check_config_override(tokens[0][len("--config."):].split("=")[0],
                                     os.path.join(REPO, "configs", "default.py"))
    if SCRIPT.fullmatch(tokens[0]):
        return check_script(tokens)
    return []


def check_python_block(block: str) -> list[str]:
    """`from ddpm_jax import m`: m exists, and so does every `m.a.b` the block uses."""
    tree, problems, modules = ast.parse(block), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ddpm_jax":
            for alias in node.names:
                try:
                    modules[alias.asname or alias.name] = importlib.import_module(
                        f"ddpm_jax.{alias.name}")
                except ImportError as e:
                    problems.append(f"from ddpm_jax import {alias.name}: {e}")
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in modules and chain:
            obj = modules[node.id]
            for attr in chain:
                if not hasattr(obj, attr):
                    problems.append(f"{node.id}.{'.'.join(chain)}: no attribute {attr!r}")
                    break
                obj = getattr(obj, attr)
    return problems


def check_markdown(text: str) -> list[str]:
    problems = []
    for block in code_blocks(text):
        if is_python_code(block) and "ddpm_jax" in block and "python -m" not in block:
            problems += check_python_block(block)
            continue
        for line in command_lines(block):
            problems += [f"{line}\n    {p}" for p in check_command(line)]
    for span in inline_spans(text):
        problems += [f"`{span}`\n    {p}" for p in check_command(span)]
    # Script paths named inline (`launch/tpu_vm.sh`) exist too.
    for path in re.findall(r"`((?:\./)?(?:benchmarks|launch)/[\w./-]*)`", text):
        problems += [f"`{path}`: {p}" for p in check_script([path])]
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_doc_commands_name_what_exists(path):
    problems = check_markdown(open(path).read())
    assert not problems, f"{os.path.relpath(path, REPO)}:\n" + "\n".join(problems)


def test_checks_catch_typos():
    """Each kind of mistake, made once, is reported (and the right spelling is not)."""
    good = ("    python -m ddpm_jax.main --config configs/quickstart.py --workdir runs/q \\\n"
            "        --config.training.batch_size=8 --mode=sample\n")
    assert check_markdown(good) == []
    typos = {
        "python -m ddpm_jax.mian --config configs/quickstart.py": "no such module",
        "python -m ddpm_jax.main --config configs/quickstrat.py": "no such file",
        "python -m ddpm_jax.main --config configs/quickstart.py --wrkdir runs/q": "--wrkdir",
        "python -m ddpm_jax.main --config configs/cifar10.py \\\n    --config.trainig.batch_size=8":
            "config.trainig.batch_size: no such key in configs/cifar10.py",
        "python -m ddpm_jax.import_weights SOURCE --work_dir runs/x": "--work_dir",
        "python benchmarks/colour_patterns.py --norm-groups=32": "--norm-groups",
        "benchmarks/reproduce_ddpm_cifar10s.sh ckpt runs/x": "no such file",
        "./launch/tpu_vm.sh creat": "no sub-command 'creat'",
        'pip install -e ".[tests]"': "no extra 'tests'",
    }
    for command, expected in typos.items():
        problems = check_markdown(f"Text:\n\n    {command}\n")
        assert len(problems) == 1 and expected in problems[0], (command, problems)
    assert "no such key" in check_markdown("Use `--config.model.dropuot=0.1`.")[0]
    assert "no attribute 'Sampler_'" in check_markdown(
        "    from ddpm_jax import sampling\n    s = sampling.Sampler_.from_workdir('x')\n")[0]


def test_readme_test_command_is_the_ci_command():
    readme = open(os.path.join(REPO, "README.md")).read()
    test_section = readme.split("## Test", 1)[1].split("\n## ", 1)[0]
    (command,) = [c for b in code_blocks(test_section) for c in command_lines(b)]
    ci = [line for line in open(os.path.join(REPO, ".ci", "run")).read().splitlines()
          if "pytest" in line and not line.startswith("#")]
    assert ci == [command]


def test_code_layout_lists_every_module_with_its_imports():
    """docs/code-layout.md's import column is the import graph: update it with the code."""
    text = open(os.path.join(REPO, "docs", "code-layout.md")).read()
    # `data/decode.py` is module data.decode, `data/__init__.py` the package data.
    rows = {path.removesuffix("/__init__").replace("/", "."): imports for path, imports in
            re.findall(r"^\| `([\w/]+)\.py` \| [^|]+ \| ([^|]+) \|$", text, re.M)}
    graph = {m: i for m, i in import_graph().items() if m != "__init__"}
    assert sorted(rows) == sorted(graph), "modules missing from or extra in docs/code-layout.md"
    for module, imports in graph.items():
        listed = set(re.findall(r"`([\w.]+)`", rows[module]))
        assert listed == imports, f"docs/code-layout.md, {module}.py: lists {sorted(listed)}, " \
                                  f"imports {sorted(imports)}"
