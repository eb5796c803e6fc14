"""Peer libraries as oracles: curvlinops' and BackPACK's products against ngdref's (``peers``,
with ``curvlinops``, ``backpack``, the shared ``setup`` and the torch ``conversions``), and
K-FAC against curvlinops and exact iEF (``kfac``)."""
