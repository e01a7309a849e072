"""
The twistd plugin is found after every way of installing the project: plain
C{pip install .}, the default (PEP 660) C{pip install -e .}, and
C{pip install -e . --config-settings editable_mode=compat}.

Each test installs a copy of the project (the files a build reads; no
C{tests/}, no C{bench/}, and a leftover C{dropin.cache} planted in
C{twisted/plugins/} as a checkout may have one) into a fresh virtual
environment, then runs that environment's C{twistd --help},
C{twistd smartrelay --help} and C{smartrelay --help} from an empty temporary
directory with no C{PYTHONPATH}.

The environment does not download its dependencies: it borrows them,
read-only, from the environment running the tests through a folder of
symbolic links that leaves out everything of smartrelay's (its package, its
metadata, editable-install hooks, and the plugin module in Twisted's own
C{twisted/plugins/}), so only the install under test can make the plugin
visible.  The build is C{--no-build-isolation --no-index} with this
environment's setuptools (the C{[test]} extra asks for one that builds wheels
by itself), so no network is needed.
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import venv

import setuptools
from twisted.trial.unittest import SkipTest, SynchronousTestCase

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "smartrelay_plugin.py"

# The installed twistd console script, run with the environment's python
# (Twisted itself is borrowed, so the environment has no twistd script).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

# Where the environment finds the plugin module and smartrelay, and its path.
PROBE = """
import json, sys
import smartrelay, twisted.plugins.smartrelay_plugin as plugin
print(json.dumps({"plugin": plugin.__file__, "smartrelay": smartrelay.__file__,
                  "path": sys.path}))
