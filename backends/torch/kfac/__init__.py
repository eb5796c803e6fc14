"""The K-FAC curvature of a torch model: ``capture`` (the hooked passes) and ``curvature``
(the Kronecker factors, eigenbases and directions of KFAC, eKFAC and ieKFAC)."""
