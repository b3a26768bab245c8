"""Cells in and out: .h5ad files, count matrices, gene alignment and preprocessing."""
