"""Distribution vectors ΔΘ_i = Θ_i − Θ.

``vector`` (the Vector and its computation), ``store`` (vector directories on disk)
and ``diagnostics`` (norms, cosines, sign conflicts).
"""
