"""The optimization protocol: units and their registry, the undo log every change is recorded in."""
