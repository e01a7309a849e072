from setuptools import setup

setup(
    name="smartrelay",
    version="0.1.0",
    description="Self-hosted transactional e-mail and SMS relay on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=[
        "smartrelay",
        "smartrelay.smtp",
        "smartrelay.engine",
        "smartrelay.outbound",
        "smartrelay.store",
        "smartrelay.web",
        "twisted.plugins",
    ],
    package_data={"twisted": ["plugins/smartrelay_plugin.py"]},
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
    ],
    extras_require={
        "test": ["hypothesis>=6.100", "treq>=23.11", "selenium>=4.11", "pynacl>=1.5"],
    },
    entry_points={
        "console_scripts": ["smartrelay = smartrelay.cli:main"],
    },
)
