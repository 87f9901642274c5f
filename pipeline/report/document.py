"""The report page: sections of text, tables and figures, laid out by Jinja2 templates as Markdown and HTML.

The content is built once (`pipeline.report.build`) and rendered through `report.md.j2` and `report.html.j2`,
so the two versions cannot drift apart. The templates ship in `pipeline/report/templates/`; a folder of one's
own holding either file replaces it, which restyles the report without touching the code. Text may use the
inline markup `**bold**` and `` `code` ``: Markdown keeps it, the HTML filter `markup` converts it.

Filters the templates get: `markdown_table` and `html_table` (a `Table` through pandas: `to_markdown`, or
`Styler.to_html` with the class `bold` on highlighted rows), `markup` and `data_uri` (a figure's PNG inlined,
so the HTML page is self-contained). Tests: `table` and `figure` tell the blocks apart.
"""

from __future__ import annotations

import base64
import html
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from pipeline.report.inputs import ReportError

TEMPLATE_NAMES = {"markdown": "report.md.j2", "html": "report.html.j2"}

_INLINE_CODE = re.compile(r"`([^`]+)`")
_INLINE_BOLD = re.compile(r"\*\*(.+?)\*\*")


@dataclass(frozen=True)
class Table:
    """Display strings in a DataFrame (column names are the headers); `bold_rows` are highlighted."""

    frame: pd.DataFrame
    caption: str = ""
    bold_rows: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Figure:
    """A PNG written next to the report; `path` is relative to the report's folder."""

    path: str
    caption: str


Block = str | list[str] | Table | Figure  # a paragraph, a bullet list, a table, a figure


@dataclass(frozen=True)
class Section:
    """A titled part of the report."""

    title: str
    blocks: list[Block]


@dataclass(frozen=True)
class Page:
    """The whole report; `warning` is shown above everything else when set."""

    title: str
    sections: list[Section]
    warning: str | None = None
    warning_title: str = "Note"


def markup(text: str) -> Markup:
    """Inline `**bold**` and `` `code` `` as HTML, the rest escaped."""
    escaped = html.escape(text, quote=False)
    escaped = _INLINE_CODE.sub(r"<code>\1</code>", escaped)
    return Markup(_INLINE_BOLD.sub(r"<strong>\1</strong>", escaped))


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured pipe table, first column left-aligned, the rest right-aligned."""
    frame = table.frame.map(lambda cell: str(cell).replace("|", "\\|").replace("\n", " "))
    for row in table.bold_rows:
        frame.iloc[row] = [f"**{cell}**" if cell else cell for cell in frame.iloc[row]]
    align = ("left",) + ("right",) * (len(frame.columns) - 1)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align)


def _html_table(table: Table, table_id: str) -> Markup:
    classes = pd.DataFrame("", index=table.frame.index, columns=table.frame.columns)
    for row in table.bold_rows:
        classes.iloc[row] = "bold"
    styler = (
        table.frame.style.hide(axis="index")
        .format(lambda cell: markup(str(cell)))
        .format_index(escape="html", axis=1)
        .set_td_classes(classes)
    )
    if table.caption:
        styler = styler.set_caption(markup(table.caption))
    return Markup(styler.to_html(table_uuid=table_id))


def render_page(page: Page, asset_root: Path, template_dir: Path | None = None) -> dict[str, str]:
    """`{"markdown": ..., "html": ...}`: the page through both templates (`template_dir`'s own first).

    Figures are read from `asset_root` for the HTML version.
    """
    loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("pipeline.report", "templates")]
    if template_dir is not None:
        if not template_dir.is_dir():
            raise ReportError(f"{template_dir}: template folder not found")
        loaders.insert(0, jinja2.FileSystemLoader(template_dir))
    environment = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    table_ids = itertools.count(1)
    environment.filters.update(
        markup=markup,
        markdown_table=markdown_table,
        html_table=lambda table: _html_table(table, f"table{next(table_ids)}"),
        data_uri=lambda figure: (
            "data:image/png;base64,"
            + base64.b64encode((asset_root / figure.path).read_bytes()).decode("ascii")
        ),
    )
    environment.tests.update(table=lambda b: isinstance(b, Table), figure=lambda b: isinstance(b, Figure))
    try:
        return {
            kind: environment.get_template(name).render(page=page) for kind, name in TEMPLATE_NAMES.items()
        }
    except jinja2.TemplateError as exc:
        where = f"{exc.filename}:{exc.lineno}: " if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        raise ReportError(f"report template: {where}{exc}") from exc
