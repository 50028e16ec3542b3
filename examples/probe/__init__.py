"""The headline experiment: a probe trained through a population of frozen transformers.

Read in this order (``examples/probe_population.py`` runs them):

* ``task``        -- is a conjunction of literals satisfiable? (sampled in JAX)
* ``transformer`` -- the tiny transformer every zoo model is (plain JAX)
* ``zoo``         -- many of them trained in one vmapped, jitted step; labelled; cached
* ``probe``       -- noise -> generator -> **frozen model** -> head: the jfreeze step
* ``train``       -- that step over the population, on one device or a ``models`` mesh
* ``baselines``   -- the majority class and weight statistics
* ``crossval``    -- held-out models, fold by fold
* ``report``      -- the printed lines and the plot
"""
