"""The lab: trains networks with and without batch normalization on real data and
reports, claim by claim, whether the textbook explanations hold.

Run it with ``batchnorm lab run all`` (or ``python -m batchnorm.lab run all``); see
docs/lab.md. This package imports its heavy dependencies (matplotlib, mlxtend,
mnist1d, scikit-learn, tqdm) only where they are used, and ``import batchnorm``
never imports the lab.
"""
