"""The headline experiment: a probe trained through a population of frozen transformers.

Read in this order (``examples/probe_population.py`` runs them):

* ``task``        -- is a conjunction of literals satisfiable? (sampled in JAX)
* ``transformer`` -- the tiny transformer every zoo model is (plain JAX)
* ``zoo``         -- many of them trained in one vmapped, jitted step; labelled; cached
* ``probe``       -- noise -> generator -> **frozen model** -> head: the jfreeze step
* ``train``       -- that step over the population, on one device or a ``models`` mesh
* ``baselines``   -- the majority class, weight statistics, and probe + weight statistics
* ``crossval``    -- held-out models, fold by fold (every model's held-out scores kept)
* ``report``      -- the printed lines (overall and within setup groups) and the plot
* ``user_zoo``    -- ``--zoo DIR``: a user's labelled checkpoints and apply function
* ``cli``         -- the command line
"""
