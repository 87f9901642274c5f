"""The run report: configuration, dataset sizes, recall beside chance and the papers, curves, examples.

One job per module: `inputs` loads the run's files, `chance` and `published` give the reference numbers,
`sections` writes the text and tables, `plots` and `examples` draw the figures, `document` lays the page out
through the Jinja2 templates in `templates/` (Markdown and self-contained HTML), and `build` assembles it
all and writes the folder.
"""

from pipeline.report.build import ReportOutputs, build_report, write_report
from pipeline.report.inputs import ReportError, ReportInputs, ReportSources, load_inputs

__all__ = [
    "ReportError",
    "ReportInputs",
    "ReportOutputs",
    "ReportSources",
    "build_report",
    "load_inputs",
    "write_report",
]
