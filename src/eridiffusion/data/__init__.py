"""Datasets: image + caption folders and the synthetic coloured-shapes data used by the quickstart."""
