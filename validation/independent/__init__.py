"""Independent references: every update of a reference run against dense P x P solves written
out again in NumPy (``references``), and the checks that ``python -m validation`` prints
(``checks``)."""
