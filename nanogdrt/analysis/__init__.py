"""Figures and analyses of trained runs (attribution ratios, heat maps, group plots). Imports the
core and the baselines; the core never imports this package."""
