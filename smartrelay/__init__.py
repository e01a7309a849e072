"""
smartrelay: a self-hosted transactional e-mail relay built on Twisted.
"""

__version__ = "0.1.0"
