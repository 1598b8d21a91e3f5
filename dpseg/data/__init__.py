"""Datasets: vocabularies, preparation of the public benchmarks, readers, transforms and the
synthetic `shapes` benchmark. Import submodules directly (readers pull in torch)."""
