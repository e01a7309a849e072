import base64
import glob
import hashlib
import os
import zipfile

from setuptools import find_packages, setup

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: editable installs are `setup.py develop`
    editable_wheel = None

# twistd finds plugins by listing the twisted/plugins folder under every
# sys.path entry (twisted.plugin.pluginPackagePaths); importing is not enough.
PLUGIN = "twisted/plugins/smartrelay_plugin.py"
HERE = os.path.dirname(os.path.abspath(__file__))


def _pathEntries(wheel: zipfile.ZipFile):
    """
    The folders that the .pth files at the root of C{wheel} add to sys.path
    (their lines that are not comments or imports).
    """
    for name in wheel.namelist():
        if "/" not in name and name.endswith(".pth"):
            for line in wheel.read(name).decode("utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    yield line


def _addFile(wheelPath: str, arcname: str, source: str) -> None:
    """
    Rewrite the wheel at C{wheelPath} with the file C{source} added as
    C{arcname}, listed in its RECORD with its hash and size.
    """
    with open(source, "rb") as f:
        data = f.read()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    row = b"%s,sha256=%s,%d\n" % (arcname.encode("utf-8"), digest, len(data))
    info = zipfile.ZipInfo.from_file(source, arcname)
    info.compress_type = zipfile.ZIP_DEFLATED
    temporary = wheelPath + ".tmp"
    with zipfile.ZipFile(wheelPath) as old, zipfile.ZipFile(temporary, "w") as new:
        new.writestr(info, data)
        for entry in old.infolist():
            content = old.read(entry)
            if entry.filename.endswith(".dist-info/RECORD"):
                content = row + content
            new.writestr(entry, content)
    os.replace(temporary, wheelPath)


if editable_wheel is not None:

    class EditableWheel(editable_wheel):
        """
        setuptools' editable wheel, plus a real copy of the twistd plugin
        module when the wheel would not put any folder holding
        C{twisted/plugins/smartrelay_plugin.py} on sys.path.

        That is the default (PEP 660, "lenient") mode for this layout: it
        installs an import hook for C{smartrelay} and C{twisted.plugins},
        and keeps the checkout itself off sys.path (so C{tests/} and
        C{bench/} do not become importable). The hook can import the plugin
        module, but Twisted never asks for it: plugins are found by listing
        C{twisted/plugins} under every sys.path entry, and the installed
        Twisted's C{twisted.plugins} wins the import. A copy of the
        one-declaration plugin module in site-packages, next to Twisted's
        own plugins (where a plain install puts it too), is found; it
        names C{smartrelay.tap}, which the hook imports from the checkout,
        so code edits still apply at once (an edit to the plugin module
        itself needs a reinstall). C{editable_mode=compat} (the checkout on
        sys.path) and C{strict} (a link tree on sys.path) already expose
        the plugin folder, and get no copy. The copy is listed in the
        wheel's RECORD, so pip uninstalls it.
        """

        def run(self):
            super().run()
            for path in glob.glob(os.path.join(os.fspath(self.dist_dir), "smartrelay-*.whl")):
                with zipfile.ZipFile(path) as wheel:
                    if PLUGIN in wheel.namelist() or any(
                        os.path.isfile(os.path.join(entry, *PLUGIN.split("/")))
                        for entry in _pathEntries(wheel)
                    ):
                        continue
                _addFile(path, PLUGIN, os.path.join(HERE, *PLUGIN.split("/")))

    cmdclass = {"editable_wheel": EditableWheel}
else:
    cmdclass = {}

setup(
    name="smartrelay",
    version="0.1.0",
    description="Self-hosted transactional e-mail and SMS relay on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # Every package under smartrelay/ (a hand-kept list once missed new
    # ones: a plain install lacked smartrelay.feedback), and the plugin.
    packages=find_packages(include=["smartrelay", "smartrelay.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/smartrelay_plugin.py"],
        # The reports UI's style sheet (smartrelay/web/ui/app.py serves it).
        "smartrelay.web.ui": ["static/*.css"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "attrs>=23.1",
        "klein>=23.12",
        "txredisapi>=1.4.10",
        # engine/dkim.py uses dkimpy's canonicalisation internals for speed;
        # only the releases it was checked against are allowed (a start-up
        # self-test signs and verifies with every key as well).
        "dkimpy>=1.1,<1.2",
        "cryptography>=42",
        # UTS-46 / IDNA 2008 for domains (str.encode("idna") is IDNA 2003).
        "idna>=3.4",
        # The web app imports werkzeug's HTTP exceptions directly.
        "werkzeug>=2.3",
        # /metrics: the Prometheus text (and OpenMetrics) exposition of
        # smartrelay/web/metrics.py, and a private CollectorRegistry per relay.
        "prometheus_client>=0.17",
    ],
    extras_require={
        # tests/test_install.py builds the project with this setuptools
        # (no build isolation, no network): 70.1 builds wheels by itself.
        "test": [
            "hypothesis>=6.100",
            "treq>=23.11",
            "selenium>=4.11",
            "pynacl>=1.5",
            "setuptools>=70.1",
            # tests/test_openapi.py runs it against a live relay.
            "schemathesis>=4.0",
            # tests/test_sms_codec.py: an independent SMPP 3.4 codec for the
            # differential test of smartrelay.sms.codec (test-only; its own
            # encoder drops unknown TLVs, so it cannot replace ours).
            "smpp.pdu3>=0.6",
        ],
    },
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": ["smartrelay = smartrelay.cli:main"],
    },
)
