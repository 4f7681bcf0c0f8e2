"""Golden reference data: weight recipes (weights.py) and the script that regenerates the files from upstream."""
