"""The README's reading guides point at existing code: every link [`name`](file.py#LN) must land on the
line where `name` is defined in file.py (def, class or assignment), and every command it shows uses
a script and flags that exist.

    python tests/test_readme.py          # rewrite the line numbers after the code has moved
"""
import os
import re
import subprocess
import sys

from conftest import ROOT, cpu_env

LINK = re.compile(r"\[`([\w.]+)(?:\(\))?`\]\((\w+\.py)#L(\d+)\)")


def definition_line(path, name):
    """1-based line of the definition of `name` (last dotted component) in path, or None."""
    short = name.split(".")[-1]
    pattern = re.compile(rf"^\s*(?:def|class)\s+{short}\b|^{short}\s*(?::[^=]*)?=")
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if pattern.match(line):
                return i
    return None


def links(text):
    return [(m, m.group(1), m.group(2), int(m.group(3))) for m in LINK.finditer(text)]


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_reading_guide_links_point_at_definitions():
    found = links(readme())
    assert len(found) >= 20, "the reading guides should link the code they describe"
    wrong = []
    for _, name, file, line in found:
        path = os.path.join(ROOT, file)
        assert os.path.isfile(path), f"README links {file}, which does not exist"
        actual = definition_line(path, name)
        if actual != line:
            wrong.append(f"{file}#L{line} `{name}` (defined at {actual})")
    assert not wrong, "stale README links (run python tests/test_readme.py): " + "; ".join(wrong)


def test_readme_commands_use_existing_flags():
    """Every flag of every `python|torchrun ... <method>.py ...` command in the README is one the script's
    --help lists (flags are checked, not run: some need a checkpoint or a data set)."""
    cmds = re.findall(r"^(?:python|torchrun)[^\n]*?\b(scm|gcm|decm|direct)\.py([^\n#]*)", readme(), re.M)
    assert len(cmds) >= 4
    helps = {}
    for script, rest in cmds:
        if script not in helps:
            if not os.path.isfile(os.path.join(ROOT, script + ".py")):
                raise AssertionError(f"README runs {script}.py, which does not exist")
            r = subprocess.run([sys.executable, script + ".py", "--help"], cwd=ROOT, capture_output=True, text=True,
                               env=cpu_env())
            assert r.returncode == 0, r.stderr[-300:]
            helps[script] = set(re.findall(r"--[\w-]+", r.stdout))
        unknown = [f for f in re.findall(r"(?<!\S)--[\w-]+", rest) if f not in helps[script]]
        assert not unknown, f"README: {script}.py {rest.strip()}: unknown flags {unknown}"


def fix():
    text = readme()
    out, last = [], 0
    for m, name, file, line in links(text):
        actual = definition_line(os.path.join(ROOT, file), name)
        if actual is None:
            print(f"not found: {name} in {file}")
            continue
        out.append(text[last:m.start(3)] + str(actual))
        last = m.end(3)
    out.append(text[last:])
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write("".join(out))


if __name__ == "__main__":
    fix()
