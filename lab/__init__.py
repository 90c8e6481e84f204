"""Tools around the pipeline: the toy world and its model, dataset converters."""
