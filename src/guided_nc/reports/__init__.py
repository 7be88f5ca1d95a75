"""Reports built from run folders only: they read files, never train (DomainBed's pattern).

:mod:`~guided_nc.reports.tables` and :mod:`~guided_nc.reports.figures` are generic (median
[range] tables, band figures); :mod:`~guided_nc.reports.ufm` and
:mod:`~guided_nc.reports.compare` build the UFM and the comparison reports.
"""
