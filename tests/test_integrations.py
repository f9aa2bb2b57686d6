"""pyperf.integrations without the frameworks: importing pyperf imports none of them, each integration module fails
with a message that says what to install when its framework is missing, and docs/integrations.md has the tested
recipes (tests/test_integrations_{accelerate,lightning,transformers}.py run them)."""
import os
import re
import subprocess
import sys

import pytest

import _integrations as I

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers")


def _python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_pyperf_imports_no_framework():
    r = _python("import sys, pyperf, pyperf.hooks, pyperf.comm, pyperf.integrations, pyperf.nn\n"
                "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (FRAMEWORKS,))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("module,blocked,package", [
    ("lightning", ("lightning", "pytorch_lightning"), "lightning"),
    ("transformers", ("transformers",), "transformers"),
])
def test_missing_framework_says_what_to_install(module, blocked, package):
    # a None entry in sys.modules makes `import name` raise ImportError, as if it were not installed
    r = _python("import sys\n"
                "for m in %r: sys.modules[m] = None\n"
                "try:\n"
                "    import pyperf.integrations.%s\n"
                "except ImportError as e:\n"
                "    print(e)\n" % (blocked, module))
    assert r.returncode == 0, r.stderr
    assert "pyperf.integrations.%s needs %s, which is not installed" % (module, package) in r.stdout, r.stdout
    assert "pip install %s" % package in r.stdout, r.stdout


def test_doc_has_the_tested_recipes():
    text = open(I.DOC).read()
    names = re.findall(r"<!-- tested: (\w+) -->", text)
    assert names == ["accelerate", "lightning", "transformers"], names
    for name in names:
        block = re.search(r"<!-- tested: %s -->\s*```python\n(.*?)```" % name, text, re.S).group(1)
        compile(block, name, "exec")
        assert "def train(" in block
