"""The data layer: one module per aggregate, owning every query on its tables."""
