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
        "dkimpy>=1.1",
        "cryptography>=42",
    ],
    extras_require={
        "test": ["hypothesis>=6.100", "treq>=23.11", "selenium>=4.11", "pynacl>=1.5"],
    },
    entry_points={
        "console_scripts": ["smartrelay = smartrelay.cli:main"],
    },
)
