"""Gradient-free search over network graphs: genomes and their mutations, vectorised
evaluation over shared weights, Pareto ranking, novelty and its archive, and the tasks."""
