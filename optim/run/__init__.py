"""Running specs: the prepared-pipeline cache, the sampler, the refiner ensemble, stats and machine probes."""
