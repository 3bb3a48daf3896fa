"""aspire: find, name, prove and repair the spurious features an image classifier relies on."""

__version__ = "0.1.0"
