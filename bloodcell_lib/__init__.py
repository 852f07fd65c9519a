"""bloodcell: white-blood-cell classification, from data set to report."""
__version__ = "0.1.0"
