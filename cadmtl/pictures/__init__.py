"""Pictures wing: prediction overlays and evaluation charts, and the predict / charts commands."""