"""


def _ignoreForCopy(directory, names):
    """
    The names in C{directory} that a copy of the project leaves out: what
    no build reads (tests, benchmarks, version control) and what earlier
    builds and runs left behind.
    """
    skip = {
        name
        for name in names
        if name in ("__pycache__", "dropin.cache", "build", "dist")
        or name.endswith((".egg-info", ".pyc"))
        or name.startswith(("_trial_temp", "."))
    }
    if os.path.realpath(directory) == os.path.realpath(PROJECT):
        skip.update({"tests", "bench", "var"} & set(names))
    return skip


def _isOurs(name: str) -> bool:
    """
    Whether the site-packages entry C{name} belongs to an install of
    smartrelay (or is an editable-install hook or a .pth file, which the
    borrowed folders must not carry over).
    """
    return (
        name == "smartrelay"
        or name.startswith(("smartrelay-", "smartrelay.", "__editable__"))
        or name.endswith(".pth")
        or name == "__pycache__"
    )


def _linkEach(source: str, target: str, skip) -> None:
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        destination = os.path.join(target, name)
        if not skip(name) and not os.path.lexists(destination):
            os.symlink(os.path.join(source, name), destination)


def borrowedDependencies(target: str) -> str:
    """
    Fill C{target} with symbolic links to the packages of this process's
    site-packages folders, without smartrelay's; C{twisted/plugins/} is a
    real folder, linking Twisted's own plugins only.

    @return: C{target}
    """
    siteFolders = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        siteFolders.add(site.getusersitepackages())
    for folder in [p for p in sys.path if p in siteFolders and os.path.isdir(p)]:
        twisted = os.path.join(folder, "twisted")
        if os.path.isfile(os.path.join(twisted, "__init__.py")) and not os.path.lexists(
            os.path.join(target, "twisted")
        ):
            _linkEach(twisted, os.path.join(target, "twisted"), lambda name: name == "plugins")
            _linkEach(
                os.path.join(twisted, "plugins"),
                os.path.join(target, "twisted", "plugins"),
                lambda name: name in (PLUGIN, "dropin.cache", "__pycache__"),
            )
        _linkEach(folder, target, lambda name: _isOurs(name) or name == "twisted")
    return target


class InstalledPluginTests(SynchronousTestCase):
    """
    Each way of installing the project makes C{twistd smartrelay} available
    outside the checkout.
    """

    def setUp(self):
        if tuple(int(n) for n in setuptools.__version__.split(".")[:2]) < (70, 1):
            self.fail(
                f"setuptools {setuptools.__version__} cannot build wheels without the "
                "wheel package; install the [test] extra (setuptools>=70.1)"
            )
        self.root = tempfile.mkdtemp(prefix="smartrelay-install-")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.env["PIP_NO_INPUT"] = "1"
        self.source = os.path.join(self.root, "source")
        shutil.copytree(PROJECT, self.source, ignore=_ignoreForCopy)
        # A leftover plugin cache, as running twistd from a checkout leaves
        # one: it must neither be shipped nor hide the plugin.
        with open(os.path.join(self.source, "twisted", "plugins", "dropin.cache"), "wb") as f:
            f.write(b"left over from an earlier run")
        self.venv = os.path.join(self.root, "venv")
        try:
            venv.EnvBuilder(with_pip=False, symlinks=(os.name != "nt")).create(self.venv)
        except Exception as e:
            raise SkipTest(f"cannot create a virtual environment with venv: {e}")
        self.python = os.path.join(self.venv, "bin", "python")
        self.purelib = self.runCommand(
            self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).stdout.strip()
        deps = borrowedDependencies(os.path.join(self.root, "deps"))
        with open(os.path.join(self.purelib, "_borrowed_dependencies.pth"), "w") as f:
            f.write(deps + "\n")

    def runCommand(self, *command):
        """
        Run C{command} from a fresh empty directory, without PYTHONPATH.
        """
        cwd = tempfile.mkdtemp(dir=self.root, prefix="cwd-")
        result = subprocess.run(
            command, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            self.fail(
                "%s exited with %s\nstdout:\n%s\nstderr:\n%s"
                % (" ".join(command), result.returncode, result.stdout, result.stderr)
            )
        return result

    def install(self, *options):
        """
        pip-install the copy of the project into the environment.
        """
        self.runCommand(
            self.python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
            "--no-build-isolation", "--root-user-action=ignore", *options,
        )

    def assertPluginWorks(self):
        """
        The environment's twistd lists the smartrelay plugin and runs its
        option parser, and the smartrelay console script runs; the plugin
        cache is not part of the installed files.

        @return: where the plugin module and smartrelay came from, and
            sys.path, as seen by the environment's python.
        """
        listing = self.runCommand(self.python, "-c", TWISTD, "--help").stdout
        self.assertRegex(listing, re.compile(r"^ +smartrelay +Transactional", re.M))
        usage = self.runCommand(self.python, "-c", TWISTD, "smartrelay", "--help").stdout
        self.assertIn("smartrelay [--config PATH]", usage)
        self.assertIn("--config=", usage)
        script = os.path.join(self.venv, "bin", "smartrelay")
        self.assertIn("dkim-keygen", self.runCommand(script, "--help").stdout)
        (distInfo,) = [n for n in os.listdir(self.purelib) if n.startswith("smartrelay-")]
        with open(os.path.join(self.purelib, distInfo, "RECORD")) as f:
            self.assertNotIn("dropin.cache", f.read())
        return json.loads(self.runCommand(self.python, "-c", PROBE).stdout)

    def assertInside(self, path, folder):
        real = os.path.realpath(path)
        self.assertTrue(
            real.startswith(os.path.realpath(folder) + os.sep), f"{real} is not in {folder}"
        )

    def test_plain(self):
        """
        After C{pip install .} the plugin and smartrelay are files of the
        environment.
        """
        self.install(self.source)
        found = self.assertPluginWorks()
        self.assertInside(found["plugin"], self.purelib)
        self.assertInside(found["smartrelay"], self.purelib)

    def test_editable(self):
        """
        After the default C{pip install -e .} smartrelay is imported from
        the project folder, which is not on sys.path (so neither are its
        C{tests/} and C{bench/}), and the plugin is found all the same.
        """
        self.install("-e", self.source)
        found = self.assertPluginWorks()
        self.assertInside(found["smartrelay"], self.source)
        self.assertNotIn(os.path.realpath(self.source), map(os.path.realpath, found["path"]))
        self.assertInside(found["plugin"], self.venv)

    def test_editableCompat(self):
        """
        After C{pip install -e . --config-settings editable_mode=compat}
        (the project folder on sys.path) the plugin is the project's own
        file.
        """
        self.install("-e", self.source, "--config-settings", "editable_mode=compat")
        found = self.assertPluginWorks()
        self.assertIn(os.path.realpath(self.source), map(os.path.realpath, found["path"]))
        self.assertInside(found["smartrelay"], self.source)
        self.assertInside(found["plugin"], self.source)
