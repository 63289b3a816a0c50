"""Model families, checkpoint reading and detection, loaders, schedulers and pipeline assembly."""
