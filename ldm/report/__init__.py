"""The run report: ``report.html`` in a run dir, built from what the run wrote there (see ``page.ReportBuilder``)."""
from ldm.report.page import ReportBuilder

__all__ = ["ReportBuilder"]
