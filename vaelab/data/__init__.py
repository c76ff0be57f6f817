"""Data sets: generators and readers that all return a `SampleSet`."""
