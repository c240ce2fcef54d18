"""tenfold: multi-adapter serving for tensor and block adapters."""
__version__ = "0.1.0"
