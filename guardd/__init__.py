"""guardd: an independent kill switch and risk guard for Interactive Brokers accounts."""

__version__ = "0.1.0"
