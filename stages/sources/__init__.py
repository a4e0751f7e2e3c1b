"""Sources: one file each, against one small protocol.

A source module `stages/sources/<kind>.py` defines one subclass of `Source` and names
it `SOURCE`. Adding a source is that file plus one `[sources.<name>]` block in
sources.toml; the registry below finds it by file name.

The protocol, in data-flow order:
- `fetch(store)`: write raw pages into `store` (data/raw/<name>/), resumable through
  `store.checkpoint`; network sources use the one shared HTTP client.
- `parse(page)`: one raw page file -> records (dicts with a stable string `id`).
- `examples(record)`: one record -> instruction examples `{"task", "messages"}`.
- `inputs()`: the files on the user's disk that `fetch` reads (doit's file_dep of the scrape:
  editing, adding or removing one re-runs that source alone).
- `tasks` (optional): how eval scores the answers of its tasks, task name -> `Task`: a greedy
  answer read back by `score(gold, answer)`, and/or multiple-choice questions built by
  `choices(rows)` and scored by log-likelihood. The templates that write an answer and the
  code that reads one back live in the same file; stages.evaluate only calls them.

A page `parse` cannot read at all (wrong kind of file, not JSON, wrong encoding) is a
`SourceError`: one line naming the file, where in it, and what to do. A single malformed row
of an otherwise good page (a broken JSONL line, a CSV row with the wrong column count, a record
missing a required field) is passed over with `self.skip(reason, where)`, counted by reason:
normalize prints the counts in the task log and writes them to its report
(data/examples/<source>.report.json), so nothing vanishes unseen.

Its settings are data: `PARAMS` maps each key of `[sources.<name>.params]` to a
`stages.schema.Key` (type, default, range, choices); a source that talks to an API through
the shared client (it names its `api`) takes the client's keys too (stages.http.PARAMS).
`config.load()` checks every source's params against them before anything runs (unknown
keys, wrong types, out of range), then, for an enabled live source, `check(root)`: what the
schema cannot say, found without the network (a file it names that does not exist).
`param(key)` reads a declared key, its default filled in.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

if TYPE_CHECKING:
    from stages.raw import RawStore

_HERE = Path(__file__).parent
KINDS = {p.stem: f"stages.sources.{p.stem}" for p in sorted(_HERE.glob("*.py")) if not p.stem.startswith("_")}


import orjson

from stages.errors import SourceError  # defined at the bottom (stages.errors); sources import it from here
from stages.schema import Key, check_value


SKIP_EXAMPLES = 5  # where the first few skipped rows of each reason were, for the report


@dataclass(frozen=True)
class Task:
    """How eval scores one task's answers (stages.evaluate calls it for every test row of the task).

    Generated: `score(gold, answer)` -> {metric: value} for one greedy answer of at most
    `max_new_tokens` tokens, against the gold answer of the test row.
    Choice: `choices(rows)` -> [(i, options, gold)]: row i of `rows` (this task's rows of one test
    split) asked as a multiple choice; each option is a continuation of the prompt, the one the
    model finds likeliest is its pick, `gold` the index of the right one (metric: accuracy).
    Cloze: `cloze(gold)` -> [(metric, start, end)]: the character spans of the gold answer that carry
    what the task teaches (a chart's points, a category code); with the gold answer fed in, does the
    model's greedy next token reproduce each span? One forward pass per example, no generation, so
    every test item can be scored; per example a metric is the share of its spans reproduced.
    A task may have several. `rates`: the metrics `score` and `cloze` return that are rates in [0, 1]
    (higher is better, shown as percentages); any other metric `score` returns is an error such as an
    absolute difference (lower is better). `answered(answer so far)`: True once the answer holds all
    that `score` reads, so greedy generation stops there instead of running on to `max_new_tokens`.
    """
    max_new_tokens: int = 0
    score: Callable[[str, str], dict[str, float]] | None = None
    choices: Callable[[list[dict[str, Any]]], list[tuple[int, list[str], int]]] | None = None
    rates: frozenset[str] = frozenset()
    cloze: Callable[[str], list[tuple[str, int, int]]] | None = None
    answered: Callable[[str], bool] | None = None

    def __post_init__(self):
        if self.score is not None and self.max_new_tokens <= 0:
            raise ValueError("a Task with `score` needs max_new_tokens > 0 (the greedy answer's length)")


class Source:
    kind: ClassVar[str]
    licence: ClassVar[str]          # licence of the data, e.g. "MIT", "public domain (US government)"
    origin: ClassVar[str]           # where the data comes from: a URL or "pypi:<package>"
    network: ClassVar[bool] = False  # needs the internet in live mode
    PARAMS: ClassVar[dict[str, Key]] = {}  # [sources.<name>.params]: key -> Key (stages.schema)
    tasks: ClassVar[dict[str, Task]] = {}  # task name -> how eval scores its answers; unscored tasks absent
    user_task: ClassVar[Task | None] = None  # how eval scores tasks the user names (in params or rows), if at all

    def __init__(self, name: str, params: dict[str, Any]):
        self.name = name
        self.params = params
        self.skipped: dict[str, dict[str, Any]] = {}  # reason -> {"count", "first": [where, ...]}

    def skip(self, reason: str, where: str) -> None:
        """Pass over one malformed row, counted by `reason`; `where` (file and line) is kept for the first few."""
        entry = self.skipped.setdefault(reason, {"count": 0, "first": []})
        entry["count"] += 1
        if len(entry["first"]) < SKIP_EXAMPLES:
            entry["first"].append(where)

    @classmethod
    def schema(cls) -> dict[str, Key]:
        """Every key its params may hold: its own, plus the HTTP client's when it uses one."""
        if getattr(cls, "api", None):
            from stages.http import PARAMS as HTTP_PARAMS
            return {**HTTP_PARAMS, **cls.PARAMS}
        return dict(cls.PARAMS)

    def check(self, root: Path) -> list[tuple[str, str]]:
        """(param, what is wrong and the fix) for what the schema cannot say; run at load, for an enabled
        live source whose params are well-formed, without the network (`root`: the project folder)."""
        return []

    def param(self, key: str, default: Any = None, kind: type | tuple[type, ...] | None = None,
              between: tuple[float, float] | None = None) -> Any:
        """A parameter from `[sources.<name>.params]`: a declared key is read by its Key (the rest of the
        arguments are ignored); an undeclared one type- and range-checked as asked. A one-line error either way."""
        declared = self.schema().get(key)
        if declared is not None:
            if key not in self.params:
                if declared.required:
                    raise SourceError(f"sources.toml: missing key 'sources.{self.name}.params.{key}'; add it")
                return declared.make_default()
            value, problem = check_value("sources.toml", f"sources.{self.name}.params.{key}", self.params[key], declared)
            if problem:
                raise SourceError(problem)
            return value
        value = self.params.get(key, default)
        kind = kind or type(default)
        where = f"sources.toml: key 'sources.{self.name}.params.{key}'"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise SourceError(f"{where} must be {getattr(kind, '__name__', kind)} (got {value!r}); fix its value")
        if between is not None and not between[0] <= value <= between[1]:
            high = "" if between[1] == float("inf") else f"..{between[1]}"
            raise SourceError(f"{where} must be {between[0]}{high}{'' if high else ' or more'} (got {value!r}); fix its value")
        return value

    def fetch(self, store: "RawStore") -> None:
        raise NotImplementedError

    def inputs(self) -> list[Path]:
        """The user's files `fetch` reads, as they are now (never raises: a missing file is fetch's error to report)."""
        return []

    def parse(self, page: Path) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def examples(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


def stored_json(page: Path) -> Any:
    """A stored page's JSON, or one SourceError naming the page and the fix (it was saved broken)."""
    try:
        return orjson.loads(page.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SourceError(f"{page}: not valid JSON ({exc}); delete it and rerun the scrape") from None


def load(kind: str) -> type[Source]:
    if kind not in KINDS:
        raise SourceError(f"no source kind '{kind}' (known: {', '.join(KINDS)}); add stages/sources/{kind}.py")
    return importlib.import_module(KINDS[kind]).SOURCE


def make(name: str, kind: str, params: dict[str, Any]) -> Source:
    return load(kind)(name, params)


@functools.cache
def scored_tasks() -> dict[str, Task]:
    """Every source kind's scored tasks by name: eval finds a test row's scorer by the row's task.

    A task name belongs to one kind (its rows are that kind's templates), so two kinds scoring
    the same name is an error rather than a silent pick of one.
    """
    owner: dict[str, str] = {}
    found: dict[str, Task] = {}
    for kind in KINDS:
        for name, task in load(kind).tasks.items():
            if name in owner:
                raise SourceError(f"task '{name}' is scored by both stages/sources/{owner[name]}.py and "
                                  f"stages/sources/{kind}.py; rename the task in one of them")
            owner[name], found[name] = kind, task
    return found


def task_of(row: dict[str, Any]) -> Task | None:
    """How eval scores one test row: its task's entry in scored_tasks(), else what the source kind the row came
    from (its provenance) gives tasks the user names: local_files' answer match; None: perplexity alone."""
    task = scored_tasks().get(row.get("task", ""))
    kind = (row.get("provenance") or {}).get("kind")
    if task is None and kind in KINDS:
        task = load(kind).user_task
    return task


def scored_rates() -> frozenset[str]:
    """Every metric any task declares a rate (higher is better)."""
    tasks = list(scored_tasks().values()) + [t for t in (load(kind).user_task for kind in KINDS) if t]
    return frozenset().union(*(t.rates for t in tasks))
